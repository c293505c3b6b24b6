"""The sections of a training run: run, train, optim, schedule, precision, eval, checkpoint, faults."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.fields import F, MAX_SEED, MAX_THREADS


@dataclass
class RunConfig:
    dir: str = F("runs/default", "Run directory: config, metrics, checkpoints, plots, tokenizer.",
             path=True)
    overwrite: bool = F(False, "Start afresh even if the run directory already holds a run.")


@dataclass
class TrainConfig:
    steps: int = F(2000, "Optimizer steps to run (in total, counting resumed ones).", ge=1)
    batch_size: int = F(32, "Global batch in samples per optimizer step.", ge=1)
    micro_batch_size: int = F(0, "Samples per forward on one rank; 0 = the whole per-rank "
                              "batch. Accumulation = batch / (micro * data-parallel).", ge=0)
    seed: int = F(1337, "Seed of weights, data order and dropout; 0 .. 2**63-1 (a TOML "
                  "integer; torch.manual_seed's range).", ge=0, le=MAX_SEED)
    grad_clip: float = F(1.0, "Clip the global gradient norm to this; 0 = off.", ge=0.0)
    grad_clip_value: float = F(0.0, "Clip each gradient element to [-v, v]; 0 = off.", ge=0.0)
    device: str = F("auto", "'auto' (CUDA if present, else CPU), 'cpu' or 'cuda'.",
                    choices=("auto", "cpu", "cuda"))
    threads: int = F(0, "torch intra-op threads; 0 = the cores available to this rank; "
                     f"at most {MAX_THREADS} (OpenMP crashes on absurd counts).", ge=0,
                     le=MAX_THREADS)
    compile: bool = F(False, "torch.compile each transformer block (after activation "
                      "checkpointing, before FSDP/DDP); compile time is reported apart "
                      "as compile_s in summary.json.")
    compile_scope: str = F("blocks", "What train.compile compiles: 'blocks' (each block, "
                           "plus the head and loss as one region: any layout) or 'model' "
                           "(the whole forward with its loss as one graph: one process "
                           "only; longer compile, fewer graph boundaries).",
                           choices=("blocks", "model"))
    log_interval: int = F(10, "Write a train record every this many steps.", ge=1)
    malloc_mmap_threshold_mib: int = F(256, "CPU runs (glibc): tensors below this "
                                       "size come from the heap and reuse its pages "
                                       "step after step instead of being mapped and "
                                       "zero-filled anew (3-11% faster gpt-10m steps; "
                                       "`plan` counts the resident pages it keeps: "
                                       "plan/malloc.py); 0 = glibc's defaults.",
                                       ge=0, le=65536)
    host_reads: str = F("auto", "When the host reads each step's values (token count, "
                        "fault guard's loss and norm, stop flag): 'lagged' one step late "
                        "(no sync inside the step; the skip is decided on the device with "
                        "fused Adam/AdamW), 'every-step' at once; 'auto' = lagged on CUDA.",
                        choices=("auto", "lagged", "every-step"))
    progress: str = F("auto", "Progress bar: 'auto' shows it only on a terminal.",
                      choices=("auto", "on", "off"))
    descent: str = F("mini-batch", "'mini-batch' (train.batch_size per step), "
                     "'stochastic' (one sample per step) or 'full-batch' (the whole train "
                     "split per step).", choices=("mini-batch", "stochastic", "full-batch"))
    batch_ramp: int = F(0, "Ramp the global batch from train.batch_ramp_start up to the "
                        "full batch over this many trained tokens; 0 = off.", ge=0)
    batch_ramp_start: int = F(0, "Global batch (samples) of the first step of the ramp; a "
                              "multiple of micro_batch_size x data-parallel degree.", ge=0)
    objective: str = F("lm", "What the step trains: 'lm' (next-token cross-entropy on "
                       "the data's targets) or 'dpo' (preference tuning on JSONL records of "
                       "prompt / chosen / rejected, Rafailov et al. 2023: the [dpo] section, "
                       "train/dpo.py).", choices=("lm", "dpo"))


@dataclass
class OptimConfig:
    name: str = F("adamw", "Optimizer from torch.optim, or 'adamw8bit' (AdamW with 8-bit "
                  "block-wise quantised moments, ~2 bytes/param of state: "
                  "scaletrain/optim/adamw8bit.py).",
                  choices=("sgd", "adam", "adamw", "adagrad", "rmsprop", "adamw8bit"))
    lr: float = F(1e-3, "Peak learning rate (at optim.base_batch_size when scaled).", gt=0.0)
    weight_decay: float = F(0.1, "Decoupled (AdamW) or L2 (others) weight decay on >=2-D "
                            "weights only.", ge=0.0)
    beta1: float = F(0.9, "Adam beta1.", ge=0.0, lt=1.0)
    beta2: float = F(0.95, "Adam beta2.", ge=0.0, lt=1.0)
    eps: float = F(1e-8, "Adam / RMSprop / Adagrad epsilon.", gt=0.0)
    momentum: float = F(0.9, "SGD / RMSprop momentum.", ge=0.0, lt=1.0)
    nesterov: bool = F(False, "SGD: Nesterov momentum.")
    decay_embeddings: bool = F(False, "Apply weight decay to embedding tables too.")
    implementation: str = F("auto", "torch.optim kernel: 'foreach' (batched), 'fused' "
                            "(one kernel; sgd/adam/adamw/adagrad), 'for-loop', or 'auto' "
                            "(fused where torch has it, else foreach); for adamw8bit "
                            "'fused' compiles its update.",
                            choices=("auto", "foreach", "fused", "for-loop"))
    lr_scaling: str = F("none", "Scale optim.lr with the global batch B: 'linear' "
                        "(lr*B/base, Goyal et al. 2017) or 'sqrt' (lr*sqrt(B/base)).",
                        choices=("none", "linear", "sqrt"))
    base_batch_size: int = F(0, "The global batch at which optim.lr holds; 0 = "
                             "train.batch_size.", ge=0)
    l1: float = F(0.0, "L1 penalty l1*sum|w| added to the loss (once per step) on the "
                  "weights that weight decay applies to.", ge=0.0)
    l2: float = F(0.0, "L2 penalty (l2/2)*sum w^2 added to the loss (once per step) on the "
                  "weights that weight decay applies to; unlike AdamW's decoupled decay it "
                  "goes through the optimizer's gradient statistics.", ge=0.0)


@dataclass
class ScheduleConfig:
    name: str = F("cosine", "Learning-rate schedule after warmup (formulas: "
                  "scaletrain/optim/schedules.py).",
                  choices=("constant", "step", "multistep", "exponential", "inverse_time",
                           "linear", "polynomial", "cosine", "wsd", "onecycle", "plateau"))
    warmup_steps: int = F(0, "Linear warmup from 0 to optim.lr over this many steps.", ge=0)
    min_lr: float = F(0.0, "Floor of the learning rate after warmup.", ge=0.0)
    decay_steps: int = F(0, "Length of the decay after warmup; 0 = until train.steps.", ge=0)
    gamma: float = F(0.1, "LR factor per decay: step (every step_size), multistep (per "
                     "milestone), exponential (per step), plateau (per reduction).",
                     gt=0.0, lt=1.0)
    step_size: int = F(100, "step: steps (after warmup) between decays.", ge=1)
    milestones: list[int] = F([], "multistep: steps (after warmup) at which to decay.")
    decay_rate: float = F(0.0, "k of inverse_time lr/(1+k*t), and of exponential's "
                          "continuous form lr*exp(-k*t) when > 0.", ge=0.0)
    epoch_steps: int = F(1, "inverse_time: t counts units of this many steps (1 = per step); "
                         "0 = one epoch over the train split.", ge=0)
    power: float = F(2.0, "polynomial: lr*(1-t/T)^power (2 = square decay).", gt=0.0)
    restart_steps: int = F(0, "cosine: first cycle length for warm restarts; 0 = none.",
                           ge=0)
    restart_mult: int = F(1, "cosine: each cycle is this many times the previous.", ge=1)
    decay_fraction: float = F(0.2, "wsd: fraction of the post-warmup steps that decay.",
                              gt=0.0, le=1.0)
    decay_shape: str = F("sqrt", "wsd: shape of the decay.",
                         choices=("linear", "cosine", "sqrt"))
    pct_start: float = F(0.3, "onecycle: fraction of the cycle spent rising.", gt=0.0, lt=1.0)
    div_factor: float = F(25.0, "onecycle: the cycle starts at optim.lr / div_factor.", ge=1.0)
    patience: int = F(2, "plateau: evaluations without improvement before reducing.", ge=0)
    threshold: float = F(1e-4, "plateau: relative improvement that counts.", ge=0.0)


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
    test_batches: int = F(0, "Test batches of that final evaluation; 0 = the whole split. "
                          "`scaletrain eval --split test` reads the same batches, and "
                          "summary.json gives the samples covered.", ge=0)


@dataclass
class CheckpointConfig:
    interval: int = F(0, "Save a checkpoint every this many steps; 0 = only the end.", ge=0)
    keep: int = F(2, "Keep the newest this many checkpoints.", ge=1)
    keep_best: bool = F(False, "Also keep the checkpoint of the best validation loss.")
    async_save: bool = F(False, "Write checkpoints in the background: the step waits only "
                         "while state is copied to memory; at most one save in flight.")
    resume: str = F("auto", "'auto': resume an existing run.dir from its newest valid "
                    "checkpoint; 'none': refuse to reuse a run.dir that has checkpoints; "
                    "or the path of a checkpoint (or run) directory to resume from.",
                    path=True)
    on_signal: bool = F(True, "On SIGTERM/SIGINT finish the current step, save, and exit.")


@dataclass
class FaultsConfig:
    skip_nonfinite: bool = F(True, "Skip the optimizer step when the loss or gradient norm "
                             "is NaN/inf (needs one host sync per step).")
    spike_sigmas: float = F(6.0, "Skip a step whose loss exceeds mean + this many std of "
                            "the recent losses; 0 = off.", ge=0.0)
    spike_window: int = F(128, "Recent accepted losses the spike statistics use.", ge=2)
    spike_min_history: int = F(64, "No spike detection before this many losses are seen.",
                               ge=2)
    max_consecutive: int = F(8, "After this many consecutive skipped steps, roll back to "
                             "the last checkpoint and skip past the offending batches; "
                             "0 = never roll back.", ge=0)
    rollback_lr_factor: float = F(1.0, "Multiply the learning rate by this after a "
                                  "rollback.", gt=0.0, le=1.0)
