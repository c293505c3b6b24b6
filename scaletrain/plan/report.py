"""`scaletrain plan`: the layout of a config on N ranks and its memory per rank, computed
on the meta device (nothing is allocated, no process group is needed).

Per pipeline rank (the stages it holds), in bytes: parameters (each tensor's elements /
tp if the TP plan shards it / dp_shard under FSDP2), gradients, optimizer state (+ fp32
masters under bf16-pure), activations (+ logits and cross-entropy temporaries), the
optimizer step's workspace, and the predicted PEAK per rank — the phase model of
scaletrain/plan/memory.py (forward/backward with accumulation, optimizer step,
evaluation, end of run; plus the process baseline on CPU). Activations per micro-batch
are multiplied by the micro-batches a stage holds at once (1 without PP; m for GPipe;
p − stage for 1F1B, Narayanan et al. 2021 §2.2).
The pipeline bubble is (p−1)/(m+p−1) (GPipe, 1F1B) or (p−1)/(v·m+p−1) (interleaved).
"""

from __future__ import annotations

import torch

from scaletrain.config.batch_plan import batch_plan
from scaletrain.models.loss_chunks_auto import resolve_loss_chunks, with_loss_chunks
from scaletrain.models.registry import spec_of
from scaletrain.models.tp_styles import plan_sharded
from scaletrain.parallel.ac import BudgetTooSmall, block_modes, describe
from scaletrain.parallel.model_parallel import check_model_parallel, pipeline_layout
from scaletrain.parallel.pipeline import bubble_fraction, prune_to_stage, stages_per_rank
from scaletrain.plan.experts import expert_dims, gathered_expert_numel
from scaletrain.plan.memory import RankShape, ac_policy, rank_peak


def _stage_params(cfg, vocab: int, ids: list[int], bounds) -> tuple[dict, set]:
    """(name -> shape of the parameters of the stages `ids` (meta model), the names the
    family's TP plan shards); cached, since `plan --fit` plans the same shape for every
    candidate."""
    key = (repr(cfg.model), vocab, tuple(ids), repr(bounds))
    if key not in _SHAPES:
        _SHAPES[key] = _build_stage_params(cfg, vocab, ids, bounds)
    return _SHAPES[key]


_SHAPES: dict[tuple, tuple[dict, set]] = {}


def _build_stage_params(cfg, vocab: int, ids: list[int], bounds) -> tuple[dict, set]:
    spec = spec_of(cfg.model)
    with torch.device("meta"):
        model = spec.build(cfg.model, {"vocab_size": vocab})
    if bounds is not None:
        keep = {i for s in ids for i in range(*bounds[s])}
        for name in list(model.blocks.keys()):
            if int(name) not in keep:
                del model.blocks[name]
        prune_to_stage(model, spec.pipeline, (0, bounds[-1][1]), 0 in ids,
                       len(bounds) - 1 in ids)
    sharded = plan_sharded(model, spec.tp_plan(model)) if spec.tp_plan is not None else set()
    return {n: p.shape for n, p in model.named_parameters()}, sharded


def _block_ids(shapes: dict) -> list[str]:
    """The indices of the blocks present ("blocks.<i>.*"), in order."""
    return sorted({k.split(".")[1] for k in shapes if k.startswith("blocks.")}, key=int)


def _gathered(cfg, shapes: dict, sharded: set, layers: int, t: int, ep: int = 1) -> float:
    """Parameters FSDP2 holds unsharded at once: two blocks (current + prefetched), or
    all of them without reshard_after_forward (plan/memory.py); 1/tp of the sharded;
    of the routed experts under EP the rank's E / ep (plan/experts.py).
    Two blocks: the stage's largest (an MoE llama's dense blocks are smaller)."""
    ids = _block_ids(shapes)
    if not ids:
        return 0.0

    def numel(k: str, sh) -> float:
        n = torch.Size(sh).numel() / (t if k in sharded else 1)
        return gathered_expert_numel(n, ep) if _is_expert(k) else n
    sizes = [sum(numel(k, sh) for k, sh in shapes.items() if k.startswith(f"blocks.{i}."))
             for i in ids]
    return max(sizes) * 2 if cfg.parallel.reshard_after_forward else sum(sizes)


def expert_shards(ep: int, dp_shard: int) -> int:
    """Ranks one routed expert tensor is split over: `ep` expert-parallel ranks (each
    owns E / ep experts), and FSDP2 over the data-parallel shard ranks left beside them
    (torchtitan's layout: EP borrows from dp_shard when ep divides it, so the experts end
    up split dp_shard ways; otherwise EP sits beside dp_shard)."""
    if ep <= 1:
        return dp_shard
    return dp_shard if dp_shard % ep == 0 else ep * dp_shard


def _is_expert(name: str) -> bool:
    """A routed expert's 3-D weight (models/moe.py GroupedExperts, `mlp.experts.*`)."""
    return ".mlp.experts." in name


def plan(cfg, dims, vocab: int, device_type: str = "cpu") -> dict:
    """The layout and per-rank memory of `cfg` on the resolved layout `dims`
    (ParallelDims of `dims.world` ranks; see module doc; routed experts split over
    `dims.ep` expert-parallel ranks and the FSDP2 ranks beside them: `expert_shards`)."""
    p = cfg.parallel
    check_model_parallel(cfg, vocab, dims)
    spec = spec_of(cfg.model)
    v, mb_count, mb = _microbatching(cfg, dims)
    # model.loss_chunks=-1 (auto): the value the run resolves (models/loss_chunks_auto.py)
    cfg = with_loss_chunks(cfg, resolve_loss_chunks(cfg, spec.kind, vocab, mb, dims.tp))
    full_numels = tuple(torch.Size(sh).numel()
                        for sh in _stage_params(cfg, vocab, [0], None)[0].values())
    ranks = []
    for pp_rank in range(dims.pp):
        bounds, ids = None, [0]
        if dims.pp > 1:
            bounds, ids, _ = pipeline_layout(spec.pipeline.depth(cfg.model), p, pp_rank)
        shapes, sharded = _stage_params(cfg, vocab, ids, bounds)
        numels = _local_numels(shapes, sharded, dims)
        layers = len(_block_ids(shapes))
        # (a tied head's weight is listed once, as the embedding's: test the stage, not
        # names)
        has_head = spec.kind == "text" and (dims.pp == 1 or len(bounds) - 1 in ids)
        # a tied head whose embedding is on this rank too (a pipeline splits them)
        tied = {emb for _, emb in spec.tied} if has_head and dims.pp == 1 else set()
        shape = RankShape(
            params=float(sum(numels)),
            largest_param=max((torch.Size(sh).numel() for sh in shapes.values()), default=0),
            layers=layers, tokens=mb * cfg.model.seq_len,
            in_flight=_in_flight(p.pp_schedule, dims.pp, pp_rank, mb_count, v),
            has_head=has_head, vocab_local=vocab / (dims.tp if p.loss_parallel and dims.tp > 1
                                                    else 1),
            tp=dims.tp, accum=1 if dims.pp > 1 else mb_count,
            ddp=dims.dp_replicate > 1 and dims.dp_shard == 1,
            # PP evaluates through the schedule in its micro-batches (pipeline_step.py)
            eval_tokens=(mb if dims.pp > 1 else max(1, cfg.eval.batch_size // dims.dp))
            * cfg.model.seq_len,
            full_params=sum(full_numels), sharded=dims.tp > 1 or dims.dp_shard > 1 or dims.pp > 1,
            fsdp_gathered=(_gathered(cfg, shapes, sharded, layers, dims.tp, dims.ep)
                           if dims.dp_shard > 1 else 0.0),
            ep=dims.ep, expert_dims=expert_dims(shapes),
            tied_embedding=sum(n for name, n in zip(shapes, numels) if name in tied),
            numels=tuple(numels), full_numels=full_numels, pp=dims.pp,
            blocks=tuple(int(i) for i in _block_ids(shapes)))
        ranks.append(_rank_record(pp_rank, ids, shape, rank_peak(cfg, shape, device_type),
                                  _ac_blocks(cfg, dims.tp, mb, layers)))
    return {"world": dims.world, "layout": _layout_record(dims),
            "micro_batch": mb, "microbatches": mb_count,
            "loss_chunks": cfg.model.loss_chunks,  # as the run resolves it (auto: -1)
            "pp_schedule": p.pp_schedule if dims.pp > 1 else None,
            "bubble": bubble_fraction(p.pp_schedule, dims.pp, mb_count, v),
            "ranks": ranks}


def _microbatching(cfg, dims) -> tuple[int, int, int]:
    """(stages per pipeline rank, micro-batches per step, samples per micro-batch): the
    batch plan's head micro-batch (the pipeline's under pp > 1) and how many of them
    make a rank's step."""
    # full-batch: train.batch_size is the split here
    batch = batch_plan(cfg, dims.dp, pp=dims.pp)
    v = stages_per_rank(cfg.parallel) if dims.pp > 1 else 1
    return v, batch.per_rank // batch.head_micro, batch.head_micro


def _local_numels(shapes: dict, sharded: set, dims) -> list[float]:
    """Each parameter's elements on one rank: / tp if the TP plan shards it, / the
    ranks FSDP2 splits it over (a routed expert's: `expert_shards`)."""
    numels = []
    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        if dims.tp > 1 and name in sharded:
            numel /= dims.tp
        numels.append(numel / (expert_shards(dims.ep, dims.dp_shard) if _is_expert(name)
                               else dims.dp_shard))
    return numels


def _in_flight(schedule: str, pp: int, pp_rank: int, mb_count: int, v: int) -> int:
    """Micro-batches whose activations a rank holds at once: 1 without PP; all of them
    under GPipe; under 1F1B the first stage holds p, the last one (× its v stages)."""
    if pp <= 1:
        return 1
    if schedule == "gpipe":
        return mb_count
    return min(mb_count, pp - pp_rank) * v


def _rank_record(pp_rank: int, ids: list[int], shape: RankShape, peak: dict,
                 ac_blocks) -> dict:
    """One pipeline rank's line of the plan, in bytes (plan/memory.py `rank_peak`)."""
    return {"pp_rank": pp_rank, "stages": ids, "layers": shape.layers, "ac_blocks": ac_blocks,
            "params": int(shape.params), "param_bytes": int(peak["params_bytes"]),
            "grad_bytes": int(peak["grad_bytes"]),
            "optim_bytes": int(peak["optim_state_bytes"] + peak["master_bytes"]),
            "activation_bytes": int(peak["activation_bytes"] + peak["head_bytes"]),
            "workspace_bytes": int(peak["step_transient_bytes"] + peak["ddp_bucket_bytes"]),
            "peak_phase": peak["peak_phase"],
            "peak_tensor_bytes": int(peak["peak_tensor_bytes"]),
            "baseline_bytes": int(peak["baseline_bytes"]),
            "peak_bytes": int(peak["peak_bytes"]),
            "peak_bytes_other_ranks": int(peak["peak_bytes_other"]),
            # the tensors' part of the peak (bench/model_parallel.py compares it with the
            # peak RSS above the process's baseline)
            "total_bytes": int(peak["peak_tensor_bytes"])}


def _layout_record(dims) -> dict:
    shape, names = dims.mesh_shape()
    return {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp,
            "pp": dims.pp, "strategy": dims.strategy, "mesh": dict(zip(names, shape))}


def _ac_blocks(cfg, tp: int, micro: int, layers: int) -> list[str] | str:
    """Each local block's AC mode (budget mode: what fits), or why none fits."""
    if spec_of(cfg.model).activation_block is None:  # no transformer blocks
        return []
    try:
        return block_modes(ac_policy(cfg, tp, micro), layers)
    except BudgetTooSmall as e:
        return str(e)


def format_plan(r: dict) -> str:
    """Human-readable lines for `plan`'s result."""
    lay = r["layout"]
    out = [f"world {r['world']}: dp_replicate={lay['dp_replicate']} dp_shard={lay['dp_shard']} "
           f"tp={lay['tp']} pp={lay['pp']} ({lay['strategy']}; mesh {lay['mesh'] or '-'})",
           f"micro-batch {r['micro_batch']} samples x {r['microbatches']}"
           + (f", schedule {r['pp_schedule']}, bubble {r['bubble']:.3f}"
              if r["pp_schedule"] else "")
           + (f", head + loss in {r['loss_chunks']} chunks" if r["loss_chunks"] else "")]
    for k in r["ranks"]:
        out.append(f"  pp rank {k['pp_rank']} (stages {k['stages']}, {k['layers']} layers): "
                   f"params {k['param_bytes']:,} B, grads {k['grad_bytes']:,} B, optimizer "
                   f"{k['optim_bytes']:,} B, activations {k['activation_bytes']:,} B, step "
                   f"workspace {k['workspace_bytes']:,} B, "
                   f"total {k['total_bytes']:,} B per rank")
        if any(m != "none" for m in k["ac_blocks"]) or isinstance(k["ac_blocks"], str):
            ac = k["ac_blocks"]
            out.append("    activation checkpointing: "
                       + (ac if isinstance(ac, str) else describe(ac) + " (block order)"))
        out.append(f"    predicted peak {k['peak_bytes'] / 2**20:,.0f} MiB per rank "
                   f"(phase {k['peak_phase']}; baseline {k['baseline_bytes'] / 2**20:,.0f} "
                   f"MiB + tensors {k['total_bytes'] / 2**20:,.0f} MiB)")
    if "fits" in r:  # plan --memory-gib / plan.memory_gib: the device's memory per rank
        out.append(f"fits {r['memory_gib']:g} GiB per rank" if r["fits"] else
                   f"does NOT fit {r['memory_gib']:g} GiB per rank: `scaletrain plan "
                   "--fit` finds a micro-batch / checkpointing / precision that does")
    return "\n".join(out)
