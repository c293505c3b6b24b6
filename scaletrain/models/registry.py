"""Models by name: how to build each one and what it costs per token or sample."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from scaletrain.config.model_checks import check_gpt, check_llama
from scaletrain.config.schema import ModelConfig
from scaletrain.models.contract import PipelineSplit, TiedPairs, tie
from scaletrain.models.gpt import GPT, GPTConfig, gpt_flops_per_token
from scaletrain.models.gpt import forward_cached as gpt_forward_cached
from scaletrain.models.gpt_hf import GPT_HF
from scaletrain.models.hf_map import HFMap
from scaletrain.models.llama import Llama, LlamaConfig, llama_flops_per_token
from scaletrain.models.llama import forward_cached as llama_forward_cached
from scaletrain.models.llama_hf import LLAMA_HF
from scaletrain.models.plans import gpt_tp_plan, llama_tp_plan
from scaletrain.models.prune_units import gpt_prune_units, llama_prune_units
from scaletrain.models.vision import CNN, MLP


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "text" (targets are next tokens) or "image" (targets are class labels)
    build: Callable[[ModelConfig, dict], nn.Module]  # (model config, data facts) -> module
    flops_per_token: Callable[[nn.Module, int], float] | None = None
    # Family contract (models/contract.py): (head, embedding) parameter pairs that are one
    # tensor — or, for a family where tying is a config choice, a function of the model
    # config giving them (resolved by spec_of) — and how the model splits into pipeline
    # stages (None = no pipeline).
    tied: TiedPairs | Callable[[ModelConfig], TiedPairs] = ()
    pipeline: PipelineSplit | None = None
    # Tensor-parallel plan: (model, loss_parallel=, sequence_parallel=) -> {path: style}
    # for parallelize_module (models/plans.py); None = the family has no TP.
    tp_plan: Callable[..., dict] | None = None
    # The sizes the plan splits over tp ranks: model config -> ((what, size), ...), each
    # of which tp must divide (parallel/tensor.py check_tp; the vocabulary is checked
    # for every family with a plan).
    tp_sizes: Callable[[ModelConfig], tuple] | None = None
    # What the plan measures its activations on (plan/activations.py): (model built on
    # meta, samples, seq_len, layer) -> (transformer block `layer`, its forward's inputs
    # on meta, requires_grad as in training: the residual stream yes, rotary angles no);
    # None = no blocks to measure (the image families).
    activation_block: Callable[[nn.Module, int, int], tuple] | None = None
    # The family's own config rules (model config -> None, or ConfigError naming the
    # fields), run by config/checks.py before anything is built (config/model_checks.py,
    # whose FAMILY_RULES repeat `kind` and blocks-or-not for validation).
    check: Callable[[ModelConfig], None] | None = None
    # Hugging Face checkpoints in and out (models/hf_map.py); None = no HF format.
    hf: HFMap | None = None
    # The model.* fields a weights source (init.from) fixes: what the weights' shapes
    # and values mean. The others (dropout, ...) stay the new run's — a llama's seq_len
    # too: RoPE has no position table, so the weights fix no context length.
    source_fields: tuple[str, ...] = ()
    # KV-cache decoding (generate.py): (model, idx (B, T), cache (one (k, v) or None per
    # block, updated in place), pos0) -> logits (B, T, V); None = re-run the context.
    decode: Callable[..., torch.Tensor] | None = None
    # Structured pruning (compress/prune.py): (block, model.config) -> PruneUnits, the
    # rows / columns of each attention unit and MLP channel (models/prune_units.py).
    prune_units: Callable | None = None


def built_chunks(m: ModelConfig) -> int:
    """The model's loss_chunks: model.loss_chunks once a run resolved it
    (models/loss_chunks_auto.py); an unresolved auto (-1: a model built outside a
    training run, e.g. to generate or export) keeps the whole logits."""
    return max(0, m.loss_chunks)


def _build_gpt(m: ModelConfig, facts: dict) -> GPT:
    return GPT(GPTConfig(vocab_size=m.vocab_size or facts["vocab_size"], seq_len=m.seq_len,
                         n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model, d_ff=m.d_ff,
                         dropout=m.dropout, bias=m.bias, init_std=m.init_std,
                         loss_chunks=built_chunks(m)))


def _gpt_block(model: GPT, samples: int, seq_len: int, layer: int = 0) -> tuple:
    """Block `layer` and its input, the (B, T, D) residual stream."""
    return model.blocks[str(layer)], (torch.empty(samples, seq_len, model.config.d_model,
                                                  device="meta", requires_grad=True),)


def _build_llama(m: ModelConfig, facts: dict) -> Llama:
    return Llama(LlamaConfig(
        vocab_size=m.vocab_size or facts["vocab_size"], seq_len=m.seq_len, n_layer=m.n_layer,
        n_head=m.n_head, n_kv_head=m.n_kv_head, head_dim=m.head_dim, d_model=m.d_model,
        d_ff=m.d_ff, norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        rope_scaling=m.rope_scaling, rope_factor=m.rope_factor,
        rope_low_freq_factor=m.rope_low_freq_factor,
        rope_high_freq_factor=m.rope_high_freq_factor,
        rope_original_seq_len=m.rope_original_seq_len, qkv_bias=m.qkv_bias,
        qk_norm=m.qk_norm, tie_embeddings=m.tie_embeddings, dropout=m.dropout,
        init_std=m.init_std, loss_chunks=built_chunks(m),
        **{f: getattr(m, f) for f in MOE_FIELDS}))


def _llama_tied(m: ModelConfig) -> TiedPairs:
    return (("lm_head.weight", "embed_tokens.weight"),) if m.tie_embeddings else ()


def _llama_block(model: Llama, samples: int, seq_len: int, layer: int = 0) -> tuple:
    """Block `layer` (an MoE llama's blocks differ: dense or MoE) and its inputs: the
    (B, T, D) residual stream and the rotary angles."""
    x = torch.empty(samples, seq_len, model.config.d_model, device="meta",
                    requires_grad=True)  # the residual stream; the angles need no grad
    return model.blocks[str(layer)], (x, *model.rope(seq_len, "meta", x.dtype))


def _gpt_tp_sizes(m: ModelConfig) -> tuple:
    return (("model.n_head", m.n_head), ("model.d_ff (4*d_model if 0)", m.d_ff or 4 * m.d_model))


def _llama_tp_sizes(m: ModelConfig) -> tuple:
    ff = LlamaConfig(vocab_size=0, d_model=m.d_model, d_ff=m.d_ff).ff
    sizes = (("model.n_head", m.n_head),
             ("model.n_kv_head (n_head if 0)", m.n_kv_head or m.n_head),
             ("model.d_ff (the Llama rule from d_model if 0)", ff))
    if m.moe_experts and m.moe_shared_experts:  # sharded as the dense MLP (plans.py)
        sizes += (("the shared experts' width (model.moe_shared_experts × moe_d_ff)",
                   m.moe_shared_experts * (m.moe_d_ff or ff)),)
    return sizes


def _build_mlp(m: ModelConfig, facts: dict) -> MLP:
    return MLP(facts["input_shape"], facts["num_classes"], m.hidden, m.dropout)


def _build_cnn(m: ModelConfig, facts: dict) -> CNN:
    return CNN(facts["input_shape"], facts["num_classes"], m.channels, m.n_blocks, m.dropout)


GPT_SOURCE_FIELDS = ("name", "n_layer", "n_head", "d_model", "d_ff", "seq_len", "vocab_size",
                     "bias")
# The model.moe_* fields a llama's MoE layers are built from (LlamaConfig has the same).
MOE_FIELDS = ("moe_experts", "moe_top_k", "moe_d_ff", "moe_shared_experts", "moe_every",
              "moe_first_dense", "moe_router", "moe_norm_topk_prob", "moe_aux_loss",
              "moe_z_loss", "moe_capacity_factor")
LLAMA_SOURCE_FIELDS = ("name", "n_layer", "n_head", "n_kv_head", "head_dim", "d_model", "d_ff",
                       "vocab_size", "norm_eps", "rope_theta", "rope_scaling", "rope_factor",
                       "rope_low_freq_factor", "rope_high_freq_factor",
                       "rope_original_seq_len", "qkv_bias", "qk_norm", "tie_embeddings",
                       "hf_architecture", "moe_experts", "moe_top_k", "moe_d_ff",
                       "moe_shared_experts", "moe_every", "moe_first_dense", "moe_router",
                       "moe_norm_topk_prob")

REGISTRY: dict[str, ModelSpec] = {
    "gpt": ModelSpec("gpt", "text", _build_gpt, gpt_flops_per_token,
                     tied=(("lm_head.weight", "wte.weight"),),
                     pipeline=PipelineSplit(first=("wte", "wpe"), last=("ln_f", "lm_head")),
                     tp_plan=gpt_tp_plan, tp_sizes=_gpt_tp_sizes, activation_block=_gpt_block,
                     check=check_gpt, hf=GPT_HF, source_fields=GPT_SOURCE_FIELDS,
                     decode=gpt_forward_cached, prune_units=gpt_prune_units),
    "llama": ModelSpec("llama", "text", _build_llama, llama_flops_per_token,
                       tied=_llama_tied,
                       pipeline=PipelineSplit(first=("embed_tokens",), last=("norm", "lm_head")),
                       tp_plan=llama_tp_plan, tp_sizes=_llama_tp_sizes,
                       activation_block=_llama_block, check=check_llama, hf=LLAMA_HF,
                       source_fields=LLAMA_SOURCE_FIELDS, decode=llama_forward_cached,
                       prune_units=llama_prune_units),
    "mlp": ModelSpec("mlp", "image", _build_mlp),
    "cnn": ModelSpec("cnn", "image", _build_cnn),
}


def spec_for(name: str) -> ModelSpec:
    """The registered family called `name` (model.name), as registered: its config-
    dependent facts unresolved (use spec_of for a model config)."""
    return REGISTRY[name]


def spec_of(m: ModelConfig) -> ModelSpec:
    """The family of model config `m`, with its facts that depend on the config (tied
    pairs) resolved."""
    spec = REGISTRY[m.name]
    if callable(spec.tied):
        spec = dataclasses.replace(spec, tied=spec.tied(m))
    return spec


def build_model(m: ModelConfig, facts: dict, *, seed: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, init: bool = True) -> nn.Module:
    """Construct on `meta` (no memory), materialise on `device`, then initialise;
    `init=False`: the caller's loader writes every parameter next (see `materialize`)."""
    spec = spec_of(m)
    with torch.device("meta"):
        model = spec.build(m, facts)
    materialize(model, device, seed, tied=spec.tied, init=init)
    return model.to(dtype=dtype)


def materialize(model: nn.Module, device: torch.device | str, seed: int, *,
                tied: TiedPairs, init: bool = True) -> None:
    """Allocate a meta-built (possibly sharded) model on `device` and run its init;
    `tied`: its family's tied pairs (ModelSpec.tied).

    `init=False`: a loader is about to write every parameter (init.from, which checks
    that it does: finetune/init_from.py `writes_every_weight`; loading a finished run,
    artefact or HF directory: compress/artefact.py), so the seeded init is
    skipped and the parameters stay uninitialised until then. The init draws each
    parameter whole before cutting this rank's shard, so skipping it is what keeps a
    rank of a sharded load near its shard's size (bench/hf_load.py). A model with
    buffers (MoE's expert_bias) is still initialised: only its init sets them."""
    model.to_empty(device=device)
    tie(model, tied)  # to_empty gives each module its own tensor; re-share
    if init or any(True for _ in model.buffers()):
        model.init_weights(seed)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
