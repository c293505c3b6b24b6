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


# Bounds shared by several fields. A seed must be a TOML integer (int64) to round-trip
# through config.toml; torch.manual_seed overflows above 2**64-1. Thread counts: libgomp
# segfaults when asked for 100,000 threads (issue 13); 1024 is far above any machine's
# useful intra-op parallelism.
MAX_SEED = 2**63 - 1
MAX_THREADS = 1024


def F(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
      gt: float | None = None, le: float | None = None, lt: float | None = None,
      path: bool = False):
    """A config field with its documentation and the constraints `load.validate` checks.

    `path`: the value names a file or directory (or a glob): a leading `~` is expanded
    to the home directory (config/paths.py), as a shell does outside quotes."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dir: str = F("runs/default", "Run directory: config, metrics, checkpoints, plots, tokenizer.",
             path=True)
    overwrite: bool = F(False, "Start afresh even if the run directory already holds a run.")


@dataclass
class ModelConfig:
    name: str = F("gpt", "Model family from the registry: 'gpt' (GPT-2), 'llama' (Llama 3 / "
                  "Qwen 2.5 / Qwen 3 / Mistral decoders), 'mlp' or 'cnn' (images).",
                  choices=("gpt", "llama", "mlp", "cnn"))
    n_layer: int = F(4, "Text models: number of transformer blocks.", ge=1)
    n_head: int = F(4, "Text models: attention (query) heads per block; GPT: must divide "
                    "d_model.", ge=1)
    d_model: int = F(128, "Text models: residual stream width.", ge=1)
    d_ff: int = F(0, "Text models: MLP hidden width; 0 means 4 * d_model (GPT) or Llama's "
                  "8/3 * d_model rounded up to a multiple of 64 (llama).", ge=0)
    seq_len: int = F(128, "Text models: context length in tokens.", ge=1)
    vocab_size: int = F(0, "Text models: vocabulary size; 0 takes the prepared tokenizer's.",
                        ge=0)
    dropout: float = F(0.0, "Dropout probability (GPT: embeddings, attention, residual).",
                       ge=0.0, lt=1.0)
    bias: bool = F(True, "GPT: biases in linear layers and LayerNorms (GPT-2 has them).")
    init_std: float = F(0.02, "Std of the normal initialisation of weights.", gt=0.0)
    n_kv_head: int = F(0, "llama: key/value heads (grouped-query attention); 0 means n_head; "
                       "n_head must be a multiple.", ge=0)
    head_dim: int = F(0, "llama: features per attention head; 0 means d_model / n_head.",
                      ge=0)
    norm_eps: float = F(1e-5, "llama: epsilon of the RMSNorms.", gt=0.0, lt=1.0)
    rope_theta: float = F(10000.0, "llama: base of the rotary position embedding's "
                          "frequencies (Llama 3: 500000).", gt=0.0)
    rope_scaling: str = F("none", "llama: rotary frequency scaling: 'none' or 'llama3' "
                          "(Llama 3.1's, with the rope_factor / rope_*_freq_factor / "
                          "rope_original_seq_len fields).", choices=("none", "llama3"))
    rope_factor: float = F(8.0, "llama: rope_scaling='llama3' slow-down of long wavelengths.",
                           ge=1.0)
    rope_low_freq_factor: float = F(1.0, "llama: rope_scaling='llama3' low-frequency factor.",
                                    gt=0.0)
    rope_high_freq_factor: float = F(4.0, "llama: rope_scaling='llama3' high-frequency "
                                     "factor (> rope_low_freq_factor).", gt=0.0)
    rope_original_seq_len: int = F(8192, "llama: rope_scaling='llama3' original context "
                                   "length.", ge=1)
    qkv_bias: bool = F(False, "llama: biases on the q/k/v projections (Qwen2 has them).")
    qk_norm: bool = F(False, "llama: RMSNorm over each head of q and k (Qwen3 has it).")
    tie_embeddings: bool = F(False, "llama: the output head shares the token embedding "
                             "(small Qwen / SmolLM models; Llama 3 8B does not).")
    hf_architecture: str = F("", "llama: the Hugging Face class the weights came from "
                             "(LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                             "MistralForCausalLM), which `export --format hf` writes; set "
                             "by init.from of an HF directory; empty: from the flags.")
    moe_experts: int = F(0, "llama: routed experts per mixture-of-experts layer; 0 = a "
                         "dense model (every moe_* field then stays at its default).", ge=0)
    moe_top_k: int = F(2, "llama MoE: experts each token is routed to (<= moe_experts).",
                       ge=1)
    moe_d_ff: int = F(0, "llama MoE: hidden width of each expert's SwiGLU; 0 = model.d_ff "
                      "(the Llama rule if that is 0).", ge=0)
    moe_shared_experts: int = F(0, "llama MoE: always-on experts of width moe_d_ff beside "
                                "the routed ones (DeepSeek / Qwen-MoE style).", ge=0)
    moe_every: int = F(1, "llama MoE: block i >= moe_first_dense is an MoE block when "
                       "(i + 1) % moe_every == 0 (Qwen-MoE's decoder_sparse_step).", ge=1)
    moe_first_dense: int = F(0, "llama MoE: the first this many blocks keep a dense MLP "
                             "(DeepSeek's first_k_dense_replace).", ge=0)
    moe_router: str = F("softmax", "llama MoE: 'softmax' top-k (Mixtral, Qwen3-MoE) or "
                        "'sigmoid_bias' (DeepSeek-V3: sigmoid scores, top-k chosen with a "
                        "per-expert bias moved toward balance after every step).",
                        choices=("softmax", "sigmoid_bias"))
    moe_norm_topk_prob: bool = F(True, "llama MoE: renormalise the chosen experts' weights "
                                 "to sum to one (Mixtral always; Qwen3-MoE norm_topk_prob).")
    moe_aux_loss: float = F(0.0, "llama MoE: coefficient of the load-balancing loss "
                            "(Switch / Mixtral form E * sum_e f_e * P_e, per sequence); "
                            "0 = off.", ge=0.0)
    moe_z_loss: float = F(0.0, "llama MoE: coefficient of the router z-loss "
                          "(logsumexp(logits)^2 per token, ST-MoE); 0 = off.", ge=0.0)
    moe_capacity_factor: float = F(0.0, "llama MoE: 0 = no token is ever dropped; > 0 = each "
                                   "expert takes at most ceil(factor * tokens * top_k / "
                                   "experts) per layer call and the overflow is dropped and "
                                   "counted (metrics.jsonl moe_dropped).")
    moe_bias_update_rate: float = F(0.001, "llama MoE, moe_router='sigmoid_bias': step of "
                                    "the per-expert bias after each optimizer step "
                                    "(DeepSeek-V3's gamma).", ge=0.0)
    hidden: int = F(256, "MLP: hidden width.", ge=1)
    channels: int = F(32, "CNN: channels of the residual blocks.", ge=1)
    n_blocks: int = F(2, "CNN: number of residual blocks.", ge=1)
    weight_norm: bool = F(False, "Weight normalisation (w = g * v / ||v||, Salimans & "
                          "Kingma 2016) on every linear layer not tied to an embedding.")


@dataclass
class DataConfig:
    source: str = F("python-stdlib", "'python-stdlib' (built-in text corpus), 'digits' "
                    "(scikit-learn images), or a file / directory / glob: UTF-8 text files "
                    "(one document each), JSONL (.jsonl, .jsonl.gz, .jsonl.zst), Parquet, "
                    "or a datasets.save_to_disk directory.", path=True)
    text_key: str = F("text", "The field of a JSONL / Parquet / saved-dataset record that "
                      "holds its text.")
    prepared_dir: str = F("data/prepared", "Where prepared datasets are cached, keyed by "
                          "a hash of the inputs and settings.", path=True)
    vocab_size: int = F(4096, "BPE vocabulary size trained on the train split.",
                        ge=260, le=65536 * 64)
    tokenizer: str = F("", "A tokenizer.json to encode with instead of training a BPE "
                       "(set from init.from / distill.teacher so ids mean the same).",
                       path=True)
    val_fraction: float = F(0.05, "Fraction of documents in the validation split.",
                            ge=0.0, lt=1.0)
    test_fraction: float = F(0.05, "Fraction of documents in the test split.", ge=0.0, lt=1.0)
    min_chars: int = F(32, "Documents shorter than this (after cleaning) are dropped.", ge=0)
    max_files: int = F(0, "Read at most this many files (sorted by path); 0 = all.", ge=0)
    prep_workers: int = F(2, "Worker processes (datatrove tasks at once) that read, clean "
                          "and tokenize during preparation.", ge=1)
    executor: str = F("local", "How the preparation pipeline runs: 'local' (datatrove's "
                      "local executor, data.prep_workers processes).", choices=("local",))
    tokenizer_sample_bytes: int = F(256 << 20, "The BPE tokenizer trains on about this many "
                                    "bytes of the train split (a deterministic sample; all "
                                    "of it when smaller).", ge=1)
    loader_workers: int = F(0, "Background threads prefetching batches; 0 = in the loop.",
                            ge=0)
    shuffle: bool = F(True, "Shuffle samples with a seeded, world-size-independent order.")
    document_masking: bool = F(False, "Text models: documents packed into a window (each "
                               "ended by the end-of-text token) do not attend to each other, "
                               "and position ids restart at every document (models/"
                               "documents.py); off = attention and positions run across "
                               "the whole window, as GPT-2 trained.")
    assignment: str = F("block", "How a rank takes its part of each global batch: a "
                        "contiguous block or every world-size-th sample.",
                        choices=("block", "strided"))


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
    malloc_mmap_threshold_mib: int = F(0, "CPU runs (glibc): tensors below this size come "
                                       "from the heap and reuse its pages step after "
                                       "step instead of being mapped and zero-filled "
                                       "anew (~11% faster gpt-10m bf16 steps at 256; "
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


@dataclass
class ParallelConfig:
    dp_replicate: int = F(1, "Data-parallel replicas: gradients all-reduced (DDP; with "
                          "dp_shard > 1, HSDP). -1 = inferred from the world size.", ge=-1)
    dp_shard: int = F(-1, "Data-parallel shards: parameters, gradients and optimizer "
                      "state sharded (FSDP2 / ZeRO-3). -1 = inferred from the world size "
                      "(world / (dp_replicate * tp * pp)).", ge=-1)
    tp: int = F(1, "Tensor-parallel degree.", ge=1)
    pp: int = F(1, "Pipeline-parallel degree.", ge=1)
    # Model parallelism options (issue #6; parallel/tensor.py, parallel/pipeline.py).
    pp_schedule: str = F("1f1b", "Pipeline schedule: 'gpipe' (all forwards, then all "
                         "backwards), '1f1b' (one forward one backward: activations of at "
                         "most pp micro-batches alive) or 'interleaved-1f1b' (pp_virtual "
                         "stages per rank, smaller bubble).",
                         choices=("gpipe", "1f1b", "interleaved-1f1b"))
    pp_microbatches: int = F(0, "Pipeline micro-batches per step (>= stages); 0 = the "
                             "rank's batch / train.micro_batch_size.", ge=0)
    pp_virtual: int = F(2, "interleaved-1f1b: pipeline stages per rank.", ge=1)
    pp_split_points: str = F("", "Manual pipeline split: comma-separated block indices "
                             "where a new stage starts (e.g. '6' or '3,6,9'); empty = "
                             "blocks split evenly.")
    sequence_parallel: bool = F(False, "TP: shard LayerNorm/dropout activations along the "
                                "sequence (Korthikanti et al. 2022); needs seq_len % tp == 0.")
    loss_parallel: bool = F(True, "TP: keep the logits vocabulary-sharded and compute the "
                            "cross-entropy without gathering them (torch loss_parallel).")
    backend: str = F("auto", "Collective backend: 'auto' = NCCL on CUDA, gloo on CPU.",
                     choices=("auto", "gloo", "nccl"))
    timeout_s: float = F(600.0, "Seconds a collective may wait for a peer before the "
                         "run stops with an error (a dead or hung rank).", gt=0.0)
    reshard_after_forward: bool = F(True, "FSDP2: free each block's gathered parameters "
                                    "after its forward (ZeRO-3); false keeps them until "
                                    "the backward (more memory, one all-gather less).")
    cpu_offload: bool = F(False, "FSDP2: keep parameter shards, gradients and optimizer "
                          "state in host memory (CPUOffloadPolicy).")
    activation_checkpoint: str = F("none", "Recompute activations per transformer block "
                                   "in the backward: 'full' (keep only block inputs), "
                                   "'selective' (keep matmul/attention outputs), or "
                                   "'budget' (the least recomputation, block by block, "
                                   "that fits parallel.activation_budget_gib).",
                                   choices=("none", "full", "selective", "budget"))
    activation_checkpoint_every: int = F(1, "full / selective: checkpoint every k-th block "
                                         "(0, k, 2k, ...); 1 = all blocks.", ge=1)
    activation_budget_gib: float = F(0.0, "budget mode: GiB that this rank's blocks may "
                                     "keep for the backward per micro-batch (the plan's "
                                     "byte model; `scaletrain plan` shows the result).",
                                     ge=0.0)
    ddp_bucket_mb: int = F(25, "DDP: gradient bucket size in MiB (all-reduce granularity, "
                           "overlapped with the backward).", ge=1)
    # Parameter-server mode (issue #7; scaletrain/paramserver/).
    mode: str = F("spmd", "'spmd': every rank trains (data/sharded parallel); 'ps': "
                  "parameter server — ranks [0, ps_servers) hold the parameters, the rest "
                  "are workers.", choices=("spmd", "ps"))
    ps_servers: int = F(1, "PS: server processes (ranks 0..ps_servers-1); parameters are "
                        "sharded across them, balanced by size.", ge=1)
    ps_consistency: str = F("sync", "PS: 'sync' (one update per step from every worker), "
                            "'async' (Downpour: apply each push at once) or 'ssp' (stale-"
                            "synchronous: at most ps_staleness steps ahead of the slowest).",
                            choices=("sync", "async", "ssp"))
    ps_staleness: int = F(2, "PS ssp: how many steps a worker may run ahead of the slowest "
                          "(0 = sync).", ge=0)
    ps_push_every: int = F(1, "PS async: push the accumulated gradient every this many "
                           "worker steps.", ge=1)
    ps_pull_every: int = F(1, "PS async: pull fresh parameters every this many worker "
                           "steps.", ge=1)
    ps_weighting: str = F("tokens", "PS: weight workers' gradients by their target tokens "
                          "(= one big batch) or equally.", choices=("tokens", "equal"))
    ps_timeout_s: float = F(60.0, "PS: a worker silent for this long while others wait "
                            "(or, in async, at all) is dropped and training goes on.", gt=0.0)
    ps_slow_worker: int = F(-1, "PS, tests/benchmarks only: index of a worker to slow "
                            "down; -1 = none.", ge=-1)
    ps_slow_delay_s: float = F(0.0, "PS, tests/benchmarks only: seconds the slowed worker "
                               "sleeps after each step.", ge=0.0)


@dataclass
class PlanConfig:
    # Memory planning (issue #8; scaletrain/plan/): `scaletrain plan --fit` and this.
    auto: bool = F(False, "At start-up, choose the cheapest micro-batch, activation "
                   "checkpointing, CPU offload, precision and optimizer that fit the "
                   "memory (scaletrain plan --fit) and apply them; logged in plan.json "
                   "and summary.json.")
    memory_gib: float = F(0.0, "Memory per rank the plan may use, GiB; 0 = detect (90% of "
                          "MemAvailable / local ranks on CPU, of the GPU's free memory).",
                          ge=0.0)


@dataclass
class GenerateConfig:
    prompt: str = F("def ", "Text the samples continue.")
    num_samples: int = F(3, "How many samples to draw.", ge=1)
    max_new_tokens: int = F(120, "Tokens to generate per sample.", ge=1)
    temperature: float = F(0.8, "Softmax temperature; 0 = greedy.", ge=0.0)
    top_k: int = F(40, "Sample among the k most likely tokens; 0 = all.", ge=0)
    seed: int = F(0, "Seed of the sampling; 0 .. 2**63-1.", ge=0, le=MAX_SEED)


@dataclass
class InitConfig:
    # Fine-tuning (issue #9), scaletrain/finetune/. `from` is a Python keyword: the field
    # is `from_` in code and `init.from` on the command line and in TOML (load.py maps
    # a key that is a keyword to the name with a trailing underscore).
    from_: str = F("", "Start from trained weights: a run directory, an export / "
                   "compressed artefact directory, or a Hugging Face GPT-2 directory "
                   "(config.json + model.safetensors). The model config and tokenizer "
                   "come from it; data and optimizer from this config. Empty = train "
                   "from scratch.", path=True)
    weights: str = F("best", "Which weights of a run directory: best validation or final.",
                     choices=("best", "final"))


@dataclass
class FinetuneConfig:
    freeze: list[str] = F([], "Freeze parameters whose name matches one of these fnmatch "
                          "patterns, e.g. ['wte.*', 'wpe.*', 'blocks.0.*'].")
    lora_rank: int = F(0, "LoRA rank r (Hu et al. 2021); 0 = off. Only the adapters train "
                       "and are saved; the base weights come from init.from.", ge=0)
    lora_alpha: float = F(16.0, "LoRA scale numerator: the update is (alpha / r) * B A.",
                          gt=0.0)
    lora_targets: list[str] = F(["c_attn", "c_proj", "c_fc"], "Linear layers (by last "
                                "name component) that get LoRA adapters.")
    lora_dropout: float = F(0.0, "Dropout on the adapter input.", ge=0.0, lt=1.0)


@dataclass
class DistillConfig:
    teacher: str = F("", "Run (or artefact) directory of a teacher model; empty = off. Loss "
                     "= (1-alpha) CE + alpha T^2 KL(teacher_T || student_T) (Hinton et al. "
                     "2015). The teacher must share the student's tokenizer.", path=True)
    alpha: float = F(0.5, "Weight of the distillation term.", ge=0.0, le=1.0)
    temperature: float = F(2.0, "Softmax temperature T of both distributions.", gt=0.0)


@dataclass
class PruneConfig:
    method: str = F("none", "`compress`: 'magnitude' (global unstructured L1, "
                    "torch.nn.utils.prune) or 'structured' (drop attention heads and MLP "
                    "channels of lowest L2 norm; the matrices really shrink).",
                    choices=("none", "magnitude", "structured"))
    amount: float = F(0.5, "Fraction of weights (magnitude) or of heads and MLP channels "
                      "(structured) to remove.", ge=0.0, lt=1.0)
    finetune_steps: int = F(0, "Short fine-tune after pruning (masks kept), in steps.", ge=0)
    finetune_lr: float = F(3e-4, "Learning rate of that fine-tune (constant).", gt=0.0)


@dataclass
class QuantConfig:
    methods: list[str] = F([], "`compress`: quantized artefacts to make, any of "
                           "'dynamic-int8' (torch.ao dynamic int8 linears, CPU), "
                           "'weight-int8', 'weight-int4' (weight-only, per-channel / "
                           "group-wise scales; embeddings too).")
    group_size: int = F(32, "weight-int4: input columns sharing one scale.", ge=1)


@dataclass
class CompressConfig:
    out: str = F("", "Where `compress` writes artefacts, report.json and report.png; "
                 "empty = <run>/compressed.", path=True)
    eval_batches: int = F(20, "Validation batches for the report's loss.", ge=1)
    gen_tokens: int = F(64, "Tokens generated (greedy, KV cache) to time tokens/s.", ge=1)
    gen_threads: int = F(0, "torch threads while timing generation; 0 = as set. Batch-1 "
                         "decoding of a small model is latency-bound: 1 is often fastest.",
                         ge=0, le=MAX_THREADS)
    gen_repeats: int = F(5, "Timed generations per artefact, after one untimed warm-up; "
                         "the report gives their median tokens/s.", ge=1)


@dataclass
class ServeConfig:
    host: str = F("127.0.0.1", "Interface to listen on (localhost by default).")
    port: int = F(8000, "TCP port; 0 picks a free one (printed at start).", ge=0, le=65535)
    max_tokens: int = F(256, "Largest max_tokens a request may ask for.", ge=1)
    max_prompt_chars: int = F(8192, "Longest prompt accepted, in characters.", ge=1)
    max_body_bytes: int = F(65536, "Largest request body accepted (413 beyond).", ge=1)
    read_timeout_s: float = F(30.0, "A connection that sends (or accepts) nothing for this "
                              "many seconds is closed: a stalled client cannot hold a "
                              "thread. Idle keep-alive connections end the same way.", gt=0.0)
    max_connections: int = F(64, "Open connections served at once, each on its own thread; "
                             "one more is answered 503 (JSON, Retry-After) and closed.", ge=1)


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


def sections(cfg: Config | None = None) -> dict[str, Any]:
    """Section name -> section object (or class, without `cfg`), in declaration order."""
    if cfg is None:
        return {f.name: f.default_factory for f in fields(Config)}
    return {f.name: getattr(cfg, f.name) for f in fields(Config)}
