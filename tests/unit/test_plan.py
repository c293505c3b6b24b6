"""`scaletrain plan`'s memory arithmetic on known shapes (bytes computed by hand here,
not by the code under test) and the --fit search."""

from __future__ import annotations

import pytest

from scaletrain.config import build_config
from scaletrain.config.dims import ParallelDims
from scaletrain.plan.report import plan
from scaletrain.plan import memory
from scaletrain.plan.fit import NothingFits, fit

# GPT: 2 layers, d 16, 2 heads, seq 8, vocab 32, biases, tied head. Parameters:
#   wte 32*16 = 512, wpe 8*16 = 128, ln_f 2*16 = 32, per block:
#   ln_1 32 + c_attn 16*48+48 = 816 + c_proj 16*16+16 = 272 + ln_2 32
#   + c_fc 16*64+64 = 1088 + c_proj 64*16+16 = 1040  = 3280
#   total 512 + 128 + 32 + 2 * 3280 = 7232
ONE_RANK = ParallelDims(1, 1, 1, 1, 1)  # the layout of one process
N = 7232
TOKENS = 2 * 8  # micro-batch 2 x seq 8
SHAPE = ["model.n_layer=2", "model.d_model=16", "model.n_head=2", "model.seq_len=8",
         "model.vocab_size=32", "train.batch_size=2", "train.micro_batch_size=2",
         "eval.batch_size=2", "train.device=cpu"]


def cfg_of(*extra: str):
    return build_config(None, [tuple(a.split("=", 1)) for a in (*SHAPE, *extra)])


def rank0(cfg, device_type="cpu"):
    return plan(cfg, ONE_RANK, cfg.model.vocab_size, device_type)["ranks"][0]


def test_fp32_adamw_bytes_and_peak():
    r = rank0(cfg_of("precision.dtype=fp32", "optim.name=adamw",
                     "optim.implementation=foreach"))
    assert r["params"] == N
    assert r["param_bytes"] == N * 4 == 28928
    assert r["grad_bytes"] == 28928
    assert r["optim_bytes"] == N * 8 == 57856  # two fp32 moments
    # activations per token: each block D*(2*4 + 14*4) + 4*H + 16 = 1024 + 8 + 16 = 1048,
    # two blocks 2096, + ln_f input and output (4 + 4) * 16 = 128 -> 2224; x 16 tokens
    # = 35584; head: the cross-entropy's 3 fp32 (tokens, V) tensors at its backward's
    # peak (log_softmax's output, the incoming and outgoing gradients; the logits are
    # not kept), 16 tokens * V 32 * 3 * 4 B = 6144
    assert r["activation_bytes"] == 35584 + 6144
    assert r["workspace_bytes"] == N * 4  # foreach AdamW's sqrt(exp_avg_sq) list
    # CPU, every tensor below glibc's 32 MiB mmap threshold (heap): params + moments +
    # the largest phase: gradients + activations + head 28928 + 41728 (the step's is
    # gradients + sqrt list 57856, the end's the weights as bytes 28928), + the tied
    # embedding's gradient contributions at the backward's end, in fresh heap pages:
    # 2 (no accumulation, fp32 matmul) x V 32 x D 16 x 4 B = 4096
    tensors = 28928 + 57856 + 28928 + 41728 + 4096
    assert r["peak_tensor_bytes"] == tensors
    assert r["peak_bytes"] == int(memory.CPU_BASELINE_MIB * 2**20 + tensors)
    # The default kernel ("auto": fused AdamW) updates in place: no step workspace.
    assert rank0(cfg_of("precision.dtype=fp32", "optim.name=adamw"))["workspace_bytes"] == 0


def test_fp32_adamw_peak_on_cuda_is_the_optimizer_step():
    r = rank0(cfg_of("precision.dtype=fp32", "optim.implementation=foreach"), "cuda")
    # phases: fwd/bwd 86784 + 41728 = 128512; step 86784 + grads 28928 + sqrt 28928
    # = 144640; no baseline on CUDA (max_memory_allocated counts tensors only)
    assert r["peak_phase"] == "optimizer_step"
    assert r["peak_bytes"] == 144640 and r["baseline_bytes"] == 0


def test_bf16_pure_sgd_fused_counts_masters_and_fp32_gradients():
    r = rank0(cfg_of("precision.dtype=bf16-pure", "optim.name=sgd", "optim.momentum=0.9",
                     "optim.implementation=fused"), "cuda")
    assert r["param_bytes"] == N * 2 == 14464
    assert r["optim_bytes"] == N * 4 + N * 4  # momentum + fp32 master
    assert r["workspace_bytes"] == 0  # fused kernel
    # per token: block D*(2*2 + 14*2) + 24 = 536, x2 = 1072, + (2 + 2)*16 = 64 -> 1136,
    # x16 = 18176; head 16 * 32 * 3 * 4 = 6144 (fp32 cross-entropy tensors, bf16 logits
    # not kept)
    assert r["activation_bytes"] == 18176 + 6144
    # step: bf16 params 14464 + master 28928 + momentum 28928 + fp32 grads 28928
    assert r["peak_phase"] == "optimizer_step" and r["peak_bytes"] == 101248


def test_chunked_loss_holds_one_chunk_of_logits():
    """model.loss_chunks=3, fp32, no TP: the fused head (models/chunked_loss.py
    `fused_buffer_bytes`) cuts the 16 rows into pieces of 6, 5, 5 and holds one piece's
    logits, not V x 12 B per token of the unchunked cross-entropy's fp32 tensors."""
    r = rank0(cfg_of("precision.dtype=fp32", "model.loss_chunks=3"))
    # kept: blocks 2096 + ln_f input 4 * 16 -> 2160 per token, x 16 = 34560; the fused
    # head's gradients made in the forward: its input's 16 x 16 x 4 = 1024, the
    # weight's fp32 V 32 x D 16 = 2048. Forward only: the normed input 16 x 16 x 4 =
    # 1024, one piece's logits 6 x 32 x 4 = 768, the input with ignored rows zeroed 1024
    assert r["activation_bytes"] == 34560 + 1024 + 2048 + 1024 + 768 + 1024


def test_chunked_loss_under_bf16_autocast_counts_the_fused_casts():
    """bf16 autocast, model.loss_chunks=3: the fused head's matmuls in bf16, its
    cross-entropy in fp32 blocks, its weight cast once (no autocast cache)."""
    r = rank0(cfg_of("precision.dtype=bf16", "model.loss_chunks=3"))
    # kept: blocks 1200 + ln_f input 4 * 16 -> 1264 per token, x 16 = 20224; the blocks'
    # weight casts 12288 (the head's own cast is the fused forward's, below); the input
    # gradient 16 x 16 x 2 = 512 (bf16), the weight's fp32 32 x 16 x 4 = 2048.
    # Forward only: normed input (fp32 LayerNorm) 1024, bf16 logits 6 x 32 x 2 = 384,
    # kept-rows input 512, the fp32 block (the whole piece: 6 x 32 x 4) 768, the weight
    # gradient's bf16 product 1024 and its fp32 copy 2048, the input cast 512, the
    # weight cast 32 x 16 x 2 = 1024
    kept = 20224 + 12288 + 512 + 2048
    assert r["activation_bytes"] == kept + 1024 + 384 + 512 + 768 + 1024 + 2048 + 512 + 1024


def test_full_activation_checkpointing_keeps_block_inputs_plus_one_block():
    r = rank0(cfg_of("precision.dtype=fp32", "parallel.activation_checkpoint=full"))
    # per token: 2 block inputs 4*16 = 128 + one block recomputed 1048 + ln_f 128 = 1304
    assert r["activation_bytes"] == 1304 * TOKENS + 6144  # head 16 * 32 * 3 * 4


def test_bf16_autocast_counts_the_saved_weight_casts():
    r = rank0(cfg_of("precision.dtype=bf16", "optim.name=sgd", "optim.momentum=0"))
    # per token: block D*(2*4 + 14*2) + 24 = 600, x2 = 1200, + (4 + 2)*16 = 96 -> 1296
    # x16 = 20736; weight casts 2 * (4*16*16 + 2*16*64) * 2 B = 12288 + head 32*16*2 =
    # 1024; head: 3 fp32 cross-entropy tensors 16 * 32 * 3 * 4 = 6144
    assert r["activation_bytes"] == 20736 + 12288 + 1024 + 6144
    assert r["optim_bytes"] == 0  # SGD without momentum keeps no state


def test_gradient_accumulation_divides_activations():
    big = rank0(cfg_of("train.batch_size=4", "train.micro_batch_size=4"), "cuda")
    small = rank0(cfg_of("train.batch_size=4", "train.micro_batch_size=1"), "cuda")
    assert small["activation_bytes"] * 4 == big["activation_bytes"]


def _peak(cfg):
    return rank0(cfg)["peak_bytes"]


def test_fit_keeps_a_config_that_fits():
    cfg = cfg_of("train.batch_size=4", "train.micro_batch_size=4")
    choice = fit(cfg, ONE_RANK, 32, _peak(cfg) + 1, "cpu")
    assert choice.overrides == {} and choice.lines() == []


def test_fit_forces_activation_checkpointing_when_micro_batch_one_does_not_fit():
    # per-rank batch 1: the micro-batch cannot shrink; activations dominate (seq 256)
    extra = ("model.seq_len=256", "model.d_model=64", "model.n_head=2", "model.vocab_size=64",
             "train.batch_size=1", "train.micro_batch_size=1", "optim.name=sgd",
             "optim.momentum=0", "precision.dtype=bf16-pure")
    cfg = cfg_of(*extra)
    full = cfg_of(*extra, "parallel.activation_checkpoint=full")
    assert _peak(full) < _peak(cfg)
    choice = fit(cfg, ONE_RANK, 64, _peak(full), "cpu")
    assert choice.overrides.get("parallel.activation_checkpoint") in ("selective", "full")
    assert choice.peak_bytes <= _peak(full)
    ac = choice.overrides["parallel.activation_checkpoint"]
    assert f"--parallel.activation_checkpoint={ac}" in choice.lines()


def test_fit_prefers_a_smaller_micro_batch_to_recomputation():
    cfg = cfg_of("model.seq_len=256", "model.vocab_size=64", "train.batch_size=8",
                 "train.micro_batch_size=8")
    half = cfg_of("model.seq_len=256", "model.vocab_size=64", "train.batch_size=8",
                  "train.micro_batch_size=4")
    choice = fit(cfg, ONE_RANK, 64, _peak(half), "cpu")
    assert choice.overrides == {"train.micro_batch_size": 4}


def test_fit_raises_when_nothing_fits():
    with pytest.raises(NothingFits, match="nothing fits 0.01 GiB"):
        fit(cfg_of(), ONE_RANK, 32, 0.01 * 2**30, "cpu")


def test_cpu_rss_adds_the_heap_and_mmap_high_water_marks_of_different_phases():
    from scaletrain.plan import cpu_rss

    MiB = 2**20
    assert cpu_rss.hm(31 * MiB) == (31 * MiB, 0.0)  # heap: below glibc's 32 MiB threshold
    assert cpu_rss.hm(32 * MiB, 2) == (0.0, 64 * MiB)  # mmapped, returned on free
    # the heap peaks in the backward, the mmapped tensors at the end: both stay counted
    total, heap, mmap = cpu_rss.peak_above_static({"forward_backward": (50.0, 5.0),
                                                   "end": (10.0, 100.0)})
    assert (total, heap, mmap) == (150.0, "forward_backward", "end")


MOE = ["model.name=llama", "model.n_kv_head=1", "model.moe_experts=4", "model.moe_top_k=2",
       "model.moe_d_ff=8", "model.moe_first_dense=1", "precision.dtype=fp32"]


def test_moe_plan_counts_the_expert_parameters_and_splits_them_over_ep_ranks():
    """The experts' parameters and their AdamW state are the plan's; an EP degree
    divides the routed experts only (3 tensors of 4 x 16 x 8 in the one MoE block)."""
    from scaletrain.plan.report import expert_shards

    cfg = cfg_of(*MOE)
    experts = 3 * 4 * 16 * 8
    one = plan(cfg, ONE_RANK, 32, "cpu")["ranks"][0]
    # EP=2 carved out of dp_shard=2 (config/dims.py): each rank owns half the experts,
    # which is also what FSDP2 alone over those 2 ranks keeps of them
    ep2 = plan(cfg, ParallelDims(1, 2, 1, 1, 2, ep=2), 32, "cpu")["ranks"][0]
    fsdp2 = plan(cfg, ParallelDims(1, 2, 1, 1, 2), 32, "cpu")["ranks"][0]
    dense = one["params"] - experts
    assert ep2["params"] == fsdp2["params"] == dense / 2 + experts / 2
    assert one["optim_bytes"] == one["params"] * 8  # fp32 AdamW: 2 moments
    # EP borrows from the FSDP shard ranks when it divides them (torchtitan), else adds
    assert (expert_shards(1, 4), expert_shards(2, 4), expert_shards(2, 3)) == (4, 4, 6)


def test_expert_parallel_terms_of_the_plan():
    """EP=2 against FSDP2 alone on the same 2 ranks (bf16 autocast; 2 MoE blocks of
    E=4 experts, D=16, F=8, top-2; the global batch of 2 is 1 sample x seq 8 = 8 tokens
    per rank), by hand (plan/experts.py): FSDP2 gathers 2 blocks, each with its 2 local
    experts' 3 x 2 x 16 x 8 = 768 elements instead of all 4's (-2 x 768 x 2 B = -3072);
    each MoE block skips the bf16 casts of the other rank's 2 experts (-2 blocks x 6
    casts x 128 x 2 B = -3072); one layer's dispatch and combine buffers of the residual
    stream (fp32) add 2 x (8 x 2 rows x 16 x 4 B) = +2048. Parameters and optimizer
    state are the same (EP takes its ranks from dp_shard)."""
    from scaletrain.plan import experts
    from scaletrain.plan.activations import block_activations

    cfg = cfg_of(*[a for a in MOE if not a.startswith(("precision", "model.moe_first"))],
                 "precision.dtype=bf16", "model.moe_first_dense=0")
    assert experts.skipped_casts((4, 16, 8), 2) == (6.0, 128.0)
    assert experts.exchange_buffers((4, 16, 8), 2, 8, 2, 4) == [1024.0, 1024.0]
    assert experts.gathered_expert_numel(1536, 2) == 768
    # the casts the plan subtracts are ones the measured MoE block makes: torch.
    # _grouped_mm's 3 whole weight casts of 4 experts x 16 x 8 bf16 elements (1024 B
    # each: 4 x 256 B) among its fixed bytes
    fixed = block_activations(cfg.model, "bf16", "none", "cpu", 1).fixed
    assert sum(1 for b in fixed if b == 4 * 256) >= 3
    for device in ("cuda", "cpu"):
        ep2 = plan(cfg, ParallelDims(1, 2, 1, 1, 2, ep=2), 32, device)["ranks"][0]
        fsdp2 = plan(cfg, ParallelDims(1, 2, 1, 1, 2), 32, device)["ranks"][0]
        assert ep2["params"] == fsdp2["params"] and ep2["optim_bytes"] == fsdp2["optim_bytes"]
        assert ep2["activation_bytes"] - fsdp2["activation_bytes"] == -3072 - 3072 + 2048
    # CPU: the heap's high-water mark is the forward/backward's, all of it below the mmap
    # threshold, so the resident peak moves by the same bytes (on CUDA the end's save
    # phase is the peak of this tiny model, which EP does not change)
    assert ep2["peak_bytes"] - fsdp2["peak_bytes"] == -4096


def test_moe_plan_under_tp_keeps_the_routed_experts_whole():
    """Under TP the router and the routed experts are replicated (models/plans.py
    `moe_tp_plan`): the bf16 casts of the 4 experts' 3 weights (16 x 8, 256 B each) stay
    whole on every tp rank while the sharded matmuls' casts halve, and under EP × TP
    the casts a rank skips (the other ep rank's 2 experts: 6 of them) are whole ones
    too: (ep=2, tp=2) minus (tp=2 alone, FSDP2 over 2) = the 2 gathered MoE blocks'
    2 local experts of 3 x 2 x 16 x 8 bf16 elements instead of 4 (-2 x 768 x 2 B), the
    skipped casts (-2 blocks x 6 x 256 B) and one layer's two all-to-all buffers of 8
    tokens (every tp rank routes all of them) x top-2 x D=16 in fp32 (+2048)."""
    from scaletrain.plan.activations import block_activations

    cfg = cfg_of(*[a for a in MOE if not a.startswith(("precision", "model.moe_first",
                                                       "model.n_kv_head"))],
                 "precision.dtype=bf16", "model.moe_first_dense=0", "model.n_kv_head=2")
    a = block_activations(cfg.model, "bf16", "none", "cpu", 0)
    # the 3 weight casts of the routed experts and the int32 offsets of the 4 experts
    # that torch._grouped_mm saves per projection (3 x 16 B), all whole over tp
    experts = 3 * 4 * 256 + 3 * 4 * 4
    assert sum(a.fixed_bytes(2)) == (sum(a.fixed_bytes(1)) - experts) / 2 + experts
    ep_tp = plan(cfg, ParallelDims(1, 2, 2, 1, 4, ep=2), 32, "cpu")["ranks"][0]
    tp = plan(cfg, ParallelDims(1, 2, 2, 1, 4), 32, "cpu")["ranks"][0]
    assert ep_tp["params"] == tp["params"]  # the experts split dp_shard ways either way
    assert ep_tp["activation_bytes"] - tp["activation_bytes"] == \
        -2 * 768 * 2 - 2 * 6 * 256 + 2 * (8 * 2 * 16 * 4)
