"""The sections of the tools built on a run: generate, init, finetune, distill, prune, quant, compress, serve."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.fields import F, MAX_SEED, MAX_THREADS


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
