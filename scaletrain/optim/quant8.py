"""Block-wise 8-bit quantisation of optimizer moments (Dettmers et al. 2022, "8-bit
Optimizers via Block-wise Quantization"): the dynamic code maps, nearest-code rounding
by a table look-up on the fp32 bits, and the quantise / dequantise kernels (eager, or
inside AdamW8bit's torch.compile'd step). Used by optim/adamw8bit.py."""

from __future__ import annotations

import torch


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted codes in [-1, 1] (signed) or [0, 1] of the dynamic quantisation map.

    Same values as `bitsandbytes.functional.create_dynamic_map(signed, 7, 8)`: for each
    decade 10^(i-6), i = 0..6, 2^i (signed) or 2^(i+1) (unsigned) codes at the midpoints
    of a linear split of [0.1, 1] times that decade; plus 0 and 1.
    """
    data: list[float] = []
    for i in range(7):
        n = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float64)
        means = ((bounds[:-1] + bounds[1:]) / 2.0 * 10.0 ** (i - 6)).tolist()
        data += means + ([-m for m in means] if signed else [])
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def _nearest_table(mid: torch.Tensor) -> torch.Tensor:
    """T[k] = #{mid < lo_k} for each fp32 bucket k = bits(y) >> 15 of y in [0, 1].

    A bucket holds the floats sharing sign, exponent and the top 8 mantissa bits (relative
    width 2^-8 = 0.39%). The relative gap between neighbouring codes is >= 0.7% (the top
    decade of the unsigned map), so a bucket holds at most one midpoint (asserted) and
    #{mid < y} = T[k] + (mid[T[k]] < y): the nearest code by two table look-ups and a
    compare, ~10x faster on CPU than torch.bucketize's binary search."""
    n = (int(torch.tensor(1.0).view(torch.int32)) >> SHIFT) + 2
    lo = (torch.arange(n, dtype=torch.int32) << SHIFT).view(torch.float32)
    table = torch.bucketize(lo, mid)  # right=False: #{mid < lo}
    assert (torch.bucketize(lo[1:], mid) - table[:-1]).max() <= 1  # <= 1 midpoint each
    return table.to(torch.int32)


SHIFT = 15  # 23 mantissa bits - 8 kept


TINY = torch.finfo(torch.float32).tiny  # scale of an all-zero block: codes 0, no 0/0


def _encode(xb: torch.Tensor, table: torch.Tensor, mid: torch.Tensor,
            signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-block absmax) of xb (blocks, b); codes int8 = index - 128, or uint8."""
    s = xb.abs().amax(1).clamp_min(TINY)
    y = xb / s[:, None]
    a = y.abs() if signed else y
    # Nearest magnitude code (see _nearest_table). NaN (a non-finite gradient) indexes
    # past the table: clamped; the update is NaN anyway and the trainer reports it.
    t = table[(a.view(torch.int32) >> SHIFT).clamp_max(table.numel() - 1)]
    t = t + (mid[t] < a).to(torch.int32)
    if signed:  # sorted index 127 + t for y >= 0, 127 - t for y < 0 (no -1.0 code), - 128
        return torch.where(y < 0, -t.clamp_max(127), t).sub(1).to(torch.int8), s
    return t.to(torch.uint8), s


def _decode(qb: torch.Tensor, s: torch.Tensor, code: torch.Tensor,
            offset: int) -> torch.Tensor:
    """fp32 values of codes qb (blocks, b) with per-block scales s (blocks,)."""
    return code[qb.to(torch.int32) + offset] * s[:, None]


class _Codec:
    """Block-wise quantise / dequantise with one code map (fp32 in, 8-bit codes out).

    Rounding is to the nearest code, exact ties to the code nearer zero: the same codes
    as `torch.bucketize(y, midpoints)` but for ties between negative codes
    (tests/unit/test_adamw8bit.py checks it)."""

    def __init__(self, signed: bool):
        self.code = dynamic_map(signed)
        self.signed = signed
        self.dtype = torch.int8 if signed else torch.uint8
        # int8 storage holds code index - 128 (codes are sorted, so q keeps the order).
        self.offset = 128 if signed else 0
        # Look-ups over the magnitudes [0, ..., 1]: the signed map's non-negative half.
        mag = self.code[127:] if signed else self.code
        mid = (mag[1:] + mag[:-1]) / 2
        self.mid = torch.cat([mid, torch.tensor([float("inf")])])  # mid[T] never overflows
        self.table = _nearest_table(mid)

    def quantize_(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                  b: int) -> None:
        """q, scale <- codes and per-block absmax of x (x: any shape, numel % b == 0)."""
        # (blocks, b): b divides the row length, so rows hold whole blocks.
        codes, s = _encode(x.view(-1, b), self.table, self.mid, self.signed)
        q.view(-1).copy_(codes.view(-1))
        scale.view(-1).copy_(s)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, b: int) -> torch.Tensor:
        """fp32 values of codes q (shape of q) with per-block scales."""
        return _decode(q.view(-1, b), scale.view(-1), self.code, self.offset).view(q.shape)


SIGNED, UNSIGNED = _Codec(signed=True), _Codec(signed=False)
