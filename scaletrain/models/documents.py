"""Document masking for packed windows: attention stops at the end-of-text token.

The prepared token stream is every document followed by end-of-text (data/shards.py),
cut into `seq_len` windows that cross document boundaries (data/datasets.py). With
`data.document_masking` each window is run as the independent documents it holds: a
token attends only to earlier tokens of its own document, and position ids restart at 0
at every document (learned positions and RoPE alike), so a document's logits inside a
packed window are those it gets when run alone (tests/unit/test_document_masking.py).

Document ids come from the input window itself (`document_ids`), so the batch format
stays (inputs, targets) and every caller — the step, a pipeline stage, evaluation —
derives the same ids from the same inputs. Models take them as `doc_ids=` (B, T) and
build the attention mask once per forward:
- CPU (and any non-CUDA device): a block-diagonal causal boolean mask (B, 1, T, T) for
  `F.scaled_dot_product_attention` — it broadcasts over heads, so a tensor-parallel
  shard's local heads use it unchanged;
- CUDA: FlexAttention's document mask (`create_block_mask` over a `mask_mod`; torchtitan
  and the FlexAttention paper, Dong et al. 2024, "document masking"), which skips fully
  masked blocks instead of materialising (T, T). Not exercised on CPU test machines:
  `use_flex` is False for every non-CUDA device, so CPU runs never build a BlockMask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

_compiled_flex = None  # flex_attention compiled once per process, on first CUDA use


def document_ids(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Document index of each position of `tokens` (B, T), int32 (B, T), from 0 per row.

    An end-of-text token ends the document it closes (it belongs to it: its target is
    the next document's first token, predicted from the closing document alone), so the
    id is the count of end-of-text tokens *strictly before* each position. A window that
    starts inside a document counts its head as document 0.
    """
    is_eot = (tokens == eot_id).to(torch.int32)
    return torch.cumsum(is_eot, dim=1, dtype=torch.int32) - is_eot


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document, int64 (B, T): 0 at every start."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # The index of the latest document start at or before each position.
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def sdpa_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask, bool (B, 1, T, T), True = may attend."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def flex_document_mask(doc_ids: torch.Tensor) -> BlockMask:
    """FlexAttention's causal document mask of `doc_ids` (B, T) on their (CUDA) device."""
    B, T = doc_ids.shape

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

    return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device)


def document_mask(doc_ids: torch.Tensor, *, dropout: float = 0.0):
    """The attention mask of a forward: a BlockMask on CUDA (FlexAttention has no dropout,
    so a model with dropout keeps the SDPA mask there too), else the SDPA bool mask."""
    if doc_ids.device.type == "cuda" and dropout == 0.0:
        return flex_document_mask(doc_ids)
    return sdpa_document_mask(doc_ids)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of q (B, Hq, T, hd) over k, v (B, Hkv, T, hd) under `mask`: None =
    causal, a bool tensor = SDPA's attn_mask, a BlockMask = (compiled) FlexAttention."""
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, BlockMask):
        global _compiled_flex
        if _compiled_flex is None:  # eager flex_attention is a slow reference path
            _compiled_flex = torch.compile(flex_attention)
        return _compiled_flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          dropout_p=dropout_p, enable_gqa=gqa)


def document_kwargs(x: torch.Tensor, eot_id: int | None) -> dict:
    """A model forward's keywords for inputs `x` (B, T): {'doc_ids': ...} when documents
    are masked at `eot_id`, {} when `eot_id` is None (masking off)."""
    return {} if eot_id is None else {"doc_ids": document_ids(x, eot_id)}


def masking_eot(document_masking: bool, tokenizer) -> int | None:
    """The end-of-text id a run masks documents at (data.document_masking), else None."""
    return tokenizer.eot_id if document_masking and tokenizer is not None else None
