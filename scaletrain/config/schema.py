"""The typed configuration tree: one dataclass per section, one documented field each.

Every field is declared with :func:`F`, which carries its documentation and its
constraints (choices, bounds) as dataclass metadata. `config/load.py` reads that metadata
to validate values generically, and `scaletrain train --help-config` prints it, so the
documentation, the validation and the code cannot drift apart.

The sections live in one file per group (model_schema, data_schema, train_schema,
parallel_schema, tools_schema, metrics_schema); this module assembles them into `Config`.

Precedence: command line (``--section.key=value``) > TOML file > these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from scaletrain.config.data_schema import DataConfig
from scaletrain.config.dpo_schema import DPOConfig
from scaletrain.config.fields import F, MAX_SEED, MAX_THREADS
from scaletrain.config.metrics_schema import MetricsConfig
from scaletrain.config.model_schema import ModelConfig
from scaletrain.config.parallel_schema import ParallelConfig, PlanConfig
from scaletrain.config.tools_schema import (
    CompressConfig, DistillConfig, FinetuneConfig, GenerateConfig, InitConfig, PruneConfig,
    QuantConfig, ServeConfig)
from scaletrain.config.train_schema import (
    CheckpointConfig, EvalConfig, FaultsConfig, OptimConfig, PrecisionConfig, RunConfig,
    ScheduleConfig, TrainConfig)

__all__ = ["F", "MAX_SEED", "MAX_THREADS", "Config", "sections", "RunConfig", "ModelConfig",
           "DataConfig", "TrainConfig", "OptimConfig", "ScheduleConfig", "PrecisionConfig",
           "EvalConfig", "CheckpointConfig", "FaultsConfig", "ParallelConfig", "PlanConfig",
           "GenerateConfig", "InitConfig", "FinetuneConfig", "DistillConfig", "PruneConfig",
           "QuantConfig", "CompressConfig", "ServeConfig", "MetricsConfig", "DPOConfig"]


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    init: InitConfig = field(default_factory=InitConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


def sections(cfg: Config | None = None) -> dict[str, Any]:
    """Section name -> section object (or class, without `cfg`), in declaration order."""
    if cfg is None:
        return {f.name: f.default_factory for f in fields(Config)}
    return {f.name: getattr(cfg, f.name) for f in fields(Config)}

