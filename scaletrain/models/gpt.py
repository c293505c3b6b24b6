"""A GPT-2-architecture decoder as a plain `nn.Module` (no distributed code).

Architecture (Radford et al. 2019; nanoGPT): learned token + position embeddings,
pre-LayerNorm blocks of causal self-attention and a GELU MLP, a final LayerNorm and an
output head tied to the token embedding.

Parameter names map one-to-one onto Hugging Face's `GPT2LMHeadModel`:
`wte/wpe/ln_f` <-> `transformer.{wte,wpe,ln_f}`, `blocks.<i>` <-> `transformer.h.<i>`
(same sub-names: ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj), `lm_head`.
HF stores linear weights as Conv1D, i.e. transposed (see checkpoint/export.py).

Shaped for outside-in parallelism (DESIGN.md principle 3): blocks live in a `ModuleDict`
keyed "0".."n-1" so names survive a pipeline split, and `forward` skips parts a pipeline
stage deleted (set to None). Build on the `meta` device, then `materialize()`.

`forward(idx, targets)` returns the summed cross-entropy instead of the logits (as
nanoGPT and HF's `labels=` do): the final LayerNorm, the output head and the loss are
then one function, `head_loss`, which `train.compile` compiles as one region, so the
(tokens x vocabulary) logits are produced, upcast, log-softmaxed and differentiated
without an eager round trip (parallel/compile.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.models.chunked_loss import chunked_head_loss
from scaletrain.models.documents import document_mask, document_positions, masked_attention
from scaletrain.models.losses import sum_cross_entropy


@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 0  # 0 -> 4 * d_model
    dropout: float = 0.0
    bias: bool = True
    init_std: float = 0.02
    loss_chunks: int = 0  # head + loss over this many sequence chunks (0: whole, chunked_loss.py)

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.d_model, 3 * c.d_model, bias=c.bias)  # fused Q, K, V
        self.c_proj = nn.Linear(c.d_model, c.d_model, bias=c.bias)
        self.dropout = c.dropout
        self.resid_drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """`mask`: None (causal) or a document mask (models/documents.py)."""
        B, T, D = x.shape
        # The head count is read from the projection's output so that a tensor-parallel
        # shard (3*D/tp output features: [Q_r; K_r; V_r], parallel/tensor.py) runs its
        # local heads unchanged. (A DTensor weight's .shape is the global one.)
        qkv = self.c_attn(x)
        d_local = qkv.shape[-1] // 3
        n_head = self.n_head * d_local // D
        q, k, v = qkv.split(d_local, dim=2)  # each (B, T, d_local)
        q, k, v = (t.view(B, T, n_head, d_local // n_head).transpose(1, 2) for t in (q, k, v))
        # (B, H, T, Dh): SDPA causal (flash/memory-efficient), or the document mask
        y = masked_attention(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, d_local)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.d_model, c.ff, bias=c.bias)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(c.ff, c.d_model, bias=c.bias)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.d_model, eps=1e-5, bias=c.bias)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.d_model, eps=1e-5, bias=c.bias)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        # The mask goes by keyword: TP's PrepareModuleInput on `attn` lays out the
        # positional input (the hidden states) only and passes keywords through.
        x = x + self.attn(self.ln_1(x), mask=mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.seq_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(c) for i in range(c.n_layer)})
        self.ln_f = nn.LayerNorm(c.d_model, eps=1e-5, bias=c.bias)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the output head with the token embedding (GPT-2 does)."""
        if self.wte is not None and self.lm_head is not None:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) logits; a pipeline stage passes hidden states.
        With `targets` (B, T): the fp32 cross-entropy summed over targets (losses.py).
        `doc_ids` (B, T) (data.document_masking, models/documents.py): attention stays
        inside each document and the learned positions restart at 0 per document, so a
        packed document gets the logits it gets alone. GPT-2 itself never restarts its
        positions (nor masks): that stays the default, `doc_ids=None`."""
        mask = None if doc_ids is None else document_mask(doc_ids, dropout=self.config.dropout)
        if self.wte is not None:
            T = idx.shape[1]
            if T > self.config.seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds seq_len={self.config.seq_len}")
            pos = (torch.arange(T, device=idx.device) if doc_ids is None
                   else document_positions(doc_ids))  # (T,) or (B, T)
            x = self.drop(self.wte(idx) + self.wpe(pos))
        else:
            x = idx
        for block in self.blocks.values():
            x = block(x) if mask is None else block(x, mask)
        if targets is not None and self.lm_head is not None:  # a pipeline's last stage too
            return self.head_loss(x, targets)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> summed cross-entropy of the head's logits; with
        `loss_chunks` a chunk of the sequence at a time (models/chunked_loss.py)."""
        if self.config.loss_chunks:
            return chunked_head_loss(self.ln_f, self.lm_head, h, targets,
                                     self.config.loss_chunks)
        return sum_cross_entropy(self.lm_head(self.ln_f(h)), targets)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """GPT-2 initialisation, identical for a given seed whatever the device or layout.

        Each tensor is drawn on the CPU from a generator seeded by (seed, parameter name),
        so a pipeline stage or a sharded copy gets exactly the values the full model would.
        Residual projections are scaled by 1/sqrt(2 * n_layer) (GPT-2 paper, §2.3).
        """
        std = self.config.init_std
        for name, p in self.named_parameters():
            # A last pipeline stage has the head without the embedding it is tied to:
            # give its copy the embedding's values (parallel/pipeline_step.py).
            name = "wte.weight" if name == "lm_head.weight" and self.wte is None else name
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                values = torch.zeros(p.shape)
            elif ".ln_" in name or name.startswith("ln_"):
                values = torch.ones(p.shape)
            else:
                s = std / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else std
                values = torch.empty(p.shape).normal_(0.0, s, generator=seeded_generator(seed, name))
            copy_into(p, values)


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose stream depends only on the seed and the parameter's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def copy_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full CPU tensor into a parameter, which may be a sharded DTensor."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if isinstance(p, DTensor):
        # Every rank drew the full tensor: cut this rank's shard locally (no scatter).
        full = distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements,
                                 src_data_rank=None)
        p.to_local().copy_(full.to_local())
    else:
        p.copy_(full.to(device=p.device, dtype=p.dtype))


def _attend(attn: nn.Module, x: torch.Tensor, kv: tuple | None):
    """CausalSelfAttention on (B, T, D) new positions given cached (k, v) or None."""
    B, T, D = x.shape
    qkv = attn.c_attn(x)
    d_local = qkv.shape[-1] // 3  # head count from the projection's output, as gpt.py
    n_head = attn.n_head * d_local // D
    q, k, v = qkv.split(d_local, dim=2)
    q, k, v = (t.view(B, T, n_head, d_local // n_head).transpose(1, 2) for t in (q, k, v))
    if kv is not None:
        k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)  # (B, H, S, Dh)
    if kv is not None and T > 1:
        raise ValueError("cached decoding feeds one token at a time after the prefill")
    # Prefill: causal over the prompt. One new token: it may see every cached position.
    y = F.scaled_dot_product_attention(q, k, v, is_causal=kv is None and T > 1)
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, d_local)), (k, v)


def forward_cached(model: nn.Module, idx: torch.Tensor, cache: list, pos0: int) -> torch.Tensor:
    """KV-cache decoding (generate.py, `ModelSpec.decode`): logits (B, T, V) of `idx` at
    positions pos0.. given `cache` (updated in place: one (k, v) per block, or None
    before the prefill). Eval mode (no dropout) only; re-states CausalSelfAttention's
    data flow over the block's own submodules."""
    T = idx.shape[1]
    pos = torch.arange(pos0, pos0 + T, device=idx.device)
    x = model.wte(idx) + model.wpe(pos)
    for i, block in enumerate(model.blocks.values()):
        h, cache[i] = _attend(block.attn, block.ln_1(x), cache[i])
        x = x + h
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.ln_f(x))


def gpt_flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, app. B).

    N counts every parameter that takes part in a matmul per token: all of them except
    the position table (the tied head is counted once, through `wte`).
    """
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("wpe"))
    return 6 * n + 12 * c.n_layer * c.n_head * (c.d_model // c.n_head) * seq_len
