"""Precision policies: what dtype the parameters live in, the autocast context of the
forward, and the gradient scaler. One object chosen from `precision.dtype`, so the step
has no precision `if`s (DESIGN.md principle 8).

- fp32 / fp64: parameters and compute in that dtype (fp64 for verification runs).
- bf16: fp32 master parameters, bf16 autocast of the forward.
- fp16: fp32 master parameters, fp16 autocast, dynamic loss scaling (`torch.amp.GradScaler`).
- bf16-pure: bf16 parameters and compute; the optimizer runs on fp32 master copies and
  keeps fp32 state (optim/master_weights.py), so updates below a bf16 ulp accumulate.

The loss is always computed in fp32 (see models/losses.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_PARAM_DTYPE = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.float32,
                "fp16": torch.float32, "bf16-pure": torch.bfloat16}
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_bytes(precision: str) -> tuple[int, int]:
    """(parameter bytes, compute/activation bytes) of a precision.dtype."""
    return {"fp32": (4, 4), "fp64": (8, 8), "bf16": (4, 2), "fp16": (4, 2),
            "bf16-pure": (2, 2)}[precision]


@dataclass
class PrecisionPolicy:
    name: str
    device: torch.device

    @property
    def param_dtype(self) -> torch.dtype:
        return _PARAM_DTYPE[self.name]

    @property
    def compute_dtype(self) -> torch.dtype:
        return _AUTOCAST_DTYPE.get(self.name, self.param_dtype)

    def autocast(self):
        """The context the forward runs in (a no-op unless autocasting)."""
        if self.name in _AUTOCAST_DTYPE:
            return torch.autocast(device_type=self.device.type, dtype=_AUTOCAST_DTYPE[self.name])
        return contextlib.nullcontext()

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        """Floating-point model inputs (images) in the parameter dtype (fp64, bf16-pure);
        token ids and autocast runs are left as they are."""
        if x.is_floating_point() and x.dtype != self.param_dtype:
            return x.to(self.param_dtype)
        return x

    @property
    def master_weights(self) -> bool:
        """Whether the optimizer must keep fp32 master copies of the parameters."""
        return self.param_dtype in (torch.bfloat16, torch.float16)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """Dynamic loss scaling for fp16, whose 5-bit exponent underflows small gradients."""
        if self.name == "fp16":
            return torch.amp.GradScaler(self.device.type)
        return None
