"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, arXiv:2106.09685).

A target `nn.Linear` W (out, in) becomes `LoRALinear`: y = W x + b + (alpha / r) · B A x
with A (r, in) ~ Kaiming-uniform and B (out, r) = 0, so the converted model computes
exactly what the base model did until B is trained (paper §4.1). Only A and B train;
the base weight stays frozen and is not saved with the adapters (the run's `init.from`
says where it comes from). `merge_lora` folds B A back into W for export and serving.

The wrapped layer keeps the base `nn.Linear` as `.base`, so adapter names are
`<layer>.lora_A` / `<layer>.lora_B` and the base weight is `<layer>.base.weight`;
`merge_lora` restores the original names.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.errors import ConfigError
from scaletrain.models.gpt import copy_into, seeded_generator


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-r update (alpha / r) · B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank  # paper §4.1: scale by alpha / r, so r can change
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        # As peft / the reference loralib: A like a Linear's default init, B zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout)
        # False inside `adapters_disabled`: the layer is its base (DPO's reference model).
        self.adapters_enabled = True
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` (attention head count)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapters_enabled:
            return self.base(x)
        # (..., in) -> (..., r) -> (..., out): two thin matmuls, never the (out, in) delta.
        return self.base(x) + F.linear(F.linear(self.drop(x), self.lora_A),
                                       self.lora_B) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear with W + (alpha / r) B A (the base module, updated in place)."""
        with torch.no_grad():
            # In float64, rounded once into the weight's dtype: W + s·B A exactly rounded.
            delta = (self.lora_B.double() @ self.lora_A.double()) * self.scaling
            self.base.weight.copy_((self.base.weight.double() + delta).to(self.base.weight.dtype))
        self.base.weight.requires_grad_(True)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(True)
        return self.base


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str],
               dropout: float = 0.0) -> nn.Module:
    """Convert in place: freeze every parameter, wrap each target Linear with LoRA.

    `targets` are last name components of the family's linears (GPT: 'c_attn',
    'c_proj', 'c_fc'; llama: 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
    'up_proj', 'down_proj', as in PEFT); the tied output head is never wrapped (it is
    the embedding). Raises ConfigError if nothing matched.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    hits = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                hits.append(f"{name}.{child_name}" if name else child_name)
    if not hits:
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and n.startswith("blocks.")})
        raise ConfigError(f"finetune.lora_targets={targets} matches no linear layer of the "
                          f"model (its block layers: {', '.join(names)})")
    return model


def init_adapters(model: nn.Module, seed: int) -> None:
    """Draw every LoRA layer's A (Kaiming-uniform with a = sqrt(5), as `__init__` and
    peft do) from a CPU generator seeded by (seed, its name) and set B to zero, whole,
    then copy this rank's shard (models/gpt.py `copy_into`): the same adapters on one
    process, DDP and FSDP2 (DESIGN.md §5). The trainer converts the model on `meta`
    before sharding it (finetune/init_from.py `converter`), where `__init__` drew
    nothing, so this is where the adapters get their values."""
    with torch.no_grad():  # an in-place write into (possibly sharded) leaf parameters
        _init_adapters(model, seed)


def _init_adapters(model: nn.Module, seed: int) -> None:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            a = torch.empty(tuple(m.lora_A.shape))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5),
                                     generator=seeded_generator(seed, f"{name}.lora_A"))
            copy_into(m.lora_A, a)
            copy_into(m.lora_B, torch.zeros(tuple(m.lora_B.shape)))


def base_names(model: nn.Module) -> dict[str, str]:
    """{state-dict name of a LoRA layer's base tensor: its name in the plain model}
    ('blocks.0.attn.c_attn.base.weight' -> 'blocks.0.attn.c_attn.weight'), so trained
    weights load into a model converted before they arrive."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for leaf, _ in m.base.named_parameters():
                out[f"{name}.base.{leaf}"] = f"{name}.{leaf}"
    return out


def is_adapter(key: str) -> bool:
    """Whether state-dict `key` is a LoRA adapter tensor (A or B)."""
    return key.endswith((".lora_A", ".lora_B"))


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, every LoRA layer of `model` computes its frozen base alone: the model is
    the base model (peft's `disable_adapter`), e.g. DPO's reference, without a copy."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.adapters_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.adapters_enabled = True


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (what a LoRA run saves)."""
    return {k: v for k, v in model.state_dict().items()
            if k.endswith(".lora_A") or k.endswith(".lora_B")}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain `nn.Linear` layers
    (in place; returns the model). Logits are unchanged up to float rounding."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def freeze(model: nn.Module, patterns: list[str]) -> int:
    """Set requires_grad=False on parameters matching any fnmatch pattern; returns how
    many tensors were frozen. Raises ConfigError for a pattern that matches nothing."""
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ConfigError(f"finetune.freeze pattern '{pat}' matches no parameter "
                              f"(names look like {names[0]}, {names[-1]})")
    count = 0
    for n, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(n, pat) for pat in patterns):
            p.requires_grad_(False)
            count += 1
    return count


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (tied tensors counted once)."""
    seen, train, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return train, total


def adapter_only(state: dict) -> dict:
    """The adapter entries of a state dict if it has any (a LoRA model saves and loads
    only those), else the state dict unchanged."""
    adapters = {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))}
    return adapters or state


def merge_adapter_state(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor],
                        rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """The plain weights of a LoRA run from its base's (`base`, plain names) and its
    saved adapters: W + (alpha / r) B A per adapted layer, computed as `merged` does (in
    float64, rounded once), so they equal `merge_lora` of the loaded run. KeyError
    naming the tensor when an adapter has no base weight or no partner."""
    out = dict(base)
    for key in adapters:
        if not key.endswith(".lora_A"):
            continue
        layer = key[:-len(".lora_A")]
        a, b, w = adapters[key], adapters[f"{layer}.lora_B"], out[f"{layer}.weight"]
        delta = (b.double() @ a.double()) * (alpha / rank)
        out[f"{layer}.weight"] = (w.double() + delta).to(w.dtype)
    return out


def merge_lora_run(cfg, model: nn.Module) -> nn.Module:
    """Merge a loaded LoRA run's adapters for export and mark its config as plain
    weights (finetune.lora_rank = 0), so the exported directory loads as a dense model."""
    if has_lora(model):
        merge_lora(model)
        cfg.finetune.lora_rank = 0
    return model
