"""The batch plan of a run: global batch, per-rank batch, micro-batch and accumulation
steps, for every descent mode and batch ramp (optim/batch_rules.py has the rules).

It is computed once where a run is built (the trainer, the parameter server) and handed
to what needs it — activation checkpointing, the pipeline, `plan`, the summary — so that
no other place re-derives the micro-batch from the config. It depends on the config alone
(plus the data-parallel degree and the train split's size), so it lives in the lowest
layer, importable from `parallel/`, `plan/` and `paramserver/` without cycles.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError


def full_batch_size(cfg: Config, n_train: int | None = None) -> int:
    """The global batch of one step once any ramp is over (samples)."""
    mode = cfg.train.descent
    if mode == "stochastic":
        return 1
    if mode == "full-batch":
        if n_train is None:
            raise ValueError("full-batch descent needs the size of the train split")
        return n_train
    return cfg.train.batch_size


@dataclass(frozen=True)
class BatchPlan:
    """Global batch and micro-batch size of every step."""

    full: int  # global batch after the ramp
    micro: int  # samples per forward on one rank
    dp: int
    # samples per forward of the output head + loss: `micro`, or under pp > 1 the
    # pipeline's own micro-batch (per_rank / pipeline_microbatches); model.loss_chunks=-1
    # is resolved from it, by the trainer and by `plan` alike
    head_micro: int
    ramp_start: int = 0  # 0: no ramp
    ramp_tokens: int = 0

    @property
    def per_rank(self) -> int:
        """Samples of one full step on each data-parallel rank."""
        return self.full // self.dp

    @property
    def accum(self) -> int:
        """Micro-batches per rank in a full step (the last one possibly smaller: a
        full-batch split need not divide by the micro-batch)."""
        return -(-self.per_rank // self.micro)

    def batch_size(self, tokens_seen: int) -> int:
        """Global batch of the step that follows `tokens_seen` trained tokens."""
        if not self.ramp_tokens or tokens_seen >= self.ramp_tokens:
            return self.full
        # Integer arithmetic: the same batch sizes on every machine.
        b = self.ramp_start + (self.full - self.ramp_start) * tokens_seen // self.ramp_tokens
        return min(self.full, b // self.ramp_start * self.ramp_start)


def pipeline_microbatches(pcfg, per_rank_batch: int, micro: int) -> int:
    """Micro-batches per pipeline step: parallel.pp_microbatches or batch / micro."""
    m = pcfg.pp_microbatches or max(1, per_rank_batch // max(1, micro))
    if per_rank_batch % m:
        raise ConfigError(f"parallel.pp_microbatches={m} must divide the per-rank batch "
                          f"of {per_rank_batch} samples (train.batch_size / data-parallel "
                          "degree)")
    return m


def batch_plan(cfg: Config, dp: int, n_train: int | None = None, *, pp: int) -> BatchPlan:
    """The batch plan of `cfg` over `dp` data-parallel ranks and `pp` pipeline ranks
    (the resolved layout's: ParallelDims.pp; it sets the head's micro-batch).

    `n_train`: the train split's samples, the batch of full-batch descent. None where the
    data is not prepared yet (`scaletrain plan`, the launcher's checks): full-batch is
    then sized by train.batch_size, the batch those callers are handed (plan/preflight.py
    sets it to the split)."""
    t = cfg.train
    full = t.batch_size if t.descent == "full-batch" and n_train is None \
        else full_batch_size(cfg, n_train)
    if full % dp:
        raise ConfigError(f"train.descent='{t.descent}': the global batch of {full} samples "
                          f"does not divide over the data-parallel degree {dp}")
    per_rank = full // dp
    # A micro-batch that does not divide a full-batch split leaves a smaller last one;
    # the step normalises by the global target count, so that is still exact.
    micro = min(t.micro_batch_size, per_rank) if t.micro_batch_size else per_rank
    if t.batch_ramp and t.batch_ramp_start > full:
        raise ConfigError(f"train.batch_ramp_start={t.batch_ramp_start} exceeds the "
                          f"global batch {full}")
    head_micro = micro if pp <= 1 else \
        per_rank // pipeline_microbatches(cfg.parallel, per_rank, micro)
    return BatchPlan(full=full, micro=micro, dp=dp, head_micro=head_micro,
                     ramp_start=t.batch_ramp_start, ramp_tokens=t.batch_ramp)
