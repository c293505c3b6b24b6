"""One optimizer step through a pipeline schedule, and evaluation through it.

`Pipeline.step` is train/step.py's `train_step` for pp > 1: the schedule runs the
micro-batch loop itself (forward/backward interleaved across stages), then the same
end of step (optim/step_end.py `StepEnd`: clip -> optimizer step -> zero grad). The loss
is the run's one loss (train/step_loss.py `StepLoss`, built by the trainer): the schedule
calls `loss_fn(logits, targets)` on the last stage, which `_loss` adapts to its
`on_logits`; its `context` (TP's loss_parallel) is held around the schedule.

Tied embeddings across stages (the family's `ModelSpec.tied` pairs; GPT: the head
`lm_head.weight` is `wte.weight`): the first stage owns `wte.weight`, the last a copy as
`lm_head.weight` (`ParallelModel.tied_copies`), initialised with the same values. The tied gradient is the sum of both
uses (embedding lookup + output head), so after the backward the two copies' gradients
are all-reduced between the first and last stage (Megatron-LM's "embedding group",
Narayanan et al. 2021 §4) and both copies take identical optimizer steps. The copy is
left out of the gradient norm so that it is counted once, as in one process.

Plain data parallelism (dp_replicate > 1, dp_shard = 1) around a pipeline: the stages
are not DDP modules (parallel/parallelize.py), so after the schedule the gradients are
all-reduced over the data-parallel group here — one flat buffer per dtype, once per step
(no overlap with the backward, which the schedule runs micro-batch by micro-batch), and
averaged as DDP does (the loss carries the factor dp: `loss_multiplier`).

Mixture-of-experts layers (`moe`, models/moe_terms.py): each stage's loss terms join its
own backward through a forward hook on the stage module (parallel/pipeline_moe.py),
since the schedule backpropagates only the last stage's loss (the step loss's `extra`,
which train/step.py adds, is not called here).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from scaletrain.models.contract import param_at
from scaletrain.models.losses import IGNORE_INDEX, count_targets
from scaletrain.optim.step_end import StepResult
from scaletrain.parallel.pipeline import build_schedule, drop_ends
from scaletrain.parallel.pipeline_moe import with_loss_grad
from scaletrain.parallel.tensor import local_loss, parallel_grad_norm


def stage_view(model: nn.Module, split, bounds: tuple[int, int], first: bool,
               last: bool) -> nn.Module:
    """A module that runs blocks [start, end) of `model` and shares its parameters
    (a shallow copy with its own child table): several stages of one rank (interleaved
    schedule) then live in one module whose names are the whole model's."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    # Hooks of its own: FSDP makes each view a root (parallel/fsdp.py `roots`), and its
    # hooks must not fire for the model or the other stages' views.
    for name, value in vars(model).items():
        if name.endswith("_hooks") or name.endswith("_hooks_with_kwargs") or \
                name.endswith("_hooks_always_called"):
            setattr(view, name, type(value)())
    view.blocks = nn.ModuleDict({k: b for k, b in model.blocks.items()
                                 if bounds[0] <= int(k) < bounds[1]})
    drop_ends(view, split, first, last)  # the family's PipelineSplit ends
    return view


def _tied_group(mesh):
    """Process group joining pipeline rank 0 and the last pipeline rank at this rank's
    coordinates in the other dimensions (every rank creates every such group)."""
    import torch.distributed as dist

    ranks = mesh.mesh  # (pp, ...) rank layout
    flat = ranks.reshape(ranks.shape[0], -1)
    mine = None
    for j in range(flat.shape[1]):
        g = dist.new_group([int(flat[0, j]), int(flat[-1, j])])
        if dist.get_rank() in (int(flat[0, j]), int(flat[-1, j])):
            mine = g
    return mine


def merge_stage_states(states: list[dict]) -> dict:
    """Union of the pipeline ranks' full state dicts (weights export on rank 0)."""
    out: dict = {}
    for st in states:
        for k, v in st.items():
            out.setdefault(k, v)
    return out


class Pipeline:
    """This rank's stages, their schedule and what a step needs around it."""

    def __init__(self, pm, bounds: list[tuple[int, int]], ids: list[int],
                 *, pcfg, microbatches: int, mesh, pp_group, device, step_loss,
                 io: dict, loss_multiplier: float = 1.0, ddp_group=None, moe=None):
        n = len(bounds)
        model = pm.module  # pm: the ParallelModel (parallel/parallel_model.py)
        self.model = model
        self.tied = pm.spec.tied
        self.ids = ids
        self.n_stages = n
        self.first = 0 in ids
        self.last = n - 1 in ids
        self.microbatches = microbatches
        self.batch_size = int(io["tokens"].shape[0]) * microbatches  # per-rank samples
        self.pp_group = pp_group
        self.device = torch.device(device)  # collectives' tensors live here (NCCL: GPU)
        self.loss_multiplier = loss_multiplier
        self.ddp_group = ddp_group  # gradients all-reduced here (plain DP), else None
        self.step_loss = step_loss  # the run's StepLoss (train/step_loss.py)
        self.denom = torch.ones(())
        views = list(pm.stage_views or (
            [stage_view(model, pm.spec.pipeline, bounds[s], s == 0, s == n - 1) for s in ids]
            if len(ids) > 1 else [model]))
        self.views = views
        self.moe = moe  # the MoE step terms (models/moe_terms.py), or None
        if moe is not None:  # after FSDP's own hooks: its post-forward runs first
            for view in views:
                view.register_forward_hook(self._with_moe_terms)
        self.schedule = build_schedule(views, ids, n, microbatches, pcfg.pp_schedule,
                                       self._loss, device, pp_group, io)
        # Every rank creates every first/last pair's group (new_group is collective).
        self.tied_group = _tied_group(mesh) if self.tied else None
        # This rank's copies of tied weights (last stage): counted once, left out of
        # the norm.
        self.tied_params = [param_at(model, h) for h in pm.tied_copies]

    # -- loss: the sum over the micro-batch's targets / the step's global count ------
    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The schedule's `loss_fn(output, target)`: the run's loss on the last stage's
        logits (in the loss dtype; the inputs are on the first stage, so no loss that
        reads them runs here: parallel/model_parallel.py refuses distillation)."""
        if self.step_loss.in_model:  # model.loss_chunks: the stage returned the sum itself
            loss = logits
        else:
            z = logits if logits.dtype == self.denom.dtype else logits.to(self.denom.dtype)
            loss = self.step_loss.on_logits(z, None, targets, self.denom.dtype)
        return local_loss(loss) / self.denom * self.loss_multiplier

    def _with_moe_terms(self, stage: nn.Module, args, output):
        """Forward hook of a stage module: the stage's MoE loss terms of the micro-batch
        just run, scaled as train/step.py scales them, backpropagated with its output
        (nothing outside training: the layers left no terms)."""
        terms = self.moe.collect(stage)
        if terms is None:
            return output
        return with_loss_grad(output, terms.to(self.denom.dtype) / self.denom
                              * self.loss_multiplier)

    def _run(self, fn, x, y, losses):
        # Document masking: every stage needs the ids (a later stage sees hidden states
        # only), so every pipeline rank derives them from the batch it holds and hands
        # them to the schedule as the model's keywords, which torch.distributed.pipelining
        # chunks per micro-batch (dim 0) and passes to each stage's forward.
        # The in-model loss (model.loss_chunks) also hands the targets to every stage; its
        # last stage's output is a 0-d sum per micro-batch, which the schedule cannot
        # concatenate into a batch output: none is kept (the losses come back in `losses`).
        kw = self.step_loss.stage_kwargs(x, y)
        run = {"return_outputs": False} if self.step_loss.in_model else {}
        with self.step_loss.context():
            if self.first:
                fn(x, target=y if self.last else None, losses=losses, **run, **kw)
            elif self.last:
                fn(target=y, losses=losses, **run, **kw)
            else:
                fn(**run, **kw)

    def _stage_loss(self, losses) -> torch.Tensor:
        """Sum of the last stage's micro-batch losses, on every pipeline rank."""
        out = torch.zeros((), dtype=self.denom.dtype, device=self.device)
        if self.last and losses:
            out += torch.stack([l.detach().to(out) for l in losses]).sum()
        import torch.distributed as dist

        dist.all_reduce(out, group=self.pp_group)
        return out

    def step(self, micro_batches, optimizer, policy, opts, end) -> StepResult:
        """One optimizer step on this rank's batch (its micro-batches concatenated);
        `opts`: the layout's StepOptions (count_reducer), `end`: the run's StepEnd."""
        x = torch.cat([b[0] for b in micro_batches])
        y = torch.cat([b[1] for b in micro_batches])
        n_total = opts.count_reducer(count_targets(y).clone())
        self.denom = n_total.to(torch.float64 if policy.param_dtype == torch.float64
                                else torch.float32)
        losses: list = []
        with policy.autocast():
            self._run(self.schedule.step, x, y, losses)
        loss = self._stage_loss(losses) / self.loss_multiplier
        self._all_reduce_dp_grads()
        self._sync_tied_grad()
        params = [p for p in self.model.parameters() if p.requires_grad]
        copies = {id(p) for p in self.tied_params}
        done = end.finish(optimizer, params, clip_norm=self._clip_norm,
                          norm_params=[p for p in params if id(p) not in copies], loss=loss)
        return StepResult(loss, done.grad_norm, n_total, done.skipped)

    def _clip_norm(self, norm_params: list, clip: float) -> torch.Tensor:
        """The global grad norm over the pipeline ranks' stages, clipped to `clip`; the
        tied copies (left out of the norm) are scaled by the same coefficient."""
        grad_norm = parallel_grad_norm(norm_params, clip, self.pp_group)
        for copy_ in self.tied_params:
            if clip < math.inf and copy_.grad is not None:
                coef = min(1.0, clip / (float(grad_norm) + 1e-6))
                g = copy_.grad
                (g.to_local() if hasattr(g, "to_local") else g).mul_(coef)
        return grad_norm

    def evaluate(self, batches, count_reducer, batch_size: int) -> dict:
        """{"loss", "ppl"} over `batches` through the pipeline (evaluate/evaluator.py's
        result). Batches are cut/padded to the training batch of `batch_size` samples:
        the stages were built with static micro-batch shapes; padded rows have ignored
        targets and add nothing."""
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        # Eval mode, as evaluate/evaluator.py: no dropout, and MoE layers leave no terms.
        was_training = self.model.training
        self.model.eval()
        for x, y in batches:
            for xs, ys in zip(x.split(batch_size), y.split(batch_size)):
                pad = batch_size - len(xs)
                if pad:
                    xs = torch.cat([xs, xs.new_zeros((pad, *xs.shape[1:]))])
                    ys = torch.cat([ys, ys.new_full((pad, *ys.shape[1:]), IGNORE_INDEX)])
                totals[0] += self.eval_loss_sum(xs, ys).double()
                totals[1] += count_targets(ys).double()
        self.model.train(was_training)
        totals = count_reducer(totals)
        loss = (totals[0] / totals[1]).item()
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}

    @torch.no_grad()
    def eval_loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum cross-entropy of a batch through the pipeline (forward only), every rank."""
        self.denom = torch.ones((), dtype=torch.float32, device=self.device)
        saved, self.loss_multiplier = self.loss_multiplier, 1.0
        losses: list = []
        try:
            self._run(self.schedule.eval, x, y, losses)
        finally:
            self.loss_multiplier = saved
        return self._stage_loss(losses)

    @torch.no_grad()
    def _all_reduce_dp_grads(self) -> None:
        """Average the gradients over the data-parallel replicas (plain DP only)."""
        if self.ddp_group is None:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        n = dist.get_world_size(self.ddp_group)
        for dtype in sorted({g.dtype for g in grads}, key=str):
            same = [g for g in grads if g.dtype == dtype]
            flat = _flatten_dense_tensors(same)
            dist.all_reduce(flat, group=self.ddp_group)
            flat.div_(n)
            for g, r in zip(same, _unflatten_dense_tensors(flat, same)):
                g.copy_(r)

    def _sync_tied_grad(self) -> None:
        """All-reduce the tied embedding/head gradients between first and last stage."""
        for head, emb in self.tied:
            h, e = param_at(self.model, head), param_at(self.model, emb)
            p = e if h is None else h if e is None else None  # one side on this rank
            if p is not None and self.tied_group is not None and p.grad is not None:
                self._all_reduce_tied(p)

    def _all_reduce_tied(self, p) -> None:
        import torch.distributed as dist

        g = p.grad
        if hasattr(g, "placements") and g.placements != p.placements:
            # e.g. the head's gradient left Partial/Replicate by loss_parallel: bring it to
            # the (vocab-sharded) layout the first stage's copy has.
            g = p.grad = g.redistribute(p.device_mesh, p.placements)
        dist.all_reduce(g.to_local() if hasattr(g, "to_local") else g,
                        group=self.tied_group)

