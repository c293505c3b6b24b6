"""Predicted PEAK memory of one rank during a training run: what `summary.json`'s
`peak_mem_mb` reports (peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA).

The run passes through phases; each holds a different set of tensors and the peak is the
largest (all sizes per rank, bytes; n = this rank's parameter count, pb / ab = bytes of
the parameter / compute dtype, r = pb the dtype of the residual stream):

- static, from the first optimizer step on: parameters n·pb, optimizer state
  (Adam/AdamW 2 moments, SGD 1 if momentum > 0 else 0, Adagrad/RMSprop 1; fp32, or the
  8-bit AdamW's 2 bytes/param + block scales), fp32 master copies n·4 under bf16-pure
  (optim/master_weights.py keeps them in the optimizer state), DDP's gradient buckets
  n·pb (a second copy of the gradients, `gradient_as_bucket_view=False`);
- forward/backward of a micro-batch: static + the gradients of the earlier micro-batches
  (gradient accumulation: present from the 2nd micro-batch on) + the activations kept for
  the backward + the head's peak. Per token and block, the tensors the block saves are
  measured on the family's own block (plan/activations.py: its forward on fake tensors
  under saved-tensor hooks, as training runs it). For models/gpt.py (SDPA keeps no T×T
  matrix): the block input and the mid-block residual (2·r·D), the LayerNorm outputs
  cast for the matmuls (2·ab·D), q/k/v (3·ab·D), the attention output (ab·D), the MLP's
  c_fc output and GELU output (8·ab·D), + SDPA's logsumexp and the LayerNorm statistics:
  D·(2r + 14ab) — 64 B/D in fp32, 36 under bf16 autocast, 32 in bf16-pure (Korthikanti
  et al. 2022 §4 count 34 in fp16 with dropout masks). Under autocast each matmul also
  saves the bf16 cast of its weight (12·D²·ab per block, measured as the block's fixed
  bytes; V·D·ab for the head), whatever the batch: on a 10M model at 512 tokens that is
  a third of the activations; with AC as well, since autocast caches the casts of leaf
  weights until its context exits at the end of the forward (measured: +2.0 GiB on the
  1.2B GPT with selective AC). Full AC keeps only the block input (r·D) plus one block
  recomputed in the backward; selective AC keeps the input and the outputs of
  parallel/ac.py's save list (the matmuls and attention: (r + 10·ab)·D for the GPT)
  plus one block's recompute. Head: cross-entropy runs in fp32 (models/losses.py); its
  peak is in the backward, log_softmax's saved output and the incoming and the outgoing
  fp32 gradient: V·12 per token whatever the logits' dtype (nothing keeps the logits to
  the backward; the forward's logits or their fp32 copy + log_softmax's output are less;
  losses.py `cross_entropy_peak_tensors`, measured). With model.loss_chunks = n
  (models/chunked_loss.py) under TP (its checkpointed path) that holds for one chunk's
  micro·ceil(T/n) tokens only, and the ln_f output is not kept (`logit_tokens`); the
  fused path (no TP) holds the tensors chunked_loss.py `fused_buffer_bytes` lists
  (`fused_head`): to the backward the input's and the weight's gradients (N·D·ab +
  V·D·4 per in-flight micro-batch), during its forward one piece's logits (ab per
  logit), a bounded fp32 block of them under autocast, the casts and the weight
  gradient's update buffers. Blocks are summed one by one
  over the rank's blocks (`RankShape.blocks`): an MoE llama's dense and MoE blocks are
  measured apart (plan/activations.py `block_kinds`); the routed experts' parameters,
  gradients and optimizer state are in n (split over expert-parallel ranks by
  plan/report.py `expert_shards` when an EP degree is passed).
- end of the backward: static + the gradients + the embedding's gradient being made.
  A tied head's weight gets two contributions, the head matmul's and the embedding's
  dense backward (V·D each), which autograd sums into a third before accumulating it:
  3·V·D·pb live at once (2 beyond the gradient itself on the first micro-batch; with
  accumulation the sum is a temporary added into the existing gradient); one fewer
  where the head's contribution is a plain tensor that takes the sum in place (the
  fused chunked head's, or autocast's cast of it). Untied, with accumulation, each
  parameter's new gradient is a temporary beside the accumulated one: the largest
  parameter's at most (`backward_temporaries`; measured on GPT-2 small's 50304 x 768
  tied embedding: +3.2 V·D above the accumulated gradients at the end of a
  micro-batch's backward in fp32, +1.3 V·D untied);
- optimizer step: static + gradients (fp32 once cast for the masters) + the optimizer's
  transient: torch's foreach Adam/AdamW builds `_foreach_sqrt(exp_avg_sq)` (n·4,
  torch/optim/adam.py `_multi_tensor_adam`), Adagrad/RMSprop likewise one state-sized
  list, L2 weight decay in SGD/Adam/Adagrad/RMSprop (`_foreach_add(grads, params)`) one
  gradient-sized list; fused kernels none; for-loop one tensor's worth; the 8-bit AdamW
  (optim/adamw8bit.py) works in slices of at most CHUNK = 2^22 values, ~24 B each
  (fp32 moments, denominator, quantiser temporaries): min(n, 2^22)·24, all in the heap
  (each fp32 slice is 16 MiB, under glibc's mmap threshold).
- FSDP2 (dp_shard > 1): the forward and backward hold the unsharded parameters of two
  blocks (the current one and the prefetched next), of every block with
  reshard_after_forward = false, in the compute dtype; with cpu_offload on a GPU the
  shards, gradients, optimizer state and step stay in host memory (not counted).
- evaluation (no grad; gradients already freed): static + the eval batch's logits, held
  by the evaluator, + their fp32 copy (none in fp32) + log_softmax's output: V·(ab + 8)
  per token under autocast, V·8 in fp32 (or one block's no-grad working set if larger).
- end of the run: static + one copy of the weights as bytes (safetensors' `save_file`
  serialises every tensor to a `bytes` object before writing: `_flatten`/`_tobytes`);
  on global rank 0 of a split model also the gathered full weights.

CUDA (`max_memory_allocated` counts live tensors): the peak is the largest phase.

CPU (peak RSS, plan/cpu_rss.py): glibc serves tensors of 32 MiB and more from mmap and
returns them on free; smaller ones come from its heap, whose freed pages stay resident.
So the peak RSS is baseline + static + the largest heap part of any phase + the largest
mmapped part of any phase (they may come from different phases). Traced on the 10M and
125M GPTs (RSS sampled every 0.5 ms per phase): after the first step the RSS never falls
back to params + state (the gradients' heap pages stay). The process's own baseline
(interpreter, torch, tokenizers, the TensorBoard writer, the data memmap's touched
pages) is `CPU_BASELINE_MIB`, measured with a 70K-parameter model (bench/plan_accuracy.py
"baseline"); CUDA's counter starts at zero.

The prediction is for training on a prepared dataset. A run whose data cache is cold
prepares it first, in the same process (tokenizer training, the datatrove pipeline:
data/pipeline.py), and that phase's memory stays in the peak RSS: measured +104 MiB on
the 10M GPT under bf16-pure (789 vs 685 MiB, python-stdlib at vocab 4096), which is
what bench/plan_accuracy.py's first case on a fresh checkout used to show (-18%). The
preparation's peak depends on the corpus, not the model; `scaletrain prepare` runs it
apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.batch_plan import batch_plan
from scaletrain.models.chunked_loss import fused_head_tensors
from scaletrain.models.losses import cross_entropy_peak_tensors
from scaletrain.optim.adamw8bit import CHUNK
from scaletrain.optim.optimizers import kernel
from scaletrain.parallel.ac import ACPolicy, BudgetTooSmall, block_modes
from scaletrain.plan import cpu_rss as c  # the CPU heap/mmap model: c.add, c.hm, ...
from scaletrain.plan.activations import block_activations, block_kinds
from scaletrain.plan.experts import exchange_buffers, moe_blocks, skipped_casts
from scaletrain.plan.malloc import mmap_threshold_bytes
from scaletrain.precision import dtype_bytes  # noqa: F401  (plan's callers import it here)

MiB = 2 ** 20
# Peak RSS of `scaletrain train` with a 70K-parameter GPT (1 layer, d 16, seq 16): the
# interpreter, torch, tokenizers, the TensorBoard writer and the data loader. Measured on
# this machine (torch 2.13 CPU, Python 3.11): 337 MiB when first measured; 388 MiB in
# session 10 (the trainer's imports grew: importing scaletrain.train.trainer alone
# peaks at 355 MiB now; bench/plan_accuracy.py "baseline" 388, "baseline-fsdp2" 392 and
# 387 per rank: a 2-rank run's own overhead is within the noise).
CPU_BASELINE_MIB = 388.0
# CPU: with gradient accumulation the 2nd micro-batch's heap activations are allocated
# while the gradients, made during the 1st one's backward in the holes its freed
# activations left, split the heap: traced on the 125M GPT (fp32, micro 2 x 2), the
# peak RSS sat 375 MiB (~1.05x the activations) above params + state + gradients +
# activations; on the 10M 0.66x. 1.6x the heap activations is the fit over
# bench/plan_accuracy.py's accumulation cases (an empirical constant, not derived).
CPU_ACCUM_FACTOR = 1.6

OPT_STATES = {"adam": 2, "adamw": 2, "adagrad": 1, "rmsprop": 1}  # fp32 tensors per param
ADAM8BIT_BLOCK = 256  # elements sharing one fp32 scale per moment (blockwise 8-bit Adam)


@dataclass
class RankShape:
    """What the memory model needs to know about one rank (from plan/report.py `plan`)."""

    params: float  # parameters held by this rank (after TP / FSDP sharding)
    largest_param: float  # elements of the largest parameter tensor on this rank
    layers: int  # transformer blocks on this rank
    tokens: int  # tokens in one micro-batch (micro × seq_len)
    in_flight: int  # micro-batches whose activations are alive at once (pipeline)
    has_head: bool  # the output head and loss run on this rank
    vocab_local: float  # logits columns on this rank (V, or V / tp with loss_parallel)
    tp: int  # tensor-parallel degree (matmul activations split tp ways)
    accum: int  # micro-batches per optimizer step on this rank
    ddp: bool  # DDP gradient buckets (dp_replicate > 1, no sharding)
    eval_tokens: int  # tokens of one evaluation batch (0: no evaluation)
    full_params: float = 0.0  # parameters of the whole model (rank 0 saves them all)
    sharded: bool = False  # parameters split over ranks (TP, FSDP, PP): gathered to save
    fsdp_gathered: float = 0.0  # parameters FSDP2 holds unsharded at once in the forward
    numels: tuple = ()  # elements of each parameter tensor on this rank (after sharding)
    full_numels: tuple = ()  # elements of each parameter tensor of the whole model
    pp: int = 1  # pipeline degree (the end gathers every stage's weights everywhere)
    # model indices of this rank's blocks (an MoE llama's dense and MoE blocks keep
    # different activations); () = `layers` blocks like block 0
    blocks: tuple = ()
    ep: int = 1  # expert-parallel degree (plan/experts.py)
    expert_dims: tuple = ()  # (E, D, F) of the routed experts; () without MoE layers
    # elements of this rank's token embedding when the head is tied to it and both run
    # on this rank (no pipeline split between them); 0 otherwise
    tied_embedding: float = 0.0


def rank_blocks(s: RankShape) -> tuple[int, ...]:
    """The model indices of the blocks on this rank (RankShape.blocks)."""
    return tuple(s.blocks) or (0,) * s.layers


def backward_temporaries(s: RankShape, pb: int, ab: int, fused: bool) -> tuple[float, int]:
    """(bytes, count) of the gradient temporaries live at the end of a backward beside
    the rank's gradients (module doc, "end of the backward"). A tied weight's two
    contributions and their sum: 3, one fewer where the head's contribution arrives as
    a plain tensor autograd can sum the embedding's into in place — the fused chunked
    head's gradient (`fused`), or under autocast (ab != pb) the cast of the matmul's —
    where the plain matmul's arrives as a transposed view, which it cannot. Untied,
    accumulating: the largest parameter's new gradient, + its compute-dtype original
    under autocast. Measured in tests/unit/test_plan_backward_end.py."""
    if s.tied_embedding:
        return s.tied_embedding * pb, (3 if s.accum > 1 else 2) - int(fused or ab != pb)
    if s.accum > 1:
        return s.largest_param * (pb + (ab if ab != pb else 0)), 1
    return 0.0, 0


def optimizer_state_bytes(cfg, n: float) -> float:
    """Bytes of optimizer state for n parameters (masters excluded)."""
    o = cfg.optim
    if o.name == "adamw8bit":  # two uint8 moments + one fp32 scale per block each
        return n * 2 + 2 * 4 * n / ADAM8BIT_BLOCK
    if o.name == "sgd":
        return n * 4 if o.momentum > 0 else 0.0
    return n * 4 * OPT_STATES.get(o.name, 2)


def optimizer_transient_bytes(cfg, n: float, largest: float, gbytes: int) -> float:
    """Temporaries of one optimizer step (see module doc); gbytes: gradient dtype size."""
    o = cfg.optim
    l2 = o.weight_decay > 0 and o.name in ("sgd", "adam", "adagrad", "rmsprop")
    sqrt_list = o.name in ("adam", "adamw", "adagrad", "rmsprop")
    if o.name == "adamw8bit":
        # optim/adamw8bit.py `_step_group`: at most CHUNK values dequantised at a time.
        return min(n, CHUNK) * 24.0
    if kernel(o) == "fused":
        return 0.0
    per = (4 if sqrt_list else 0) + (gbytes if l2 else 0) + \
        (gbytes if o.name == "sgd" and o.nesterov else 0)
    if kernel(o) == "for-loop":
        return largest * per
    return n * per


def block_bytes_per_token(cfg, tp: int, device_type: str = "cpu", layer: int = 0) -> float:
    """Bytes block `layer` keeps for the backward per token, without AC, measured on the
    family's block (plan/activations.py; TP: the split tensors divided by tp)."""
    return block_activations(cfg.model, cfg.precision.dtype, "none",
                             device_type, layer).per_token(tp)


def ac_block_bytes(cfg, tp: int, device_type: str = "cpu", layer: int = 0) -> dict:
    """Bytes per token block `layer` keeps for the backward under each AC mode: all its
    activations; its input + the matmul/attention outputs (selective); its input (full).
    Measured on the family's block (plan/activations.py)."""
    return {mode: block_activations(cfg.model, cfg.precision.dtype, mode,
                                    device_type, layer).per_token(tp)
            for mode in ("none", "selective", "full")}


def block_fixed_bytes(cfg, tp: int, device_type: str = "cpu", layer: int = 0) -> float:
    """Bytes block `layer` keeps whatever the batch: under autocast its matmul weights'
    casts (cached to the end of the forward, AC or not; an MoE block's per-expert casts,
    saved by each expert's matmul), measured (plan/activations.py)."""
    return sum(block_activations(cfg.model, cfg.precision.dtype, "none",
                                 device_type, layer).fixed_bytes(tp))


def largest_block(cfg) -> int:
    """The block that keeps the most without AC (an MoE block rather than a dense one):
    the AC budget sizes every block by it, so it is never exceeded."""
    kinds = sorted(set(block_kinds(cfg.model)))
    return max(kinds, key=lambda i: block_bytes_per_token(cfg, 1, "cpu", i))


def ac_policy(cfg, tp: int = 1, micro: int | None = None):
    """The config's activation checkpointing as a `parallel.ac.ACPolicy`; budget mode
    gets the bytes each block keeps for one micro-batch of `micro` samples (callers pass
    their batch plan's; default: the micro-batch of `cfg`'s plan on one rank)."""
    p = cfg.parallel
    if p.activation_checkpoint != "budget":
        return ACPolicy(p.activation_checkpoint, p.activation_checkpoint_every)
    tokens = (micro or batch_plan(cfg, 1, pp=1).micro) * cfg.model.seq_len
    per_token = ac_block_bytes(cfg, tp, "cpu", largest_block(cfg))
    return ACPolicy("budget", 1, p.activation_budget_gib * 2 ** 30,
                    {k: v * tokens for k, v in per_token.items()})


def rank_block_modes(cfg, s: RankShape) -> list[str]:
    """The AC mode of each of this rank's blocks at its micro-batch; a budget below the
    floor (the run refuses it with a ConfigError) is shown as all-full."""
    try:
        return block_modes(ac_policy(cfg, s.tp, max(1, s.tokens // cfg.model.seq_len)),
                           s.layers)
    except BudgetTooSmall:
        return ["full"] * s.layers


def activation_bytes(cfg, s: RankShape, r: int, ab: int, device_type: str = "cpu") -> float:
    """Activations alive at the start of the backward on this rank (module doc)."""
    if not s.layers:
        return 0.0
    D = cfg.model.d_model
    blocks = rank_blocks(s)
    per = [ac_block_bytes(cfg, s.tp, device_type, i) for i in blocks]
    modes = rank_block_modes(cfg, s)
    # each block's kept share, + the largest checkpointed block's full set while it is
    # recomputed (parallel/ac.py kept_bytes, block by block: dense and MoE blocks differ)
    per_token = sum(p[m] for p, m in zip(per, modes))
    per_token += max((p["none"] for p, m in zip(per, modes) if m != "none"), default=0.0)
    per_token += head_input_bytes(cfg, s, r, ab)  # ln_f input (and output, unchunked)
    total = per_token * s.tokens * s.in_flight
    # Autocast: each matmul saves its weight's bf16 cast for the backward; under AC too,
    # autocast caches the casts of leaf weights until the autocast context exits (the
    # end of the forward), so all of them are alive there (measured per block).
    total += sum(block_fixed_bytes(cfg, s.tp, device_type, i) for i in blocks)
    total += expert_parallel_bytes(cfg, s, ab)
    fused = fused_head(cfg, s)
    if r != ab and s.has_head and fused is None:  # autocast's cached cast of the head
        total += ab * D * s.vocab_local
    # the fused head's gradients, made in its forward, held to each micro-batch's backward
    return total + (sum(fused[0].values()) * s.in_flight if fused else 0.0)


def chunks(cfg) -> int:
    """model.loss_chunks as plan/report.py `plan` resolved it; an unresolved auto (-1,
    a caller of these functions that skipped `plan`) counts as the whole logits, as a
    model built outside a run takes it (models/registry.py `built_chunks`)."""
    return max(0, cfg.model.loss_chunks)


def expert_parallel_bytes(cfg, s: RankShape, ab: int) -> float:
    """What EP changes in the activations of this rank's MoE blocks (plan/experts.py):
    minus the weight casts of the experts other ranks run (autocast only), plus one
    layer's all-to-all buffers (in the residual stream's dtype, the parameters')."""
    moe = moe_blocks(cfg.model, rank_blocks(s))
    if s.ep <= 1 or not moe:
        return 0.0
    pb = dtype_bytes(cfg.precision.dtype)[0]
    count, numel = skipped_casts(s.expert_dims, s.ep) if ab != pb else (0.0, 0.0)
    exchange = exchange_buffers(s.expert_dims, s.ep, s.tokens, cfg.model.moe_top_k, pb)
    # (the routed experts are replicated over tp: their casts are whole on every rank)
    return sum(exchange) - len(moe) * count * numel * ab


def head_input_bytes(cfg, s: RankShape, r: int, ab: int) -> float:
    """Per token, what the head keeps of its input: the final block's output (ln_f's
    input) and ln_f's output cast for the head's matmul; with model.loss_chunks
    (models/chunked_loss.py) the ln_f input only: the fused path's own tensors are
    `fused_head`'s, the checkpointed path (TP) keeps views of the input."""
    D = cfg.model.d_model
    if chunks(cfg) == 0:
        return (r + ab) * D
    return r * D


def fused_head(cfg, s: RankShape) -> tuple[dict, dict] | None:
    """model.loss_chunks without TP: the tensors of models/chunked_loss.py's fused
    head + loss for one micro-batch, (held to the backward, alive in its forward only),
    one entry per tensor (`fused_buffer_bytes`); None where the head does not take the
    fused path (no chunks, no head on this rank, or TP's checkpointed path)."""
    if not (chunks(cfg) and s.has_head and s.tp == 1):
        return None
    return fused_head_tensors(cfg.precision.dtype, s.tokens, s.vocab_local,
                              cfg.model.d_model, cfg.model.loss_chunks)


def logit_tokens(cfg, s: RankShape) -> int:
    """Tokens whose logits (and fp32 cross-entropy temporaries) are alive at once in
    training: the micro-batch's, or a pipeline's in-flight ones (the schedule holds each
    micro-batch's output until the loss); with model.loss_chunks = n one chunk's, micro x
    ceil(seq_len / n), whatever the pipeline (its last stage computes the loss in its
    forward and keeps no logits: models/chunked_loss.py)."""
    n = chunks(cfg)
    if n:
        T = cfg.model.seq_len
        return max(1, s.tokens // T) * -(-T // min(n, T))
    return s.tokens * s.in_flight


def head_bytes(cfg, s: RankShape, ab: int) -> float:
    """The head's training peak beyond what it keeps for the backward: the fp32
    cross-entropy tensors of `logit_tokens` (module doc), or the fused head's
    forward-only tensors (`fused_head`)."""
    if not s.has_head:
        return 0.0
    fused = fused_head(cfg, s)
    if fused:
        return sum(fused[1].values())
    return logit_tokens(cfg, s) * s.vocab_local * sum(cross_entropy_peak_tensors(ab, True))


def eval_head_bytes(s: RankShape, ab: int) -> float:
    """The evaluation batch's logits and cross-entropy tensors (no grad; module doc):
    the evaluator takes whole logits, whatever model.loss_chunks."""
    if not s.has_head:
        return 0.0
    return s.eval_tokens * s.vocab_local * sum(cross_entropy_peak_tensors(ab, False))


def _cpu_resident(cfg, s: RankShape, pb: int, ab: int, masters: bool,
                  accumulating: bool, rank0: bool = True) -> tuple[float, str]:
    """Peak RSS above baseline + static on a CPU (plan/cpu_rss.py): (bytes, phases),
    with the run's malloc threshold (plan/malloc.py)."""
    with c.threshold(mmap_threshold_bytes(cfg.train.malloc_mmap_threshold_mib)):
        return _cpu_phases(cfg, s, pb, ab, masters, accumulating, rank0)


def _cpu_phases(cfg, s: RankShape, pb: int, ab: int, masters: bool,
                accumulating: bool, rank0: bool) -> tuple[float, str]:
    numels = s.numels or (s.params,)
    full = s.full_numels or numels
    grads = c.per_param(numels, pb)
    fused = fused_head(cfg, s)
    # the head: the fused path's tensors one by one (its gradients per in-flight
    # micro-batch), else the cross-entropy's 3 fp32 (tokens, V) tensors (head_bytes)
    head = (c.add(*(c.hm(b, s.in_flight) for b in fused[0].values()),
                  *(c.hm(b) for b in fused[1].values())) if fused
            else c.head(s, logit_tokens(cfg, s), cross_entropy_peak_tensors(ab, True)))
    act = c.add(c.activations(cfg, s, pb, ab, rank_block_modes(cfg, s), fused is not None),
                head, c.hm(s.fsdp_gathered * ab))
    if accumulating:
        act = (act[0] * CPU_ACCUM_FACTOR, act[1])
        if s.tp > 1:
            # DTensor gradients are accumulated out of place (a new tensor per
            # micro-batch): a second gradient-sized set of heap pages (bench/
            # plan_accuracy.py mp-tp2: the non-saving rank sat ~270 MiB above the
            # model without it, ~ this rank's 250 MiB of fp32 gradients).
            act = c.add(act, grads)
    o = cfg.optim
    per = optimizer_transient_bytes(cfg, 1.0, 1.0, 4 if masters else pb)
    if o.name == "adamw8bit":
        transient = (optimizer_transient_bytes(cfg, float(sum(numels)), 0.0, 4), 0.0)
    elif kernel(o) == "foreach":
        transient = c.per_param(numels, per)
    else:  # fused: 0; for-loop: one tensor's temporaries at a time
        transient = c.hm(s.largest_param * per)
    evaluation = c.head(s, s.eval_tokens, cross_entropy_peak_tensors(ab, False))
    # Rank 0 writes the weights: safetensors' bytes of every tensor, + the gathered full
    # tensors when split; under PP every rank pickles its stage, receives all stages
    # (all_gather_object) and unpickles them (parallel/context.py gather).
    # (measured on PP=2: both ranks peak alike at the end, within 1.3%)
    save = c.per_param(full, pb) if rank0 or s.pp > 1 else (0.0, 0.0)
    if s.sharded and (rank0 or s.pp > 1):
        save = c.add(save, c.per_param(full, pb))
    if s.pp > 1:
        stage = s.params * pb
        save = c.add(save, c.hm(stage, 2), c.hm(stage * s.pp))
    # The forward's end holds the activations (+ the gradients of earlier micro-batches),
    # the backward's end the gradients: mmapped tensors follow that exactly, the heap
    # keeps the gradients' pages beside the activations' (measured, module doc).
    temporaries = c.hm(*backward_temporaries(s, pb, ab, bool(fused)))
    # Heap-served V·D temporaries at the backward's end take fresh pages above the
    # heap's high-water mark: the activations freed in that backward leave holes among
    # the gradients it made, each far smaller than one V·D tensor (measured with
    # train.malloc_mmap_threshold_mib=256, where the 147 MiB tensors of GPT-2 small's
    # embedding are heap tensors: bench/plan_accuracy.py mp-ddp -11.0% without this).
    # Behind the fused head they fill the V-wide holes its forward's buffers left
    # (logit pieces, casts, product buffers: the 128k rows +12.9/+16.9% on top).
    on_top = 0.0 if fused else temporaries[0]
    phases = {"forward_backward": (grads[0] + act[0],
                                   act[1] + (grads[1] if accumulating else 0.0)),
              "backward_end": c.add(grads, (temporaries[0] - on_top, temporaries[1])),
              "optimizer_step": c.add(c.per_param(numels, 4) if masters else grads,
                                      transient),
              "eval": evaluation, "end": save}
    total, heap_phase, mmap_phase = c.peak_above_static(phases)
    return total + on_top, f"resident (heap {heap_phase}, mmap {mmap_phase})"


def rank_peak(cfg, s: RankShape, device_type: str = "cpu") -> dict:
    """Per-phase bytes and the predicted peak of one rank (module doc)."""
    pb, ab = dtype_bytes(cfg.precision.dtype)
    r = pb
    n = s.params
    masters = n * 4 if cfg.precision.dtype == "bf16-pure" else 0.0
    opt_state = optimizer_state_bytes(cfg, n)
    weights = n * pb
    buckets = n * pb if s.ddp else 0.0
    static = weights + masters + opt_state + buckets
    grads = n * pb
    if cfg.parallel.cpu_offload and s.fsdp_gathered and device_type == "cuda":
        # FSDP2 CPUOffloadPolicy: shards, gradients, state and the optimizer step live
        # in host memory; the device holds the gathered blocks and the activations.
        masters = opt_state = weights = buckets = static = grads = 0.0
    act = activation_bytes(cfg, s, r, ab, device_type) + s.fsdp_gathered * ab
    head = head_bytes(cfg, s, ab)
    fwd_bwd = static + (grads if s.accum > 1 else 0.0) + act + head
    size, count = backward_temporaries(s, pb, ab, fused_head(cfg, s) is not None)
    fwd_bwd = max(fwd_bwd, static + grads + size * count)  # the end of the backward
    step_grads = n * 4 if masters else grads  # cast to fp32 for the masters
    transient = optimizer_transient_bytes(cfg, n, s.largest_param, 4 if masters else pb)
    if not static and s.fsdp_gathered:  # offloaded: the step runs on the host
        transient = 0.0
    step = static + step_grads + transient
    evaluation = 0.0
    if s.eval_tokens:
        blk = max(block_bytes_per_token(cfg, s.tp, device_type, i)  # no-grad: one block's set
                  for i in set(rank_blocks(s))) * 0.5
        evaluation = static + max(eval_head_bytes(s, ab), s.eval_tokens * blk)
    # Saving the weights (checkpoint/run_model.py): rank 0 gathers the full tensors when they
    # are split (parallel/weights.py, pipeline stages via a pickled gather), then
    # safetensors serialises them to bytes; a pipeline rank pickles its stage to send.
    full = (s.full_params or n) * pb
    end = static + full + (full if s.sharded else 0.0)
    end_other = static + (2 * weights if s.sharded else 0.0)
    phases = {"forward_backward": fwd_bwd, "optimizer_step": step, "eval": evaluation,
              "end": end}
    baseline = CPU_BASELINE_MIB * MiB if device_type == "cpu" else 0.0
    phase = max(phases, key=phases.get)
    if device_type == "cpu":
        acc = s.accum > 1 and act > 0
        tensors, phase = _cpu_resident(cfg, s, pb, ab, masters > 0, acc)
        phases["resident"] = tensors = static + tensors
        other = static + _cpu_resident(cfg, s, pb, ab, masters > 0, acc, rank0=False)[0]
    else:
        tensors = phases[phase]
        other = max(v for k, v in phases.items() if k != "end") if end == tensors else tensors
        other = max(other, end_other)
    return {"params_bytes": weights, "grad_bytes": grads, "optim_state_bytes": opt_state,
            "master_bytes": masters, "ddp_bucket_bytes": buckets, "activation_bytes": act,
            "head_bytes": head, "step_transient_bytes": transient,
            "baseline_bytes": baseline, "phases": phases, "peak_phase": phase,
            "peak_tensor_bytes": tensors, "peak_bytes": baseline + tensors,
            # ranks other than global rank 0 do not write the weights (module doc)
            "peak_bytes_other": baseline + other}
