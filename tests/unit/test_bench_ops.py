"""bench/ops.py, bench/gpu_ops.py and bench/shapes.py: operator and kernel categories and
the GEMM shapes of a step."""

from __future__ import annotations

import torch.nn as nn

from scaletrain.bench.gpu_ops import categorize_kernel
from scaletrain.bench.ops import categorize
from scaletrain.bench.shapes import linear_gemm_shapes


def test_operator_categories():
    assert categorize("aten::mm", False) == "gemm"
    assert categorize("aten::addmm", False) == "gemm"
    assert categorize("aten::_scaled_dot_product_flash_attention_for_cpu", False) == "attention"
    assert categorize("aten::native_layer_norm_backward", False) == "layernorm"
    assert categorize("aten::gelu_backward", False) == "gelu"
    assert categorize("aten::_log_softmax_backward_data", False) == "softmax/CE"
    assert categorize("aten::copy_", False) == "casts/copies"
    assert categorize("aten::add_", False) == "elementwise"
    assert categorize("## Call CompiledFxGraph fabc ##", False) == "compiled"
    assert categorize("aten::mm", True) == "optimizer"  # under Optimizer.step: its time
    assert categorize("autograd::engine::evaluate_function: MmBackward0", False) == "framework"


def test_kernel_categories():
    # Names as CUDA profiles print them (cuBLAS on Hopper, flash attention, inductor).
    assert categorize_kernel("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") \
        == "gemm"
    assert categorize_kernel("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT") == "gemm"
    assert categorize_kernel("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_"
                             "kernel<Flash_bwd_kernel_traits<64, 128>>") == "attention"
    assert categorize_kernel("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") \
        == "compiled"
    assert categorize_kernel("void at::native::(anonymous namespace)::multi_tensor_apply_"
                             "kernel<TensorListMetadata<4>, FusedAdamMathFunctor>") \
        == "optimizer"
    assert categorize_kernel("void at::native::vectorized_elementwise_kernel<4, "
                             "at::native::FillFunctor<float>>") == "casts/copies"
    assert categorize_kernel("Memset (Device)") == "casts/copies"
    # "broadcast" is element-wise work, not a cast
    assert categorize_kernel("void at::native::elementwise_kernel<128, 2, "
                             "broadcast_add>") == "elementwise"


def test_linear_gemm_shapes_three_per_linear():
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    shapes = linear_gemm_shapes(model, tokens=64)
    # forward (M,K)@(K,N), grad input (M,N)@(N,K), grad weight (N,M)@(M,K), per linear;
    # the (64, 8, 32) forward of the first and grad input of the second coincide.
    assert shapes == {(64, 8, 32): 2, (64, 32, 8): 2, (32, 64, 8): 1, (8, 64, 32): 1}
    flops = sum(2 * m * k * n * c for (m, k, n), c in shapes.items())
    assert flops == 6 * 64 * (8 * 32 + 32 * 8)  # 6 · tokens · weights: the 6N of 6N+...
