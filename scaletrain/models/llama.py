"""A Llama-style decoder (Llama 3, Qwen 2.5 / 3, Mistral) as a plain `nn.Module`.

Architecture (Touvron et al. 2023; Llama 3, Dubey et al. 2024): token embedding, pre-norm
blocks of RMSNorm -> grouped-query causal self-attention with rotary position embeddings
(RoPE, Su et al. 2021) -> RMSNorm -> SwiGLU MLP (Shazeer 2020), a final RMSNorm and an
output head (tied to the embedding where `tie_embeddings`). No biases except the optional
q/k/v ones (Qwen2); Qwen3 adds an RMSNorm over each head of q and k (`qk_norm`).

Parameter names are transformers' `LlamaForCausalLM` names with `model.layers.<i>` ->
`blocks.<i>` and the `model.` prefix dropped (`embed_tokens`, `norm`; `lm_head` as is), so
the Hugging Face name map is a prefix rewrite and LoRA targets read as they do in PEFT
(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).

Shaped like models/gpt.py for outside-in parallelism: blocks in a `ModuleDict` keyed
"0".."n-1", parts a pipeline stage deleted are None and skipped, built on `meta` and
initialised per parameter name from the seed. Nothing here is a buffer: the rotary
angles are recomputed from the config in each forward (a (T, head_dim) outer product,
negligible beside the matmuls, and constant-folded under compile), so there is no state
that `to_empty`, a dtype cast or a pipeline split could leave stale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.models.chunked_loss import chunked_head_loss
from scaletrain.models.documents import document_mask, document_positions, masked_attention
from scaletrain.models.gpt import copy_into, seeded_generator
from scaletrain.models.losses import sum_cross_entropy
from scaletrain.config.model_checks import is_moe_layer
from scaletrain.models.moe import MoE, MoeSettings


@dataclass
class LlamaConfig:
    vocab_size: int
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0 -> n_head (multi-head attention)
    head_dim: int = 0  # 0 -> d_model // n_head
    d_model: int = 128
    d_ff: int = 0  # 0 -> the Llama rule: 2/3 of 4 * d_model, rounded up to a multiple of 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1 frequency scaling ("llama3"), or "none".
    rope_scaling: str = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_seq_len: int = 8192
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    loss_chunks: int = 0  # head + loss over this many sequence chunks (0: whole, chunked_loss.py)
    # Mixture of experts (models/moe.py); 0 experts = dense.
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_d_ff: int = 0  # 0 -> ff
    moe_shared_experts: int = 0
    moe_every: int = 1
    moe_first_dense: int = 0
    moe_router: str = "softmax"
    moe_norm_topk_prob: bool = True
    moe_aux_loss: float = 0.0
    moe_z_loss: float = 0.0
    moe_capacity_factor: float = 0.0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ff(self) -> int:
        return self.d_ff or 64 * math.ceil(int(8 * self.d_model / 3) / 64)

    def is_moe(self, i: int) -> bool:
        return is_moe_layer(i, self.moe_experts, self.moe_every, self.moe_first_dense)

    @property
    def moe(self) -> MoeSettings:
        return MoeSettings(self.moe_experts, self.moe_top_k, self.moe_d_ff or self.ff,
                           self.moe_router, self.moe_norm_topk_prob, self.moe_aux_loss,
                           self.moe_z_loss, self.moe_capacity_factor)


def inv_frequencies(c: LlamaConfig, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies (head_dim / 2,), fp32, with Llama 3's scaling if set
    (transformers' `_compute_llama3_parameters`: long wavelengths slowed by `factor`,
    short ones kept, a smooth ramp between)."""
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.hd, 2, device=device,
                                               dtype=torch.float32) / c.hd))
    if c.rope_scaling != "llama3":
        return inv
    low_wavelen = c.rope_original_seq_len / c.rope_low_freq_factor
    high_wavelen = c.rope_original_seq_len / c.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / c.rope_factor, inv)
    smooth = ((c.rope_original_seq_len / wavelen - c.rope_low_freq_factor)
              / (c.rope_high_freq_factor - c.rope_low_freq_factor))
    smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary(c: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(cos, sin), each (T, head_dim) or (B, T, head_dim) for `positions` (T,) / (B, T),
    computed in fp32 and cast to the activations' dtype (as transformers does)."""
    freqs = positions.to(torch.float32)[..., None] * inv_frequencies(c, positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd) rotated by angles (T, hd) or (B, T, hd) (GPT-NeoX half split, the
    layout transformers' Llama checkpoints use)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.kv_heads * c.hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.kv_heads * c.hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.hd, c.d_model, bias=False)
        self.q_norm = nn.RMSNorm(c.hd, eps=c.norm_eps) if c.qk_norm else None
        self.k_norm = nn.RMSNorm(c.hd, eps=c.norm_eps) if c.qk_norm else None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        """(B, T, D) -> rotated q (B, Hq, T, hd) and k, v (B, Hkv, T, hd). Head counts
        are read from the projections' outputs, so a tensor-parallel shard (its local
        heads, parallel/tensor.py) runs unchanged."""
        B, T, _ = x.shape
        hd = self.c.hd
        q, k, v = (p(x).view(B, T, -1, hd) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               causal: bool, mask=None) -> torch.Tensor:
        """SDPA over grouped heads -> the output projection, (B, T, D). `mask`: a bool
        SDPA mask or a FlexAttention BlockMask (models/documents.py), replacing causal."""
        B, _, T, hd = q.shape
        dropout = self.c.dropout if self.training else 0.0
        if mask is None and not causal:  # a cached decode step attends to all of the cache
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout,
                                               enable_gqa=q.shape[1] != k.shape[1])
        else:
            y = masked_attention(q, k, v, mask, dropout_p=dropout)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.attend(q, k, v, causal=True, mask=mask)


class SwiGLU(nn.Module):
    def __init__(self, c: LlamaConfig, width: int = 0):
        super().__init__()
        ff = width or c.ff
        self.gate_proj = nn.Linear(c.d_model, ff, bias=False)
        self.up_proj = nn.Linear(c.d_model, ff, bias=False)
        self.down_proj = nn.Linear(ff, c.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def feed_forward(c: LlamaConfig, i: int) -> nn.Module:
    """Block i's `mlp`: the dense SwiGLU, or an MoE layer (its shared experts one SwiGLU
    of n_shared · moe_d_ff, as DeepSeek builds them)."""
    if not c.is_moe(i):
        return SwiGLU(c)
    s = c.moe
    shared = SwiGLU(c, c.moe_shared_experts * s.d_ff) if c.moe_shared_experts else None
    return MoE(c.d_model, s, shared)


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, i: int = 0):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.mlp = feed_forward(c, i)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The rotary angles (cos, sin) are computed once per forward by the model and
        passed to every block as plain tensors (so wrappers — activation checkpointing,
        FSDP, compile — see ordinary tensor arguments)."""
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Llama(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        if c.n_head % c.kv_heads:
            raise ValueError(f"n_head={c.n_head} must be a multiple of n_kv_head={c.kv_heads}")
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleDict({str(i): Block(c, i) for i in range(c.n_layer)})
        self.norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, T: int, device, dtype, positions: torch.Tensor | None = None) -> tuple:
        """Rotary angles for positions 0..T-1, or the given (T,) / (B, T) position ids
        (packed documents restart theirs; the KV cache continues from its length)."""
        if positions is None:
            positions = torch.arange(T, device=device)
        return rotary(self.config, positions, dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) logits; a pipeline stage passes hidden states.
        With `targets` (B, T): the fp32 cross-entropy summed over targets (losses.py).
        `positions`: position ids (default 0..T-1); `mask`: a boolean attention mask
        (True = may attend) broadcastable to (B, H, T, T), replacing the causal one.
        `doc_ids` (B, T) (data.document_masking, models/documents.py): the document mask
        and per-document positions, unless `mask` / `positions` are given."""
        if doc_ids is not None:
            mask = document_mask(doc_ids, dropout=self.config.dropout) if mask is None else mask
            positions = document_positions(doc_ids) if positions is None else positions
        T = idx.shape[1]
        if T > self.config.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds seq_len={self.config.seq_len}")
        x = self.embed_tokens(idx) if self.embed_tokens is not None else idx
        cos, sin = self.rope(T, x.device, x.dtype, positions)
        for block in self.blocks.values():
            x = block(x, cos, sin, mask)
        if targets is not None and self.lm_head is not None:  # a pipeline's last stage too
            return self.head_loss(x, targets)
        if self.norm is not None:
            x = self.norm(x)
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Final hidden states -> summed cross-entropy of the head's logits; with
        `loss_chunks` a chunk of the sequence at a time (models/chunked_loss.py)."""
        if self.config.loss_chunks:
            return chunked_head_loss(self.norm, self.lm_head, h, targets,
                                     self.config.loss_chunks)
        return sum_cross_entropy(self.lm_head(self.norm(h)), targets)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) weights drawn per (seed, parameter name) as in models/gpt.py,
        output projections (o_proj, down_proj) scaled by 1/sqrt(2 * n_layer), norms at one,
        biases at zero: identical values whatever the device or layout. The MoE experts'
        3-D weights are drawn whole like any other (down_proj scaled as an output
        projection); the MoE balancing bias (a buffer) starts at zero."""
        c = self.config
        for name, b in self.named_buffers():
            if name.endswith("expert_bias"):
                copy_into(b, torch.zeros(b.shape))
        for name, p in self.named_parameters():
            # A last pipeline stage with a tied head but no embedding: the embedding's values.
            if name == "lm_head.weight" and c.tie_embeddings and self.embed_tokens is None:
                name = "embed_tokens.weight"
            if name.endswith(".bias"):
                values = torch.zeros(p.shape)
            elif "norm" in name:
                values = torch.ones(p.shape)
            else:
                out_proj = name.endswith(("o_proj.weight", "down_proj.weight",
                                          "experts.down_proj"))
                s = c.init_std / math.sqrt(2 * c.n_layer) if out_proj else c.init_std
                values = torch.empty(p.shape).normal_(0.0, s,
                                                      generator=seeded_generator(seed, name))
            copy_into(p, values)


def forward_cached(model: Llama, idx: torch.Tensor, cache: list, pos0: int) -> torch.Tensor:
    """Logits (B, T, V) of `idx` at positions pos0.. given `cache` (one (k, v) or None per
    block, updated in place; k, v hold n_kv_head heads, so GQA's saving is the cache's).
    The prefill (empty cache) is causal over the prompt; after it, one token at a time."""
    T = idx.shape[1]
    x = model.embed_tokens(idx)
    cos, sin = model.rope(T, x.device, x.dtype, torch.arange(pos0, pos0 + T, device=x.device))
    for i, block in enumerate(model.blocks.values()):
        attn = block.self_attn
        q, k, v = attn.project(block.input_layernorm(x), cos, sin)
        if cache[i] is not None:
            if T > 1:
                raise ValueError("cached decoding feeds one token at a time after the prefill")
            k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
        cache[i] = (k, v)
        x = x + attn.attend(q, k, v, causal=T > 1)
        x = x + block.mlp(block.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))


def llama_flops_per_token(model: Llama, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the matmul parameters (every weight but the embedding
    lookup, the norms and the biases' adds; a tied head counted once, as the matmul it is)
    + attention's 12 · L · Hq · hd · T (PaLM, app. B: QK^T and AV, forward and backward,
    which GQA does not shrink: every query head still attends). MoE experts count as
    ACTIVATED parameters: a token runs top_k of the E routed experts (their 3-D weights
    × top_k / E); the router and shared experts are ordinary weights, run by every token."""
    c = model.config
    matmul = sum(p.numel() for name, p in model.named_parameters()
                 if name.endswith(".weight") and "norm" not in name
                 and not name.startswith("embed_tokens"))
    matmul += sum(p.numel() * c.moe_top_k / c.moe_experts
                  for name, p in model.named_parameters() if ".experts." in name)
    head = 0 if not c.tie_embeddings else c.vocab_size * c.d_model  # tied: counted via embed
    return 6 * (matmul + head) + 12 * c.n_layer * c.n_head * c.hd * seq_len
