"""The typed configuration tree: one dataclass per section, one documented field each.

Every field is declared with :func:`F`, which carries its documentation and its
constraints (choices, bounds) as dataclass metadata. `config/load.py` reads that metadata
to validate values generically, and `scaletrain train --help-config` prints it, so the
documentation, the validation and the code cannot drift apart.

Precedence: command line (``--section.key=value``) > TOML file > these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def F(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
      gt: float | None = None, le: float | None = None, lt: float | None = None):
    """A config field with its documentation and the constraints `load.validate` checks."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dir: str = F("runs/default", "Run directory: config, metrics, checkpoints, plots, tokenizer.")
    overwrite: bool = F(False, "Start afresh even if the run directory already holds a run.")


@dataclass
class ModelConfig:
    name: str = F("gpt", "Model family from the registry.", choices=("gpt", "mlp", "cnn"))
    n_layer: int = F(4, "GPT: number of transformer blocks.", ge=1)
    n_head: int = F(4, "GPT: attention heads per block; must divide d_model.", ge=1)
    d_model: int = F(128, "GPT: residual stream width.", ge=1)
    d_ff: int = F(0, "GPT: MLP hidden width; 0 means 4 * d_model.", ge=0)
    seq_len: int = F(128, "GPT: context length in tokens (learned positions).", ge=1)
    vocab_size: int = F(0, "GPT: vocabulary size; 0 takes the prepared tokenizer's.", ge=0)
    dropout: float = F(0.0, "Dropout probability (GPT: embeddings, attention, residual).",
                       ge=0.0, lt=1.0)
    bias: bool = F(True, "GPT: biases in linear layers and LayerNorms (GPT-2 has them).")
    init_std: float = F(0.02, "Std of the normal initialisation of weights.", gt=0.0)
    hidden: int = F(256, "MLP: hidden width.", ge=1)
    channels: int = F(32, "CNN: channels of the residual blocks.", ge=1)
    n_blocks: int = F(2, "CNN: number of residual blocks.", ge=1)


@dataclass
class DataConfig:
    source: str = F("python-stdlib", "'python-stdlib' (built-in text corpus), 'digits' "
                    "(scikit-learn images), or a directory / glob of UTF-8 text files.")
    prepared_dir: str = F("data/prepared", "Where prepared datasets are cached, keyed by "
                          "a hash of the inputs and settings.")
    vocab_size: int = F(4096, "BPE vocabulary size trained on the train split.",
                        ge=260, le=65536 * 64)
    val_fraction: float = F(0.05, "Fraction of documents in the validation split.",
                            ge=0.0, lt=1.0)
    test_fraction: float = F(0.05, "Fraction of documents in the test split.", ge=0.0, lt=1.0)
    min_chars: int = F(32, "Documents shorter than this (after cleaning) are dropped.", ge=0)
    max_files: int = F(0, "Read at most this many files (sorted by path); 0 = all.", ge=0)
    prep_workers: int = F(2, "Worker processes that tokenize during preparation.", ge=1)
    loader_workers: int = F(0, "Background threads prefetching batches; 0 = in the loop.",
                            ge=0)
    shuffle: bool = F(True, "Shuffle samples with a seeded, world-size-independent order.")
    assignment: str = F("block", "How a rank takes its part of each global batch: a "
                        "contiguous block or every world-size-th sample.",
                        choices=("block", "strided"))


@dataclass
class TrainConfig:
    steps: int = F(2000, "Optimizer steps to run (in total, counting resumed ones).", ge=1)
    batch_size: int = F(32, "Global batch in samples per optimizer step.", ge=1)
    micro_batch_size: int = F(0, "Samples per forward on one rank; 0 = the whole per-rank "
                              "batch. Accumulation = batch / (micro * data-parallel).", ge=0)
    seed: int = F(1337, "Seed of weights, data order and dropout.", ge=0)
    grad_clip: float = F(1.0, "Clip the global gradient norm to this; 0 = off.", ge=0.0)
    grad_clip_value: float = F(0.0, "Clip each gradient element to [-v, v]; 0 = off.", ge=0.0)
    device: str = F("auto", "'auto' (CUDA if present, else CPU), 'cpu' or 'cuda'.",
                    choices=("auto", "cpu", "cuda"))
    threads: int = F(0, "torch intra-op threads; 0 = the cores available to this rank.",
                     ge=0)
    log_interval: int = F(10, "Write a train record every this many steps.", ge=1)
    progress: str = F("auto", "Progress bar: 'auto' shows it only on a terminal.",
                      choices=("auto", "on", "off"))


@dataclass
class OptimConfig:
    name: str = F("adamw", "Optimizer from torch.optim.",
                  choices=("sgd", "adam", "adamw", "adagrad", "rmsprop"))
    lr: float = F(1e-3, "Peak learning rate.", gt=0.0)
    weight_decay: float = F(0.1, "Decoupled (AdamW) or L2 (others) weight decay on >=2-D "
                            "weights only.", ge=0.0)
    beta1: float = F(0.9, "Adam beta1.", ge=0.0, lt=1.0)
    beta2: float = F(0.95, "Adam beta2.", ge=0.0, lt=1.0)
    eps: float = F(1e-8, "Adam / RMSprop / Adagrad epsilon.", gt=0.0)
    momentum: float = F(0.9, "SGD / RMSprop momentum.", ge=0.0, lt=1.0)
    nesterov: bool = F(False, "SGD: Nesterov momentum.")
    decay_embeddings: bool = F(False, "Apply weight decay to embedding tables too.")


@dataclass
class ScheduleConfig:
    name: str = F("cosine", "Learning-rate schedule after warmup.",
                  choices=("constant", "cosine", "linear"))
    warmup_steps: int = F(0, "Linear warmup from 0 to optim.lr over this many steps.", ge=0)
    min_lr: float = F(0.0, "Floor of the learning rate after warmup.", ge=0.0)
    decay_steps: int = F(0, "Length of the decay after warmup; 0 = until train.steps.", ge=0)


@dataclass
class PrecisionConfig:
    dtype: str = F("fp32", "Numeric precision of the step; fp64 is for verification.",
                   choices=("fp32", "bf16", "fp16", "bf16-pure", "fp64"))


@dataclass
class EvalConfig:
    interval: int = F(200, "Evaluate on the validation split every this many steps (and "
                      "at step 0 and the end); 0 = only at the end.", ge=0)
    batches: int = F(20, "Validation batches per evaluation; 0 = the whole split.", ge=0)
    batch_size: int = F(32, "Samples per evaluation batch.", ge=1)
    test: bool = F(True, "Evaluate the best-validation model on the test split at the end.")


@dataclass
class CheckpointConfig:
    interval: int = F(0, "Save a checkpoint every this many steps; 0 = only the end.", ge=0)
    keep: int = F(2, "Keep the newest this many checkpoints.", ge=1)


@dataclass
class ParallelConfig:
    dp_replicate: int = F(1, "Data-parallel replicas (DDP).", ge=1)
    dp_shard: int = F(1, "Data-parallel shards (FSDP2).", ge=1)
    tp: int = F(1, "Tensor-parallel degree.", ge=1)
    pp: int = F(1, "Pipeline-parallel degree.", ge=1)


@dataclass
class GenerateConfig:
    prompt: str = F("def ", "Text the samples continue.")
    num_samples: int = F(3, "How many samples to draw.", ge=1)
    max_new_tokens: int = F(120, "Tokens to generate per sample.", ge=1)
    temperature: float = F(0.8, "Softmax temperature; 0 = greedy.", ge=0.0)
    top_k: int = F(40, "Sample among the k most likely tokens; 0 = all.", ge=0)
    seed: int = F(0, "Seed of the sampling.", ge=0)


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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


def sections(cfg: Config | None = None) -> dict[str, Any]:
    """Section name -> section object (or class, without `cfg`), in declaration order."""
    if cfg is None:
        return {f.name: f.default_factory for f in fields(Config)}
    return {f.name: getattr(cfg, f.name) for f in fields(Config)}
