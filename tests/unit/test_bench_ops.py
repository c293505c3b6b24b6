"""bench/ops.py and bench/shapes.py: operator categories and the GEMM shapes of a step."""

from __future__ import annotations

import torch.nn as nn

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


def test_linear_gemm_shapes_three_per_linear():
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    shapes = linear_gemm_shapes(model, tokens=64)
    # forward (M,K)@(K,N), grad input (M,N)@(N,K), grad weight (N,M)@(M,K), per linear;
    # the (64, 8, 32) forward of the first and grad input of the second coincide.
    assert shapes == {(64, 8, 32): 2, (64, 32, 8): 2, (32, 64, 8): 1, (8, 64, 32): 1}
    flops = sum(2 * m * k * n * c for (m, k, n), c in shapes.items())
    assert flops == 6 * 64 * (8 * 32 + 32 * 8)  # 6 · tokens · weights: the 6N of 6N+...
