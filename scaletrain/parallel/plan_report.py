"""`scaletrain plan`: the layout of a config on N ranks and its memory per rank, computed
on the meta device (nothing is allocated, no process group is needed).

Per pipeline rank (the stages it holds), in bytes:
- parameters: each tensor's elements / tp if the TP plan shards it / dp_shard under
  FSDP2, times the parameter dtype's size (fp32 masters under bf16 autocast);
- gradients: the same count in the parameter dtype (FSDP2 keeps sharded gradients);
- optimizer state: Adam/AdamW 2 fp32 moments, SGD with momentum 1, Adagrad/RMSprop 1,
  plus fp32 master weights under bf16-pure;
- activations kept for the backward, per transformer layer and micro-batch, after
  Korthikanti et al. 2022 §4 (their Eq. 2 with SDPA, which keeps no T×T attention
  matrix): s·b·h·(10 + 24/t) 2-byte units with TP (t ways), s·b·h·34/t with sequence
  parallel, 2·s·b·h with full activation checkpointing (block inputs only) — doubled for
  fp32 activations; times the micro-batches a stage holds at once (1 without PP; m for
  GPipe; p − stage for 1F1B, Narayanan et al. 2021 §2.2); plus the logits and their
  fp32 cross-entropy gradient, b·s·V/t·(dtype + 4 + 4) bytes on the last stage.
- transient workspace at the optimizer step: the foreach Adam/AdamW kernels build one
  parameter-sized temporary (`_foreach_sqrt(exp_avg_sq)`, torch/optim/adam.py
  `_multi_tensor_adam`), and DDP keeps its gradient buckets as a second copy of the
  gradients (`gradient_as_bucket_view=False`, the default);
The pipeline bubble is (p−1)/(m+p−1) (GPipe, 1F1B) or (p−1)/(v·m+p−1) (interleaved).
Not counted: the interpreter and libraries (measure a baseline), allocator caching and
fragmentation, communication buffers.
"""

from __future__ import annotations

import torch

from scaletrain.parallel.pipeline import bubble_fraction, prune_to_stage, stages_per_rank

# Parameters the GPT TP plan (models/plans.py) shards over tp; all others are replicated.
_TP_SHARDED = ("wte.weight", "lm_head.weight", "attn.c_attn.weight", "attn.c_proj.weight",
               "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight")
_OPT_STATES = {"adam": 2, "adamw": 2, "sgd": 1, "adagrad": 1, "rmsprop": 1}


def _dtype_bytes(name: str) -> tuple[int, int]:
    """(parameter bytes, activation bytes) of a precision.dtype."""
    return {"fp32": (4, 4), "fp64": (8, 8), "bf16": (4, 2), "fp16": (4, 2),
            "bf16-pure": (2, 2)}[name]


def _stage_params(cfg, vocab: int, ids: list[int], bounds) -> dict[str, torch.Size]:
    """name -> shape of the parameters of the stages `ids` (meta model)."""
    from scaletrain.models.registry import REGISTRY

    with torch.device("meta"):
        model = REGISTRY[cfg.model.name].build(cfg.model, {"vocab_size": vocab})
    if bounds is not None:
        keep = {i for s in ids for i in range(*bounds[s])}
        for name in list(model.blocks.keys()):
            if int(name) not in keep:
                del model.blocks[name]
        prune_to_stage(model, (0, bounds[-1][1]), 0 in ids, len(bounds) - 1 in ids)
    return {n: p.shape for n, p in model.named_parameters()}


def plan(cfg, world: int, vocab: int) -> dict:
    """The layout and per-rank memory of `cfg` on `world` ranks (see module doc)."""
    from scaletrain.parallel.dims import resolve_dims
    from scaletrain.parallel.model_parallel import (check_model_parallel, pipeline_layout,
                                                    pipeline_microbatches)

    p = cfg.parallel
    dims = resolve_dims(p, world)
    check_model_parallel(cfg, vocab, world)
    m, t = cfg.model, dims.tp
    pbytes, abytes = _dtype_bytes(cfg.precision.dtype)
    per_rank = cfg.train.batch_size // dims.dp
    micro = cfg.train.micro_batch_size or per_rank
    v = stages_per_rank(p) if dims.pp > 1 else 1
    mb_count = pipeline_microbatches(p, per_rank, micro) if dims.pp > 1 else per_rank // micro
    mb = per_rank // mb_count if dims.pp > 1 else micro
    s, h = m.seq_len, m.d_model
    if p.activation_checkpoint == "full":
        per_layer = 2 * s * mb * h
    elif p.sequence_parallel and t > 1:
        per_layer = s * mb * h * 34 / t
    else:
        per_layer = s * mb * h * (10 + 24 / t)
    per_layer *= abytes / 2  # the formula counts 2-byte units
    ranks = []
    for pp_rank in range(dims.pp):
        bounds, ids = None, [0]
        if dims.pp > 1:
            bounds, ids, _ = pipeline_layout(m.n_layer, p, pp_rank)
        shapes = _stage_params(cfg, vocab, ids, bounds)
        n = 0.0
        for name, shape in shapes.items():
            numel = torch.Size(shape).numel()
            if t > 1 and name.endswith(_TP_SHARDED):
                numel /= t
            n += numel / dims.dp_shard
        layers = sum(1 for k in shapes if k.endswith("ln_1.weight"))
        if dims.pp <= 1:
            in_flight = 1
        elif p.pp_schedule == "gpipe":
            in_flight = mb_count
        else:  # 1F1B: the first stage holds p micro-batches, the last one
            in_flight = min(mb_count, dims.pp - pp_rank) * v
        act = per_layer * layers * in_flight
        if "lm_head.weight" in shapes and (dims.pp == 1 or len(bounds) - 1 in ids):
            act += mb * s * vocab / (t if p.loss_parallel else 1) * (abytes + 8)
        opt_n = _OPT_STATES.get(cfg.optim.name, 2) + (1 if cfg.precision.dtype == "bf16-pure"
                                                       else 0)
        workspace = n * pbytes * ((1 if cfg.optim.name in ("adam", "adamw") else 0)
                                  + (1 if dims.dp_replicate > 1 and dims.dp_shard == 1
                                     else 0))
        ranks.append({"pp_rank": pp_rank, "stages": ids, "layers": layers,
                      "params": int(n), "param_bytes": int(n * pbytes),
                      "grad_bytes": int(n * pbytes), "optim_bytes": int(n * 4 * opt_n),
                      "activation_bytes": int(act), "workspace_bytes": int(workspace),
                      "total_bytes": int(n * pbytes * 2 + n * 4 * opt_n + act + workspace)})
    return {"world": world, "layout": {"dp_replicate": dims.dp_replicate,
                                       "dp_shard": dims.dp_shard, "tp": t, "pp": dims.pp,
                                       "strategy": dims.strategy,
                                       "mesh": dict(zip(dims.mesh_shape()[1],
                                                        dims.mesh_shape()[0]))},
            "micro_batch": mb, "microbatches": mb_count,
            "pp_schedule": p.pp_schedule if dims.pp > 1 else None,
            "bubble": bubble_fraction(p.pp_schedule, dims.pp, mb_count, v),
            "ranks": ranks}


def format_plan(r: dict) -> str:
    """Human-readable lines for `plan`'s result."""
    lay = r["layout"]
    out = [f"world {r['world']}: dp_replicate={lay['dp_replicate']} dp_shard={lay['dp_shard']} "
           f"tp={lay['tp']} pp={lay['pp']} ({lay['strategy']}; mesh {lay['mesh'] or '-'})",
           f"micro-batch {r['micro_batch']} samples x {r['microbatches']}"
           + (f", schedule {r['pp_schedule']}, bubble {r['bubble']:.3f}"
              if r["pp_schedule"] else "")]
    for k in r["ranks"]:
        out.append(f"  pp rank {k['pp_rank']} (stages {k['stages']}, {k['layers']} layers): "
                   f"params {k['param_bytes']:,} B, grads {k['grad_bytes']:,} B, optimizer "
                   f"{k['optim_bytes']:,} B, activations {k['activation_bytes']:,} B, step "
                   f"workspace {k['workspace_bytes']:,} B, "
                   f"total {k['total_bytes']:,} B per rank")
    return "\n".join(out)
