"""What one transformer block keeps for the backward, measured on the model itself.

The plan (plan/memory.py, plan/cpu_rss.py, the AC budget of parallel/ac.py) needs the
bytes each block of a text family keeps alive between its forward and its backward.
They are read off the family's own block, not written down by hand: the block is built
on `meta` (`ModelSpec.activation_block`), its parameters and inputs are replaced by
`FakeTensorMode` CPU tensors (shapes and dtypes only, no memory, no compute), and its
forward runs as training runs it (precision.py's parameter dtype and autocast, train
mode so dropout is on), under

- `torch.autograd.graph.saved_tensors_hooks` (AC "none"): every tensor autograd saves,
  counted once per storage (q, k, v are views of one qkv tensor; a reshape may alias its
  input) and without the parameters (a saved `weight.t()` is the parameter's storage:
  it is not an activation);
- a dispatch mode recording which op produced each storage: selective AC keeps the
  outputs of parallel/ac.py's save list (`ac._save_list()`, what its
  `CheckpointPolicy.MUST_SAVE` caches), plus the block's inputs; full AC keeps the
  block's inputs only (non-reentrant `torch.utils.checkpoint` holds the arguments and
  re-runs the forward). These two are derived from the recorded ops rather than measured
  through the checkpoint itself, because the checkpoint packs what it keeps under its
  own saved-tensor hooks, which an outer hook cannot see.

Two batch sizes (2 and 4 samples at the model's seq_len) separate what grows with the
batch (per token) from what does not: under autocast each matmul saves its weight's
bf16 cast, a fixed amount per block (autocast caches these casts until the forward ends,
so they stay alive under AC as well, memory.py doc).

Tensor parallelism: a saved tensor produced between the entry of a column-parallel
module and the entry of the next row-parallel one of the family's TP plan
(`ModelSpec.tp_plan`) is split over the TP ranks (Megatron layout, Korthikanti et al.
2022 §4.1); the residual stream and the norms outside those regions are replicated. The
weight casts are the matmul weights', sharded — except those of an MoE layer's routed
experts, which the plan replicates over tp (models/plans.py `moe_tp_plan`: every tp
rank runs every expert, or under EP its ep group's slice, on all the layer's tokens;
what those experts save per token is outside the split regions too, so whole).
Sequence parallel is not modelled: the residual stream is counted whole on every tp
rank, which is what an MoE layer holds under SP anyway (its input is all-gathered to
the whole sequence before the router and cut after).

Device: the fake tensors are CPU tensors, whatever the plan's device (faking CUDA needs
a CUDA build). The one difference that shows in the saved set: CUDA's LayerNorm keeps
its mean / rstd in fp32 (`at::toAccumulateType(dtype, is_cuda=true)`) where the CPU
keeps the input dtype, so for a CUDA plan those two outputs count 4 bytes per element.

Blocks of one model need not be alike: an MoE llama has dense blocks (the first
`moe_first_dense`, those off the `moe_every` step) and MoE blocks, whose saved set is
another (the router's logits and probabilities, top_k copies of each token's hidden
state sorted by expert, the experts' gate / up / SwiGLU / down outputs over those
tokens x top_k rows, the shared experts; under autocast the bf16 cast of each expert's
weight view, which its matmul saves: autocast caches casts of leaf tensors only).
`block_kinds` groups the model's blocks by their modules and tensor shapes and each
kind is measured once, on its first block; the block's buffers (the sigmoid_bias
router's `expert_bias`) are faked like its parameters.

Results are cached per (model config, precision, AC mode, device type, block kind): the
fit search (plan/fit.py) asks for them many times.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scaletrain.models.moe import GroupedExperts
from scaletrain.models.registry import spec_of
from scaletrain.parallel.ac import _save_list
from scaletrain.precision import PrecisionPolicy

SAMPLES = (2, 4)  # two micro-batch sizes: per-token bytes are their difference


@dataclass(frozen=True)
class SavedTensor:
    """One storage a block keeps for the backward."""

    per_token: float  # bytes per token of the micro-batch (at TP degree 1)
    split: bool  # divided over the TP ranks


@dataclass(frozen=True)
class BlockActivations:
    """What one block keeps under one AC mode."""

    tensors: tuple[SavedTensor, ...]  # grow with the micro-batch
    fixed: tuple[float, ...]  # bytes that do not (autocast weight casts), TP degree 1
    # per fixed entry: sharded over tp (a TP-sharded matmul's weight cast), or not (a
    # routed expert's, replicated over tp); empty: all sharded
    fixed_split: tuple[bool, ...] = ()

    def per_token(self, tp: int = 1) -> float:
        """Bytes per token this block keeps on one of `tp` ranks."""
        return sum(self.tensor_bytes(tp))

    def tensor_bytes(self, tp: int = 1) -> list[float]:
        """Per-token bytes of each saved storage on one of `tp` ranks."""
        return [t.per_token / (tp if t.split else 1) for t in self.tensors]

    def fixed_bytes(self, tp: int = 1) -> list[float]:
        """Each fixed tensor's bytes on one of `tp` ranks (the matmul weights' casts:
        sharded, the routed experts' replicated)."""
        split = self.fixed_split or (True,) * len(self.fixed)
        return [b / tp if sp else b for b, sp in zip(self.fixed, split)]


class _Producers(TorchDispatchMode):
    """Records, per output storage, the op that made it, whether it was made inside a
    tensor-parallel region (`self.split`, toggled by the TP plan's module pre-hooks) and
    whether inside modules the plan replicates whole (`self.replicated`: an MoE layer's
    routed experts, whose weight casts are not sharded)."""

    def __init__(self):
        super().__init__()
        self.split = False
        self.replicated = False
        # storage key -> (op, output index, split, the output: holding it keeps the key
        # unique for the whole forward, replicated)
        self.origin: dict[int, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for i, t in enumerate(tree_flatten(out)[0]):
            if isinstance(t, torch.Tensor):
                self.origin.setdefault(_key(t), (func, i, self.split, t, self.replicated))
        return out


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _fake_block(spec, model_cfg, samples: int, param_dtype: torch.dtype, layer: int = 0):
    """(model, block `layer`, inputs) of the family with the block's parameters and
    buffers (an MoE router's `expert_bias`) as fake CPU tensors, parameters in
    `param_dtype`, buffers in their own dtype (the model is kept for the TP plan)."""
    with torch.device("meta"):
        model = spec.build(model_cfg, {"vocab_size": model_cfg.vocab_size or 2})
        block, inputs = spec.activation_block(model, samples, model_cfg.seq_len, layer)
    for mod in block.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=param_dtype), requires_grad=p.requires_grad)
        # a buffer left on meta would meet the fake CPU tensors in one op (a device error)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    # requires_grad as the family says (a llama's rotary angles need none: with it the
    # rope multiplies would also save q and k for a gradient no run computes)
    fake_inputs = tuple(torch.empty(x.shape, dtype=param_dtype if x.is_floating_point()
                                    else x.dtype, requires_grad=x.requires_grad)
                        for x in inputs)
    return model, block, fake_inputs


def _tp_hooks(spec, model: nn.Module, block: nn.Module, rec: _Producers) -> list:
    """Hooks marking the TP plan's split regions inside `block`, and its routed experts
    (replicated over tp: their weight casts whole) (module doc)."""
    if spec.tp_plan is None:
        return []
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    prefix = next(n for n, m in model.named_modules() if m is block) + "."
    mods = dict(model.named_modules())
    handles = []
    for path, style in spec.tp_plan(model, loss_parallel=False).items():
        if not path.startswith(prefix):
            continue
        for cls, split in ((ColwiseParallel, True), (RowwiseParallel, False)):
            if isinstance(style, cls):
                handles.append(mods[path].register_forward_pre_hook(
                    lambda _m, _a, split=split: setattr(rec, "split", split)))
        if isinstance(mods[path], GroupedExperts):  # the plan's replicated experts
            handles += [mods[path].register_forward_pre_hook(
                            lambda _m, _a: setattr(rec, "replicated", True)),
                        mods[path].register_forward_hook(
                            lambda _m, _a, _o: setattr(rec, "replicated", False))]
    return handles


def _stat_bytes_cuda(t: torch.Tensor, origin) -> int | None:
    """A LayerNorm mean / rstd in a low-precision dtype: CUDA keeps it in fp32."""
    func, index = origin[:2]
    if func is torch.ops.aten.native_layer_norm.default and index in (1, 2) \
            and t.element_size() < 4:
        return t.untyped_storage().nbytes() // t.element_size() * 4
    return None


def _measure(spec, model_cfg, precision: str, samples: int, device_type: str,
             layer: int) -> dict:
    """{mode: [(storage bytes, split, replicated), ...]} of block `layer` for one
    micro-batch of `samples`, in the order first saved (the same at any batch size)."""
    policy = PrecisionPolicy(precision, torch.device("cpu"))

    with FakeTensorMode():
        model, block, inputs = _fake_block(spec, model_cfg, samples, policy.param_dtype,
                                           layer)
        params = {_key(p) for p in block.parameters()}
        inputs_keys = {_key(x): x for x in inputs if x.is_floating_point()}
        saved: dict[int, torch.Tensor] = {}

        def pack(t):
            if _key(t) not in params:
                saved.setdefault(_key(t), t)
            return t

        rec = _Producers()
        handles = _tp_hooks(spec, model, block, rec)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    policy.autocast(), rec:
                block(*inputs)
        finally:
            for h in handles:
                h.remove()

    def sized(key, t) -> tuple[float, bool, bool]:
        """(bytes, made in a split region, made in a replicated module)."""
        origin = rec.origin.get(key, (None, 0, False, t, False))
        cuda = _stat_bytes_cuda(t, origin) if device_type == "cuda" else None
        return (float(cuda if cuda is not None else t.untyped_storage().nbytes()),
                origin[2], origin[4])

    save_ops = _save_list()
    entry = [sized(k, t) for k, t in inputs_keys.items()]
    none = [sized(k, t) for k, t in saved.items()]
    # selective: what SAC caches, the outputs of every save-list op, saved by autograd
    # or not (a residual projection's output feeds only an add, which saves nothing)
    selective = entry + [sized(k, o[3]) for k, o in rec.origin.items()
                         if o[0] in save_ops and k not in inputs_keys]
    return {"none": none, "selective": selective, "full": entry}


@functools.lru_cache(maxsize=256)
def _cached(name: str, model_key: tuple, precision: str, mode: str,
            device_type: str, layer: int) -> BlockActivations:
    model_cfg = _model_cfgs[model_key]
    spec = spec_of(model_cfg)
    b1, b2 = SAMPLES
    small = _measure(spec, model_cfg, precision, b1, device_type, layer)
    large = _measure(spec, model_cfg, precision, b2, device_type, layer)
    fixed_from = "none"  # the autocast cast cache: alive whatever the AC mode (doc)
    tensors, fixed, fixed_split = [], [], []
    tokens = (b2 - b1) * model_cfg.seq_len
    if len(small[mode]) != len(large[mode]) or len(small[fixed_from]) != len(large[fixed_from]):
        raise RuntimeError(f"{name}: the block saves a different set of tensors at "
                           f"{b1} and {b2} samples; its bytes per token are not linear")
    for (s, split, _), (l, _, _) in zip(small[mode], large[mode]):
        grow = (l - s) / tokens
        if grow:
            tensors.append(SavedTensor(grow, split))
    for (s, _, replicated), (l, _, _) in zip(small[fixed_from], large[fixed_from]):
        if l == s:
            fixed.append(s)
            fixed_split.append(not replicated)
    return BlockActivations(tuple(tensors), tuple(fixed), tuple(fixed_split))


_model_cfgs: dict[tuple, object] = {}  # cache key -> the ModelConfig it stands for


def _model_key(model_cfg) -> tuple:
    key = tuple(sorted((k, repr(v)) for k, v in vars(model_cfg).items()))
    _model_cfgs.setdefault(key, model_cfg)
    return key


@functools.lru_cache(maxsize=64)
def _kinds(model_key: tuple) -> tuple[int, ...]:
    model_cfg = _model_cfgs[model_key]
    spec = spec_of(model_cfg)
    with torch.device("meta"):
        model = spec.build(model_cfg, {"vocab_size": model_cfg.vocab_size or 2})
        first: dict[tuple, int] = {}
        out = []
        for i in range(model_cfg.n_layer):
            block, _ = spec.activation_block(model, 1, 1, i)
            shape = tuple((n, type(m).__name__) for n, m in block.named_modules()) + \
                tuple((n, tuple(t.shape)) for n, t in block.state_dict(keep_vars=True).items())
            out.append(first.setdefault(shape, i))
    return tuple(out)


def block_kinds(model_cfg) -> tuple[int, ...]:
    """Per block of the model, the first block built like it (same modules and tensor
    shapes): an MoE llama's dense blocks (model.moe_first_dense, moe_every) save other
    tensors than its MoE blocks, so the plan measures one block of each kind."""
    return _kinds(_model_key(model_cfg))


def block_activations(model_cfg, precision: str, mode: str,
                      device_type: str = "cpu", layer: int = 0) -> BlockActivations:
    """What block `layer` of `model_cfg`'s family keeps under AC `mode` (none /
    selective / full) at `precision` (a precision.dtype), per token and fixed (module
    doc); measured once per kind of block (`block_kinds`)."""
    spec = spec_of(model_cfg)
    if spec.activation_block is None:
        raise ValueError(f"model {model_cfg.name!r} declares no activation_block")
    key = _model_key(model_cfg)
    return _cached(model_cfg.name, key, precision, mode,
                   "cuda" if device_type == "cuda" else "cpu", _kinds(key)[layer])

