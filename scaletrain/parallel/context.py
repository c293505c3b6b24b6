"""`DistContext`: the one object the trainer asks about the parallel world.

It joins the process group (parallel/init.py), holds the run's `ParallelDims` (resolved
once by the run's build and handed in), builds the device mesh and hands the step and
the evaluator what they need to aggregate correctly:

- `sum_reducer`: all-reduce SUM over the data-parallel ranks (the step's target count,
  the evaluator's (loss sum, count, correct) vector), so every rank normalises by the
  *global* count — the weighted aggregation, not a mean of per-rank means;
- `step_options(pm)`: `count_reducer`, `no_sync` (all but the last micro-batch) and
  `loss_multiplier` = dp: DDP and FSDP2 both *average* gradients over the data-parallel
  group (FSDP2: ReduceOp.AVG or a post-division by the group size, see
  `_get_gradient_divide_factors` in torch/distributed/fsdp/_fully_shard/
  _fsdp_collectives.py), and multiplying the loss by dp turns that mean back into the
  sum of the globally normalised per-rank losses.

With one process every method is the identity and nothing distributed is imported.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from scaletrain.config.dims import ParallelDims
from scaletrain.parallel.ddp import ddp_no_sync
from scaletrain.parallel.expert import ep_grad_norm
from scaletrain.parallel.fsdp import fsdp_no_sync
from scaletrain.parallel.init import destroy_distributed, init_distributed, peer_guard
from scaletrain.parallel.meshes import dp_mesh, dp_rank, group
from scaletrain.parallel.model_parallel import model_parallel_step_options


@dataclass
class DistContext:
    dims: ParallelDims
    rank: int
    device: torch.device
    timeout_s: float = 300.0
    mesh: object = None  # DeviceMesh, or None for one process
    expert_mesh: object = None  # dims.build_expert_mesh (parallel.ep > 1), else None
    owns_group: bool = False  # this context created the process group (and ends it)
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def setup(cls, pcfg, rank: int, dims: ParallelDims, device: torch.device) -> DistContext:
        """Join the process group (dims.world > 1) and build the mesh of the resolved
        layout `dims`."""
        owns = init_distributed(dims.world, device, pcfg.backend, pcfg.timeout_s)
        ctx = cls(dims, rank, device, pcfg.timeout_s, owns_group=owns)
        with ctx.guard():
            ctx.mesh = dims.build_mesh(device.type)
            ctx.expert_mesh = dims.build_expert_mesh(device.type)
        return ctx

    @property
    def distributed(self) -> bool:
        return self.dims.world > 1

    def guard(self):
        """Context in which a dead or hung peer ends this rank with a clear message."""
        return peer_guard(self.rank, self.timeout_s) if self.distributed \
            else contextlib.nullcontext()

    # -- aggregation -------------------------------------------------------------------
    def sum_reducer(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM of `t` over all ranks (in place; returned for chaining).

        With TP/PP only the data-parallel ranks hold different data: the sum runs over
        the flattened ('dp_replicate', 'dp_shard') sub-mesh (parallel/meshes.py).
        """
        if self.distributed and self.dims.dp > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t

    @property
    def dp_group(self):
        """Process group of this rank's data-parallel peers (the world if tp = pp = 1)."""
        if self.dims.tp == 1 and self.dims.pp == 1:
            return None  # the default group
        if not hasattr(self, "_dp_group"):
            self._dp_group = group(dp_mesh(self.mesh))
        return self._dp_group

    @property
    def dp_rank(self) -> int:
        """Which data-parallel slice of each global batch this rank reads."""
        if not self.distributed:
            return 0

        return dp_rank(self.mesh, self.dims)

    def step_options(self, pm) -> dict:
        """Keyword arguments for `StepOptions` that make the step data-parallel
        (`pm`: the ParallelModel of parallel/parallelize.py `build_parallel_model`)."""
        if not self.distributed:
            return {}
        model = pm.module

        no_sync = fsdp_no_sync if self.dims.fsdp else ddp_no_sync
        if self.dims.tp > 1 or self.dims.pp > 1:  # issue #6: TP/PP hooks of the step
            return model_parallel_step_options(self, model, no_sync)
        opts = {"count_reducer": self.sum_reducer,
                "no_sync": lambda: no_sync(model),
                "loss_multiplier": float(self.dims.dp)}
        if self.dims.ep > 1:  # dense and expert gradients live on two meshes
            opts["clip_norm"] = ep_grad_norm
        return opts

    # -- coordination ------------------------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body first (e.g. prepares the data cache), then the others."""
        if self.rank != 0:
            self.barrier()
        yield
        if self.rank == 0:
            self.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.dims.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the process group if this context joined it (idempotent)."""
        if not self._closed and self.owns_group:
            # Leave together: a rank that tears its gloo pairs down while a peer is still
            # working (rank 0 writes the summary and plots) was seen to abort at exit
            # ("terminate called without an active exception", ~1 run in 12 here).
            self.barrier()
            destroy_distributed()
        self._closed = True
