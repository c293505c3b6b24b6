"""`scaletrain plan --fit`: the cheapest combination of memory techniques that fits.

Knobs searched (all combinations; the model's shape, the global batch and the layout do
not change):
- train.micro_batch_size: the divisors of the per-rank batch up to the configured
  micro-batch (gradient accumulation keeps train.batch_size); not under pipeline
  parallelism (its micro-batches are the schedule's);
- parallel.activation_checkpoint (+ _every): none, selective or full on every 2nd block
  or on every block (parallel/ac.py);
- parallel.cpu_offload: only where it applies (FSDP2, dp_shard > 1, on a GPU: on a CPU
  device the "offloaded" tensors stay in the same memory);
- precision.dtype: the configured one, and bf16 autocast / bf16-pure (fp32 masters) when
  the configured one is fp32, bf16 or bf16-pure;
- optim.name: the configured one, and "adamw8bit" (optim/adamw8bit.py) when it is
  adam/adamw and the schema offers it.

"Cheapest" = the least predicted slow-down, a sum of documented per-technique costs
(fractions of a step's time):
- activation checkpointing: full recomputes the whole forward, +1/3 of the step (forward
  ≈ 1/3 of forward + backward; Chen et al. 2016); selective recomputes only the
  element-wise ops, +0.05 (Korthikanti et al. 2022 §5 report 2–4% on GPUs); on every
  2nd block, the share of blocks checkpointed times that;
- micro-batch: +0.02 per halving (smaller matmuls, one more Python pass per micro-batch;
  on this CPU GEMM throughput is nearly flat above ~512 tokens);
- CPU offload: +0.5 (parameters, gradients and optimizer state cross PCIe every step);
- precision: a dtype other than the configured one +0.04 (the same speed class on bf16
  hardware, but other numerics: tried after two micro-batch halvings, which change
  nothing in the result — the loss is normalised by the step's global token count);
- 8-bit AdamW: +0.5 (dequantise/requantise both moments every step; measured by
  bench/optim8bit.py on 124.5M parameters: 3.08 s per step eager, 0.94 s compiled, vs
  0.35 s for torch's foreach AdamW — ~20 ns/param extra, i.e. ~+0.6 of a 2k-token
  step on this CPU and less for larger batches; tried after selective AC and full AC).
For each combination the largest evaluation batch (eval.batch_size, halved down to 1)
that fits is taken, +0.001 per halving: evaluation's (B, T, V) fp32 logits can be the
peak, and the batch changes nothing in the evaluated loss (a sum over targets / count).
Ties go to the larger micro-batch, then the smaller predicted peak.

A candidate fits when its predicted peak (plan/memory.py) <= the budget: plan.memory_gib
if set (> 0), else 90% of the detected memory per rank (plan/auto.py `detect_memory`),
the 10% a headroom for the model's error (bench/plan_accuracy.py) and other users.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

from scaletrain.config.batch_plan import batch_plan
from scaletrain.config.load import apply_dict, validate
from scaletrain.config.schema import sections
from scaletrain.errors import ConfigError
from scaletrain.models.registry import spec_of
from scaletrain.parallel.ac import RECOMPUTE_COST
from scaletrain.plan.report import plan

AC_COST = RECOMPUTE_COST  # per block (parallel/ac.py, which budget mode shares)
MICRO_HALVING_COST = 0.02
OFFLOAD_COST = 0.5
DTYPE_SWITCH_COST = 0.04
ADAM8BIT_COST = 0.5
EVAL_HALVING_COST = 0.001
DETECTED_FRACTION = 0.9


class NothingFits(ConfigError):
    """No combination of the techniques fits the memory budget (CLI exit 2)."""


@dataclasses.dataclass
class Choice:
    overrides: dict  # "section.key" -> value, only what differs from the config
    cost: float
    peak_bytes: float  # the largest predicted peak over the ranks
    budget_bytes: float

    def lines(self) -> list[str]:
        """The overrides as `--section.key=value` command-line arguments."""
        return [f"--{k}={_fmt(v)}" for k, v in self.overrides.items()]


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _schema_choices(section: str, key: str) -> tuple:
    cls = sections()[section]
    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    return f.metadata.get("choices") or ()


def candidates(cfg, dims, batch, device_type: str):
    """Every (overrides, cost) of the search space (module doc) on the layout `dims`
    (ParallelDims) from `cfg`'s batch plan `batch`, unordered."""
    per_rank, cur_micro = batch.per_rank, batch.micro
    micros = [cur_micro] if dims.pp > 1 else [d for d in _divisors_desc(per_rank)
                                              if d <= cur_micro]
    acs = [("none", 1)]
    blocks = spec_of(cfg.model).activation_block is not None  # AC wraps the family's blocks
    if blocks:
        layers = cfg.model.n_layer
        acs += [(ac, k) for ac in ("selective", "full") for k in (2, 1) if k < layers or k == 1]
    offloads = [False, True] if (dims.dp_shard > 1 and device_type == "cuda") \
        else [cfg.parallel.cpu_offload]
    dt = cfg.precision.dtype
    dtypes = [dt] + ([d for d in ("bf16", "bf16-pure") if d != dt]
                     if dt in ("fp32", "bf16", "bf16-pure") else [])
    optims = [cfg.optim.name]
    if cfg.optim.name in ("adam", "adamw") and "adamw8bit" in _schema_choices("optim", "name") \
            and dims.tp == 1:  # config/strategy_checks.py: no 8-bit state under TP
        optims.append("adamw8bit")
    for micro, (ac, every), off, dtype, opt in itertools.product(micros, acs, offloads,
                                                                 dtypes, optims):
        share = (-(-cfg.model.n_layer // every) / cfg.model.n_layer
                 if blocks else 1.0)  # blocks 0, k, 2k, ... of n
        cost = (AC_COST[ac] * share
                + MICRO_HALVING_COST * math.log2(max(cur_micro, micro) / micro)
                + (OFFLOAD_COST if off and not cfg.parallel.cpu_offload else 0.0)
                + (DTYPE_SWITCH_COST if dtype != dt else 0.0)
                + (ADAM8BIT_COST if opt == "adamw8bit" != cfg.optim.name else 0.0))
        over = {"train.micro_batch_size": micro, "parallel.activation_checkpoint": ac,
                "parallel.activation_checkpoint_every": every,
                "parallel.activation_budget_gib": 0.0,
                "parallel.cpu_offload": off, "precision.dtype": dtype, "optim.name": opt}
        yield over, cost


def _eval_batches(configured: int) -> list[int]:
    """The configured evaluation batch, then halvings down to 1."""
    out = [configured]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def apply_overrides(cfg, overrides: dict):
    """A validated copy of `cfg` with `overrides` ("section.key" -> value) applied."""
    out = copy.deepcopy(cfg)
    table: dict = {}
    for key, value in overrides.items():
        sec, name = key.split(".")
        table.setdefault(sec, {})[name] = value
    return validate(apply_dict(out, table, source="plan"))


def _current(cfg, key: str):
    sec, name = key.split(".")
    return getattr(getattr(cfg, sec), name)


def fit(cfg, dims, vocab: int, budget_bytes: float, device_type: str = "cpu") -> Choice:
    """The cheapest candidate whose predicted peak fits `budget_bytes` per rank.

    `dims`: the run's resolved layout (ParallelDims). The search never changes the
    parallel degrees, so every candidate is planned on this one layout."""
    batch = batch_plan(cfg, dims.dp, pp=dims.pp)  # the searched config's: its micro-batch shrinks
    best = None
    for over, cost in candidates(cfg, dims, batch, device_type):
        peak = math.inf
        for ev in _eval_batches(cfg.eval.batch_size):  # largest evaluation batch that fits
            over = {**over, "eval.batch_size": ev}
            try:  # a combination other rules forbid (batch ramp multiples, TP + 8-bit)
                c = apply_overrides(cfg, over)
                peak = max(r["peak_bytes"] for r in plan(c, dims, vocab, device_type)["ranks"])
            except ConfigError:
                break
            if peak <= budget_bytes:
                cost += EVAL_HALVING_COST * math.log2(cfg.eval.batch_size / ev)
                break
        if peak > budget_bytes:
            continue
        key = (round(cost, 9), -over["train.micro_batch_size"], peak)
        if best is None or key < best[0]:
            best = (key, over, cost, peak)
    if best is None:
        smallest = min(_peak_or_inf(cfg, {**o, "eval.batch_size": 1}, dims, vocab,
                                    device_type)
                       for o, _ in candidates(cfg, dims, batch, device_type))
        raise NothingFits(f"nothing fits {budget_bytes / 2**30:.2f} GiB per rank; "
                          f"the smallest predicted peak is {smallest / 2**30:.2f} GiB "
                          f"(set plan.memory_gib, or a smaller model / batch)")
    _, over, cost, peak = best
    changed = {k: v for k, v in over.items() if v != _current(cfg, k)
               and not (k == "train.micro_batch_size" and _current(cfg, k) == 0
                        and v == batch.per_rank)}  # what micro_batch_size=0 runs
    return Choice(changed, cost, peak, budget_bytes)


def _peak_or_inf(cfg, over: dict, dims, vocab: int, device_type: str) -> float:
    try:
        c = apply_overrides(cfg, over)
    except ConfigError:
        return math.inf
    return max(r["peak_bytes"] for r in plan(c, dims, vocab, device_type)["ranks"])
