"""Weight normalisation of linear layers, as a model converter (`convert(model)`).

w = g · v / ‖v‖ per output row (Salimans & Kingma 2016), through torch's
`torch.nn.utils.parametrizations.weight_norm`: the layer keeps its interface, the
parameters become `<layer>.parametrizations.weight.original0` (g, shape (out, 1)) and
`.original1` (v). Initialised from the current weights, so the converted model computes
exactly what the original did until the first update.

Linear layers whose weight is shared with an embedding (the GPT's tied `lm_head`) are
left alone: parametrising one side of a tie would untie it. Applied after the weights
are initialised and before the optimizer is built; not combined with parallel layouts
(DDP/FSDP register the parameters before it would replace them; see config/strategy_checks.py).
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.utils.parametrizations import weight_norm


def apply_weight_norm(model: nn.Module) -> nn.Module:
    """Weight-normalise every `nn.Linear` of `model` not tied to an embedding (in place)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in list(model.modules()):
        if isinstance(module, nn.Linear) and id(module.weight) not in tied:
            weight_norm(module, name="weight", dim=0)
    return model


def convert(model: nn.Module, enabled: bool) -> nn.Module:
    """The trainer's hook: `apply_weight_norm` when `model.weight_norm` is set."""
    return apply_weight_norm(model) if enabled else model
