"""Tensor parallel (parallel/tensor.py, models/plans.py): each TP layer against its
nn.Linear / nn.Embedding reference, and whole training runs against one process."""

from __future__ import annotations

import pytest
import torch

from mp_harness import assert_parity, mp_runs, mp_spec, reference
from spawn import run_distributed

def _layers(rank: int, world: int) -> dict:
    """Forward output and input/weight gradients of each sharded layer vs the local
    reference (identical seeded weights and inputs on every rank)."""
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   loss_parallel, parallelize_module)

    from scaletrain.models.tp_styles import fused_colwise

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    D, V = 8, 12
    x = torch.randn(2, 3, D)
    ids = torch.randint(0, V, (2, 3))
    cases = {"fused_qkv": (nn.Linear(D, 3 * D), fused_colwise(3)),
             "colwise": (nn.Linear(D, 4 * D), ColwiseParallel()),
             "rowwise": (nn.Linear(4 * D, D), RowwiseParallel()),
             "embedding": (nn.Embedding(V, D), RowwiseParallel(input_layouts=Replicate()))}
    out = {}
    for name, (ref, style) in cases.items():
        tp = parallelize_module(type(ref)(*_shape(ref)), mesh, style)
        with torch.no_grad():
            for (_, p), (_, q) in zip(ref.named_parameters(), tp.named_parameters()):
                q.copy_(_distribute_like(p, q))
        if name == "embedding":
            full_in = local_in = ids
        elif name == "rowwise":  # the row-parallel input is a column-parallel shard
            full_in = torch.randn(2, 3, 4 * D).requires_grad_()
            local_in = full_in.detach().chunk(world, -1)[rank].clone().requires_grad_()
        else:
            full_in = x.clone().requires_grad_()
            local_in = x.clone().requires_grad_()
        y_ref, y = ref(full_in), tp(local_in)
        w = torch.randn_like(y_ref)  # the same full weighting on every rank (same seed)
        if name == "fused_qkv":  # local (.., 3D/tp) = [q_r, k_r, v_r]
            local = lambda t: torch.cat([c.chunk(world, -1)[rank] for c in t.chunk(3, -1)], -1)
        elif name == "colwise":
            local = lambda t: t.chunk(world, -1)[rank]
        else:
            local = lambda t: t
        (y_ref * w).sum().backward()
        (y * local(w)).sum().backward()  # the ranks' column losses sum to the full one
        y_ref_local = local(y_ref)
        grads = {pn: (q.grad.full_tensor() - p.grad).abs().max().item()
                 for (pn, p), (_, q) in zip(ref.named_parameters(), tp.named_parameters())}
        out[name] = {"fwd": (y - y_ref_local).abs().max().item(), "grads": grads}
        if name == "rowwise":
            out[name]["dx"] = (local_in.grad - full_in.grad.chunk(world, -1)[rank]).abs().max().item()
        elif name != "embedding":  # column-parallel: dx all-reduced over the ranks' columns
            out[name]["dx"] = (local_in.grad - full_in.grad).abs().max().item()
    # Vocabulary-parallel head + loss_parallel cross-entropy vs F.cross_entropy.
    head_ref = nn.Linear(D, V, bias=False)
    head = parallelize_module(nn.Linear(D, V, bias=False), mesh,
                              ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    with torch.no_grad():
        head.weight.copy_(_distribute_like(head_ref.weight, head.weight))
    tgt = torch.randint(0, V, (2, 3))
    tgt[0, 0] = -100
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    l_ref = F.cross_entropy(head_ref(xr).flatten(0, 1), tgt.flatten(), reduction="sum")
    l_ref.backward()
    with loss_parallel():
        logits = head(xt)
        l_tp = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum")
        l_tp.backward()
    out["loss_parallel"] = {
        "fwd": abs(l_tp.full_tensor().item() - l_ref.item()),
        "grads": {"weight": (head.weight.grad.full_tensor() - head_ref.weight.grad).abs().max().item()},
        "dx": (xt.grad - xr.grad).abs().max().item()}
    return out


def _shape(m):
    import torch.nn as nn

    if isinstance(m, nn.Embedding):
        return m.num_embeddings, m.embedding_dim
    return m.in_features, m.out_features


def _distribute_like(full: torch.Tensor, like):
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None)


def test_tp_layers_match_nn_reference():
    for r in run_distributed(_layers, 2, timeout=60):
        for name, res in r.items():
            assert res["fwd"] < 1e-5, (name, res)
            assert all(v < 1e-5 for v in res["grads"].values()), (name, res)
            assert res.get("dx", 0.0) < 1e-5, (name, res)


def test_tp2_and_sequence_parallel_match_one_process():
    """TP=2 (loss-parallel head) 20 steps, then TP=2 + sequence parallel with gathered
    logits, in one spawned pair."""
    specs = [mp_spec(tp=2), mp_spec(tp=2, sp=True, lp=False, steps=5)]
    outs = run_distributed(mp_runs, 2, specs, timeout=150)
    for spec, r0, r1 in zip(specs, outs[0], outs[1]):
        assert_parity(reference(spec), r0)
        assert r0["losses"] == r1["losses"]


def test_invalid_tp_degrees_name_the_constraint():
    from scaletrain.config.schema import ModelConfig
    from scaletrain.errors import ConfigError
    from scaletrain.parallel.tensor import check_tp

    m = ModelConfig(n_layer=2, n_head=3, d_model=48, seq_len=16)
    with pytest.raises(ConfigError, match="n_head=3"):
        check_tp(m, 64, 2, False)
    m = ModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=16)
    with pytest.raises(ConfigError, match="vocabulary size.*=67"):
        check_tp(m, 67, 2, False)
    with pytest.raises(ConfigError, match="seq_len=15"):
        check_tp(ModelConfig(n_layer=2, n_head=4, d_model=32, seq_len=15), 64, 2, True)
    check_tp(m, 64, 2, True)  # divides: no error
