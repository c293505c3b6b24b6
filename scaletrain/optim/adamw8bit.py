"""AdamW with 8-bit block-wise quantised moments (`optim.name = "adamw8bit"`).

Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization" (ICLR): each moment
is stored as one byte per value plus one fp32 scale (the block's absolute maximum) per
block of values; every step dequantises the block, runs the ordinary fp32 AdamW update
(decoupled weight decay, Loshchilov & Hutter 2019; the same arithmetic and order as
`torch.optim.AdamW(foreach=True)`) with the new fp32 moments, then requantises them.
The code maps are the paper's *dynamic* (exponent + linear fraction) maps, built exactly
as `bitsandbytes.functional.create_dynamic_map` (which torchao's AdamW8bit also uses):
signed for exp_avg (values down to ~5e-7 of the block max keep their sign and order of
magnitude), unsigned for exp_avg_sq (all 256 codes spent on >= 0). Rounding is to the
nearest code (a table look-up on the fp32 bits; optim/quant8.py holds the codec).

Written by hand because torch has no 8-bit optimizer. torchao 0.18's `AdamW8bit`
installs beside torch 2.13 and steps on CPU, but keeps its state in a tensor subclass
(`OptimState8bit`, not plain tensors for DCP and our checkpoint checks) and compiles its
whole step per parameter shape (~30 s for the first step of one shape here). This class
keeps plain int8/uint8/fp32 tensors, so `state_dict()` and torch.distributed.checkpoint
save and restore it bitwise. It runs eagerly (foreach batches, op for op torch's
foreach AdamW on the dequantised moments) unless asked to compile (`compile=True`,
`optim.implementation = "fused"`): then each 8-bit tensor slice is updated by one
torch.compile'd kernel, the same formulas in another fp32 rounding order (parameters
within ~1e-7 relative of the eager path per step; each path is deterministic, so resume
and layout parity hold within either). Parameters of another dtype than fp32 without a master copy (fp64
verification runs, bf16 without master weights) are updated through an fp32 copy.

Which parameters get 8-bit state (as bitsandbytes' `min_8bit_size`): a parameter with
>= 2 dims, >= `min_8bit_size` (4096) elements, and a row length C = numel / shape[0]
that is <= 256 or a multiple of 256. Its blocks are b = min(C, 256) consecutive values
*within one row*: a block never straddles rows, so an FSDP2 shard (whole rows along dim
0) holds whole blocks, the scales (shape (rows, C/b)) shard along dim 0 like the
parameter, and the state is the same on any number of ranks. Other parameters (biases,
norm scales, tiny or odd-shaped tensors: a negligible share of a model) keep fp32
moments like torch.optim.AdamW.

STATE SIZE, exact bytes (read by `scaletrain plan`; `state_bytes()` computes it):
  8-bit parameter of n elements, block b (b = 256 for any row length multiple of 256):
      exp_avg int8 n + exp_avg_sq uint8 n + two fp32 scale tensors 2 * 4 * n / b
      = n * (2 + 8 / b) bytes = 2.03125 bytes/param at b = 256 (vs 8 for AdamW)
  other parameter of n elements: exp_avg + exp_avg_sq fp32 = 8 bytes/param
  plus a 4-byte fp32 `step` scalar per parameter tensor (as torch's AdamW).
  bf16-pure adds the fp32 master copy, 4 bytes/param (optim/master_weights.py): 6.03125.
  Transient during `step()`: at most CHUNK (2^22) values are dequantised at once, about
  24 bytes each (fp32 moments, denominator, quantiser temporaries): ~100 MB, whatever
  the model size (torch's foreach AdamW needs one fp32 tensor per parameter instead).

Parallel layouts: plain tensors (one process, DDP, pipeline stages) and DTensor
parameters placed Replicate / Shard(0) (FSDP2, HSDP): the update runs on the local
shard and the state is stored as DTensors with the parameter's placements, so DCP saves
each rank's rows. Tensor parallelism (Shard(d) with d > 0) is rejected
(config/strategy_checks.py): a block would straddle the shard boundary.
"""

from __future__ import annotations

import math

import torch

from scaletrain.optim.quant8 import SIGNED, UNSIGNED, _decode, _encode

BLOCK = 256  # values per quantisation block (Dettmers et al. 2022, §2.1)
MIN_8BIT_SIZE = 4096  # bitsandbytes' default min_8bit_size
# Values updated per foreach batch: bounds the step's fp32 transient (dequantised moments,
# denominator, quantiser temporaries: ~24 B/value, ~100 MB) independently of model size.
CHUNK = 1 << 22
QUANT_KEYS = ("exp_avg", "exp_avg_sq")
OWN_KEYS = QUANT_KEYS + ("exp_avg_scale", "exp_avg_sq_scale")  # loaded uncast


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the storage FSDP2 updates in place), else `t`."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _like(p: torch.Tensor, local: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`local` as state of `p`: a DTensor with p's mesh and placements if p is one."""
    if not hasattr(p, "_local_tensor"):
        return local
    from torch.distributed.tensor import DTensor

    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def block_size(shape: tuple[int, ...], min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """The block of a parameter of (global) `shape`; 0 when it keeps fp32 moments."""
    n = math.prod(shape)
    if len(shape) < 2 or n < min_8bit_size or n == 0:
        return 0
    row = n // shape[0]
    if row <= BLOCK:
        return row
    return BLOCK if row % BLOCK == 0 else 0


def state_bytes(shape: tuple[int, ...], min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Exact bytes of the AdamW8bit state of one parameter of `shape` (see docstring)."""
    n, b = math.prod(shape), block_size(shape, min_8bit_size)
    return 4 + (2 * n + 2 * 4 * (n // b) if b else 8 * n)


def _check_placements(p: torch.Tensor) -> None:
    """Refuse a DTensor split along a dim > 0 (TP): its blocks would straddle shards."""
    from torch.distributed.tensor import Replicate, Shard

    for pl in p.placements:
        if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)):
            raise ValueError(f"AdamW8bit supports Replicate/Shard(0) parameters (FSDP), "
                             f"not {p.placements}")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose exp_avg / exp_avg_sq are 8-bit block-wise quantised (module docstring).

    Arguments as `torch.optim.AdamW` (lr, betas, eps, weight_decay per param group; the
    LR schedulers set `group["lr"]`), plus `min_8bit_size`: smaller parameters keep fp32
    moments; `compile`: update each 8-bit tensor by one torch.compile'd kernel (several
    times faster; compiles during the first steps; see the module docstring).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2,
                 min_8bit_size: int = MIN_8BIT_SIZE, compile: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW8bit settings lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        self.min_8bit_size = min_8bit_size
        self.compile = compile
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, except that the moments and scales keep their saved dtypes.

        `Optimizer.load_state_dict` casts every floating state tensor to its parameter's
        dtype (int8 codes would survive a round trip through fp32, but fp32 scales of a
        bf16 parameter would not), so those entries bypass it and are set afterwards."""
        state = {i: dict(s) for i, s in state_dict["state"].items()}  # the caller's intact
        ours = {i: {k: s.pop(k) for k in OWN_KEYS if k in s} for i, s in state.items()}
        super().load_state_dict({**state_dict, "state": state})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params))
        for i, entries in ours.items():
            p = by_id[i]
            for k, v in entries.items():
                self.state[p][k] = v.to(device=_local(p).device)

    def _init_state(self, p: torch.Tensor) -> dict:
        if hasattr(p, "_local_tensor"):
            _check_placements(p)
        local = _local(p)
        st = self.state[p]
        st["step"] = torch.tensor(0.0)
        b = block_size(tuple(p.shape), self.min_8bit_size)
        if not b:
            for k in QUANT_KEYS:
                st[k] = _like(p, torch.zeros(local.shape, dtype=torch.float32), p.shape)
            return st
        rows = p.shape[0]
        per_row = math.prod(p.shape[1:]) // b
        for k, codec in zip(QUANT_KEYS, (SIGNED, UNSIGNED)):
            # Code of 0.0 in each map, so a fresh state dequantises to exact zeros.
            zero = int(torch.searchsorted(codec.code, torch.tensor(0.0))) - codec.offset
            st[k] = _like(p, torch.full(local.shape, zero, dtype=codec.dtype), p.shape)
            st[k + "_scale"] = _like(p, torch.zeros(local.shape[0], per_row), (rows, per_row))
        return st

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        lr = float(group["lr"])
        items, low = [], []  # items: (param, grad, exp_avg, exp_avg_sq, codes, step)
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p] if self.state[p] else self._init_state(p)
            w, g = _local(p), _local(p.grad)
            if w.dtype != torch.float32:  # no master copy: update an fp32 copy, round back
                low.append((w, w.float()))
                w = low[-1][1]
            g = g if g.dtype == torch.float32 else g.float()
            st["step"] += 1
            step = st["step"].item()
            m, v = _local(st["exp_avg"]), _local(st["exp_avg_sq"])
            if m.dtype == torch.float32:
                items.append((w, g, m, v, None, step))
                continue
            b = block_size(tuple(p.shape), self.min_8bit_size)
            sm, sv = _local(st["exp_avg_scale"]), _local(st["exp_avg_sq_scale"])
            # Row slices (blocks lie within rows), so at most CHUNK values are dequantised
            # to fp32 at a time whatever the tensor's size.
            rows = max(1, CHUNK // max(1, w[0].numel())) if w.dim() else 1
            for r in range(0, w.shape[0], rows):
                sl = slice(r, r + rows)
                items.append((w[sl], g[sl], m[sl], v[sl], (sm[sl], sv[sl], b), step))
        batch, n = [], 0
        for it in items:  # foreach batches of <= CHUNK values
            if batch and n + it[0].numel() > CHUNK:
                self._update(batch, group, lr)
                batch, n = [], 0
            batch.append(it)
            n += it[0].numel()
        if batch:
            self._update(batch, group, lr)
        for w, w32 in low:
            w.copy_(w32)

    def _update(self, items: list[tuple], group: dict, lr: float) -> None:
        """Dequantise, one AdamW update over `items` with foreach ops, requantise."""
        beta1, beta2 = group["betas"]
        wd, eps = group["weight_decay"], group["eps"]
        if self.compile:  # 8-bit items through the compiled kernel, the others below
            for w, g, m_q, v_q, codes, step in items:
                if codes is not None:
                    sm, sv, b = codes
                    scalars = torch.tensor([1 - lr * wd, 1 - beta1, beta2, 1 - beta2, eps,
                                            -lr / (1 - beta1 ** step),
                                            (1 - beta2 ** step) ** 0.5])
                    _compiled_step()(w.view(-1, b), g.view(-1, b), m_q.view(-1, b),
                                     sm.view(-1), v_q.view(-1, b), sv.view(-1), scalars,
                                     SIGNED.code, SIGNED.table, SIGNED.mid, UNSIGNED.code,
                                     UNSIGNED.table, UNSIGNED.mid)
            items = [it for it in items if it[4] is None]
            if not items:
                return
        params, grads, ms, vs, steps = [], [], [], [], []
        for w, g, m, v, codes, step in items:
            if codes is not None:
                sm, sv, b = codes
                m, v = SIGNED.dequantize(m, sm, b), UNSIGNED.dequantize(v, sv, b)
            params.append(w)
            grads.append(g)
            ms.append(m)
            vs.append(v)
            steps.append(step)
        # torch.optim.adam._multi_tensor_adam with decoupled_weight_decay, op for op.
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
        step_size = [(lr / (1 - beta1 ** s)) * -1 for s in steps]
        bc2_sqrt = [(1 - beta2 ** s) ** 0.5 for s in steps]
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, ms, denom, step_size)
        del denom
        for (_, _, m_q, v_q, codes, _), m, v in zip(items, ms, vs):
            if codes is not None:
                sm, sv, b = codes
                SIGNED.quantize_(m, m_q, sm, b)
                UNSIGNED.quantize_(v, v_q, sv, b)


def _fused_step(w, g, qm, sm, qv, sv, scalars, scode, stable, smid, ucode, utable, umid):
    """The AdamW8bit update of one tensor slice as (blocks, b) views, for torch.compile:
    dequantise, the update of `_update` (same formulas), requantise, all in place."""
    decay, one_m_b1, b2, one_m_b2, eps, step_size, bc2_sqrt = scalars.unbind()
    m = _decode(qm, sm, scode, 128).lerp(g, one_m_b1)
    v = _decode(qv, sv, ucode, 0) * b2 + one_m_b2 * g * g
    denom = v.sqrt() / bc2_sqrt + eps
    w.copy_(w * decay + step_size * (m / denom))
    codes, s = _encode(m, stable, smid, True)
    qm.copy_(codes)
    sm.copy_(s)
    codes, s = _encode(v, utable, umid, False)
    qv.copy_(codes)
    sv.copy_(s)


_COMPILED: list = []


def _compiled_step():
    """`_fused_step` under torch.compile, built once per process. Inductor fuses it into
    one loop per pass (block absmax, then update + quantise): on CPU ~8x faster than the
    eager form's ~30 separate ops. The first shape compiles a static kernel, the second
    one dynamic in the block count only (b stays static, so the loops vectorise): a few
    seconds each, once per process. The scalars travel as one fp32 tensor, so a changing
    LR does not recompile."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_fused_step))
    return _COMPILED[0]


def build_adamw8bit(groups: list[dict], o, lr: float) -> AdamW8bit:
    """The optimizer of `optim.name = "adamw8bit"` (`o`: OptimConfig) at peak LR `lr`;
    `optim.implementation = "fused"` compiles its update (`AdamW8bit(compile=True)`)."""
    return AdamW8bit(groups, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps,
                     weight_decay=o.weight_decay, compile=o.implementation == "fused")
