"""Quantization of a trained text model (any family: every nn.Linear) for inference.

- `dynamic-int8`: linear layers become torch.ao `DynamicQuantizedLinear` (int8 weights
  with per-output-channel scales; activations quantized per batch at run time; fbgemm /
  x86 int8 GEMM on CPU). `torch.ao.quantization` is deprecated in favour of torchao but
  still ships in torch 2.13; its kernels are the CPU int8 path that needs no extra
  package. The tied token embedding is stored as int8 rows too and dequantized at load
  (a lookup, no matmul), and the output head gets its own int8 copy.
- `weight-int8` / `weight-int4`: weight-only quantization, symmetric, per output channel
  (int8) or per group of `group_size` input columns (int4, two values per byte on disk);
  `QLinear` dequantizes in its forward, so memory shrinks, compute stays fp32.

On disk every artefact is safetensors: `<name>.qweight` (int8, or uint8 nibble pairs
for int4) and `<name>.scale` per quantized matrix, float tensors for the rest.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.models.contract import shared_names

METHODS = ("dynamic-int8", "weight-int8", "weight-int4")


# -- symmetric quantizers (pure tensor functions) --------------------------------------
def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in), fp32 scale (out,): w ≈ q * scale[:, None]."""
    scale = w.abs().amax(dim=1).float().clamp(min=1e-12) / 127.0
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_groups_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> int8 values in [-8, 7] (out, in), fp32 scale (out, in/group)."""
    out, n = w.shape
    if n % group:
        raise ValueError(f"in_features {n} is not a multiple of group_size {group}")
    g = w.float().reshape(out, n // group, group)
    scale = g.abs().amax(dim=2).clamp(min=1e-12) / 7.0
    q = torch.round(g / scale[..., None]).clamp(-8, 7).to(torch.int8)
    return q.reshape(out, n), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of either quantizer (scale (out,) or (out, groups))."""
    out, n = q.shape
    s = scale.float().reshape(out, -1)
    return (q.float().reshape(out, s.shape[1], -1) * s[..., None]).reshape(out, n)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 in [-8, 7], even last dim -> uint8 with two values per byte (low nibble first)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    lo, hi = (p & 0x0F).to(torch.int8) - 8, (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# -- modules ---------------------------------------------------------------------------
class QLinear(nn.Module):
    """Weight-only quantized linear: int8 codes + scales as buffers, dequantized per call."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.out_features, self.in_features = q.shape

    @property
    def weight(self) -> torch.Tensor:
        return _shape_only(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.q, self.scale).to(x.dtype), self.bias)


def _shape_only(out: int, n: int) -> torch.Tensor:
    """A storage-less (meta) tensor of the weight's shape: the GPT attention reads its
    local head count from `c_attn.weight.shape` (models/gpt.py), the structured-pruning
    units theirs from the projections' shapes; nothing reads its values."""
    return torch.empty(out, n, device="meta")


class DynamicInt8Linear(nn.Module):
    """torch.ao's DynamicQuantizedLinear holding exactly the given int8 codes and
    per-channel scales, with a shape-only `.weight` (torch.ao's is a method)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        out, n = q.shape
        self.out_features, self.in_features = out, n
        with warnings.catch_warnings():  # torch.ao's deprecation notices, once per layer
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DQLinear

            self.inner = DQLinear(n, out, bias_=bias is not None, dtype=torch.qint8)
            # The quantized tensor from the codes: no re-rounding through an observer.
            qw = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(out, dtype=torch.long), 0)
            self.inner.set_weight_bias(qw, bias)

    @property
    def weight(self) -> torch.Tensor:
        return _shape_only(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def quantized_state(model: nn.Module, method: str, group: int = 32) -> dict[str, torch.Tensor]:
    """The artefact's tensors: every 2-D weight quantized, the rest as is (fp32)."""
    out = {}
    shared = shared_names(model)  # tied heads (GPT: lm_head.weight is wte.weight)
    # Lookup tables (token / position embeddings, whatever the family calls them) stay
    # int8 rows: a row is read whole, int4 groups would only add error.
    tables = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, t in model.state_dict().items():
        if name in shared:
            continue  # tied to its embedding: stored once
        if t.dim() == 2 and t.is_floating_point():
            base = name[: -len(".weight")]
            if method == "weight-int4" and t.shape[1] % group == 0 and name not in tables:
                q, s = quantize_groups_int4(t, group)
                out[base + ".qweight"], out[base + ".scale"] = pack_int4(q), s.half()
            else:
                q, s = quantize_rows_int8(t)
                out[base + ".qweight"], out[base + ".scale"] = q, s
        else:
            out[name] = t.detach().float().contiguous()
    return out


def _codes(state: dict, base: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = state[base + ".qweight"], state[base + ".scale"].float()
    if q.dtype == torch.uint8:
        q = unpack_int4(q)
    return q, s


def load_quantized(model: nn.Module, state: dict[str, torch.Tensor], method: str) -> nn.Module:
    """Put an artefact's tensors into a freshly built fp32 `model` and swap its linears
    for quantized modules. Returns the model (eval mode).

    A built model carries its family's ties in its tensors (a tied head is its
    embedding: the same parameter under two names, models/contract.py): they are read
    from there, and survive the in-place copy of `load_state_dict`."""
    shared = shared_names(model)
    plain = {}
    for key in list(state):
        if key.endswith(".qweight"):
            base = key[: -len(".qweight")]
            q, s = _codes(state, base)
            plain[base + ".weight"] = dequantize(q, s)
        elif not key.endswith(".scale"):
            plain[key] = state[key]
    model.load_state_dict(plain, strict=False)
    for mod_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{mod_name}.{child_name}" if mod_name else child_name
            # A tied head is quantized as its embedding (stored once, under its name).
            base = shared.get(f"{full}.weight", f"{full}.weight").rpartition(".")[0]
            q, s = _codes(state, base)
            bias = child.bias.detach() if child.bias is not None else None
            if method == "dynamic-int8":
                new = DynamicInt8Linear(q, s, bias)
            else:
                new = QLinear(q, s, bias)
            setattr(module, child_name, new)
    return model.eval()
