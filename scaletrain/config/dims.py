"""`ParallelDims`: how the world's ranks divide into parallel degrees (DESIGN.md principle 4).

world = dp_replicate × dp_shard × tp × pp; one degree may be -1 and is then inferred
from the world size. The data-parallel degree is dp = dp_replicate × dp_shard: every
data-parallel rank reads its own part of each global batch, while tp/pp ranks of one
data-parallel group read the same data (issue #6: parallel/tensor.py, pipeline.py).

Mesh layout (torchtitan `ParallelDims.build_mesh`): dimensions named
("dp_replicate", "dp_shard") from outermost to innermost, so that the shard group —
which communicates every layer — is made of neighbouring ranks (same node when
nodes hold consecutive ranks), and the replicate group — one all-reduce per step —
spans nodes.

Expert parallelism (issue #17, parallel/expert.py) does not add ranks: `ep` ranks of the
dp_shard group split the routed experts among them (torchtitan's "EP borrows from
dp_shard"). The experts get their own mesh over the same ranks in the same order:
("efsdp", "ep"), "ep" (innermost of the two: neighbours, which exchange tokens twice per
MoE layer) holding one expert slice per rank, "efsdp" = dp_shard / ep ranks holding the
same slice and sharding it with FSDP2 (the "expert data-parallel" group that sums its
gradients). With pipeline stages the expert mesh is ("pp", "efsdp", "ep"): each stage's
dp_shard ranks split that stage's experts (the world mesh's ("pp", "dp_shard") order,
dp_shard cut in two), and its "efsdp" / "ep" sub-meshes are this rank's stage's. With
replicas (HSDP: dp_replicate > 1) the expert mesh is ("dp_replicate", "efsdp", "ep"):
each replica's dp_shard ranks split the experts as above, and the experts' FSDP2 unit is
HSDP over ("dp_replicate", "efsdp") — the replicate group all-reduces the expert
gradients as it does the dense ones (torchtitan's dp_replicate × dp_shard_mod_ep mesh).
Pure DDP (dp_shard = 1) has no dp_shard ranks to carve ep from; dp_replicate=2,
dp_shard=ep=2 is its expert-parallel form (experts split over ep, replicated, not
sharded, over the replicas: efsdp = 1). With
tensor parallelism a "tp" dimension comes last, as in the world mesh: within each tp
index the dp_shard ranks form the expert groups above, and the tp ranks of one group
hold the same expert slice (replicated over tp, as MoE × TP replicates all experts) and
run the same exchange with their own peers — the EP × TP layout, chosen over
torchtitan's "EP borrows from tp" (ETP = 1, the ep group spanning dp_shard × tp ranks)
because it composes the two existing pieces unchanged: under TP every tp rank routes the
whole (under SP gathered) sequence (models/plans.py `moe_tp_plan`), so an ep group that
took tp ranks would receive each token tp times unless the layer first cut the tokens
over tp; here the router statistics stay counted once by the data-parallel sum alone.
The price: each tp rank runs its group's experts redundantly (no tp speed-up for them).
Two of these at once (replicas with pp or tp, tp with pp) are refused until tested.

This module imports no torch.distributed at import time: config checks use it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.errors import ConfigError

_FIELDS = ("dp_replicate", "dp_shard", "tp", "pp")


@dataclass(frozen=True)
class ParallelDims:
    """Resolved (no -1) parallel degrees of a world of `world` ranks."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world: int
    ep: int = 1  # expert-parallel degree, carved out of dp_shard (not a factor of world)

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, tp: int, pp: int,
                world: int, ep: int = 1) -> ParallelDims:
        """Infer a -1 degree and check the product equals `world` (ConfigError if not);
        `ep` must divide the resolved dp_shard."""
        given = dict(zip(_FIELDS, (dp_replicate, dp_shard, tp, pp)))
        bad = [k for k, v in given.items() if v == 0 or v < -1]
        if bad:
            raise ConfigError(f"parallel.{bad[0]}={given[bad[0]]} must be >= 1 or -1 "
                              "(inferred from the world size)")
        free = [k for k, v in given.items() if v == -1]
        if len(free) > 1:
            raise ConfigError(f"only one of parallel.{{{','.join(_FIELDS)}}} may be -1; "
                              f"got -1 for {', '.join('parallel.' + k for k in free)}")
        fixed = 1
        for k, v in given.items():
            if v != -1:
                fixed *= v
        if free:
            if world % fixed:
                raise ConfigError(
                    f"the world size {world} is not divisible by the product {fixed} of "
                    f"the other parallel degrees, so parallel.{free[0]}=-1 cannot be "
                    f"inferred ({_describe(given)})")
            given[free[0]] = world // fixed
        elif fixed != world:
            raise ConfigError(
                f"parallel.dp_replicate × dp_shard × tp × pp = {fixed} "
                f"({_describe(given)}) but the world size is {world} processes; make "
                f"the product equal the world size or set one degree (e.g. "
                f"parallel.dp_shard) to -1")
        dims = cls(**given, world=world)
        if dims.tp > 1 and dims.ddp:
            # torchtitan refuses it too: composable DDP does not handle DTensor (TP)
            # parameters; FSDP2 composes with TP (2-D).
            raise ConfigError(f"parallel.dp_replicate={dims.dp_replicate} with "
                              f"parallel.tp={dims.tp} needs parallel.dp_shard > 1 (DDP does "
                              "not compose with tensor parallel; use dp_shard, FSDP2, or "
                              "HSDP)")
        if ep > 1:
            dims = cls(**given, world=world, ep=_check_ep(ep, dims))
        return dims

    @property
    def efsdp(self) -> int:
        """Ranks that hold the same slice of experts and FSDP-shard it (dp_shard / ep)."""
        return self.dp_shard // self.ep

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that each read a different part of the batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        """Parameters sharded (FSDP2 / ZeRO-3), alone or inside replicas (HSDP)."""
        return self.dp_shard > 1

    @property
    def ddp(self) -> bool:
        """Plain replication (DDP): full parameters everywhere, gradients all-reduced."""
        return self.dp_replicate > 1 and self.dp_shard == 1

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1 and self.dp_shard > 1

    @property
    def strategy(self) -> str:
        """'single', 'ddp', 'fsdp', 'fsdp+ep' (experts split over ep of the FSDP2 ranks)
        or 'hsdp' (for logs and the summary)."""
        if self.hsdp:
            return "hsdp"
        if self.fsdp:
            return "fsdp+ep" if self.ep > 1 else "fsdp"
        return "ddp" if self.ddp else "single"

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(shape, names) of the world device mesh, size-1 dimensions dropped.

        pp outermost and tp innermost (issue #6, parallel/meshes.py): TP communicates in
        every layer, so its ranks are neighbours; PP sends one activation per micro-batch.
        """
        dims = [(n, d) for n, d in (("pp", self.pp), ("dp_replicate", self.dp_replicate),
                                    ("dp_shard", self.dp_shard), ("tp", self.tp)) if d > 1]
        return tuple(d for _, d in dims), tuple(n for n, _ in dims)

    def expert_mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(shape, names) of the experts' mesh (module docstring): ("efsdp", "ep"), with
        "pp" outermost under pipeline stages, "dp_replicate" next with replicas and "tp"
        innermost under TP — the world mesh's order with dp_shard cut into (efsdp, ep)."""
        dims = [(n, d) for n, d in (("pp", self.pp), ("dp_replicate", self.dp_replicate),
                                    ("efsdp", self.efsdp), ("ep", self.ep), ("tp", self.tp))
                if d > 1 or n in ("efsdp", "ep")]
        return tuple(d for _, d in dims), tuple(n for n, _ in dims)

    def build_expert_mesh(self, device_type: str):
        """The experts' DeviceMesh (`expert_mesh_shape`) over the world's ranks, or None
        without expert parallelism. Collective: every rank calls it."""
        if self.ep == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = self.expert_mesh_shape()
        return init_device_mesh(device_type, shape, mesh_dim_names=names)

    def build_mesh(self, device_type: str):
        """The DeviceMesh over all ranks (None for a single process)."""
        if self.world == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = self.mesh_shape()
        return init_device_mesh(device_type, shape, mesh_dim_names=names)


def _check_ep(ep: int, dims: ParallelDims) -> int:
    """`ep` if this layout supports it, else ConfigError (one line saying why)."""
    if ep < 1:
        raise ConfigError(f"parallel.ep={ep} must be >= 1")
    pairs = (("tp", dims.tp, "pp", dims.pp), ("dp_replicate", dims.dp_replicate, "pp", dims.pp),
             ("dp_replicate", dims.dp_replicate, "tp", dims.tp))
    for one, n, other, k in pairs:  # each alone is tested with EP; two at once are not
        if n > 1 and k > 1:
            raise ConfigError(f"parallel.ep={ep} with parallel.{one}={n} and parallel."
                              f"{other}={k} together is not supported yet (EP with "
                              f"{one} and EP with {other} each are; drop one of them)")
    if dims.dp_shard % ep:
        raise ConfigError(f"parallel.ep={ep} must divide parallel.dp_shard={dims.dp_shard} "
                          f"(the expert-parallel ranks are carved out of the FSDP2 ranks, not the "
                          f"dp_replicate replicas; "
                          f"world {dims.world})")
    return ep


def _describe(given: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in given.items())


def resolve_dims(pcfg, world: int) -> ParallelDims:
    """ParallelDims of a `ParallelConfig` section for `world` ranks."""
    return ParallelDims.resolve(pcfg.dp_replicate, pcfg.dp_shard, pcfg.tp, pcfg.pp, world,
                                ep=pcfg.ep)
