"""Loading a Hugging Face MoE directory under expert parallelism (finetune/hf_import.py
`load_hf_into`, `_reads`): each rank reads only the per-expert tensors of the experts it
owns — rank (i, j) of the ("efsdp", "ep") mesh owns experts j·E/ep + [i, i+1)·E/(ep·efsdp)
— each whole, once; the dense tensors' rows are read exactly once over all ranks (FSDP2's
dim-0 shards); gathered, every tensor equals the stored one bit for bit. The reads are
counted by a recording BlockReader (finetune/hf_reads.py), not inferred."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from spawn import run_distributed
from tests.hf_dirs import VOCAB, hf_model_dir
from scaletrain.config.dims import resolve_dims
from scaletrain.config.schema import ModelConfig, ParallelConfig
from scaletrain.finetune import hf_import
from scaletrain.finetune.hf_reads import BlockReader, header
from scaletrain.models.registry import spec_of
from scaletrain.parallel.context import DistContext
from scaletrain.parallel.parallelize import build_parallel_model
from scaletrain.parallel.weights import full_state_dict
from scaletrain.precision import PrecisionPolicy

transformers = pytest.importorskip("transformers")  # pinned in requirements.txt

EXPERTS = 4
# Mixtral saved in 30 KB files: an expert's three tensors land in different files.
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2,
              num_local_experts=EXPERTS, intermediate_size=24, sliding_window=None)
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _load_on_rank(rank: int, world: int, d, layout: dict) -> tuple[dict, list]:
    pcfg = ParallelConfig(timeout_s=60, **layout)
    ctx = DistContext.setup(pcfg, rank, resolve_dims(pcfg, world), torch.device("cpu"))
    mcfg = ModelConfig(**hf_import.check_hf_dir(d))
    pm = build_parallel_model(mcfg, {"vocab_size": mcfg.vocab_size}, seed=0, dims=ctx.dims,
                              mesh=ctx.mesh, pcfg=pcfg,
                              policy=PrecisionPolicy("fp32", torch.device("cpu")),
                              device=torch.device("cpu"), expert_mesh=ctx.expert_mesh,
                              init=False)
    log: list = []
    hf_import.load_hf_into(pm.module, d, spec_of(mcfg).tied, BlockReader(log))
    return full_state_dict(pm.module), log


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world, ep", [(2, 2), (4, 2)])
def test_ep_ranks_read_only_their_experts(tmp_path, world, ep):
    d = tmp_path / "mixtral"
    hf_model_dir(d, "Mixtral", CONFIG, "30KB")
    stored = hf_import.hf_state_dict(d)
    outs = run_distributed(_load_on_rank, world, d, dict(dp_shard=world, ep=ep),
                           timeout=240)
    efsdp, per_rank = world // ep, EXPERTS // world
    # The bytes of each stored tensor, from the save's headers.
    sizes = {n: m["data_offsets"][1] - m["data_offsets"][0]
             for f in d.glob("*.safetensors") for n, m in header(f)[1].items()
             if n != "__metadata__"}
    dense_rows: Counter = Counter()
    for rank, (state, log) in enumerate(outs):
        i, j = divmod(rank, ep)  # init_device_mesh((efsdp, ep)): rank = i·ep + j
        owned = set(range(j * EXPERTS // ep + i * per_rank,
                          j * EXPERTS // ep + (i + 1) * per_rank))
        experts = [(n, b) for n, _, b in log if _EXPERT.search(n)]
        got = Counter(int(_EXPERT.search(n).group(1)) for n, _ in experts)
        # 2 layers x 3 projections of each owned expert, each read once and whole
        assert got == {e: 6 for e in owned}, (rank, got)
        assert len({n for n, _ in experts}) == len(experts), rank
        assert all(b == sizes[n] for n, b in experts), rank
        for n, _, b in log:
            if not _EXPERT.search(n):
                dense_rows[n] += b
        for k, v in state.items():
            assert torch.equal(v, stored[k]), (rank, k)
    assert efsdp * ep == world
    # The dense tensors: their rows split over the ranks, each byte read once in all.
    assert dense_rows == {n: s for n, s in sizes.items() if not _EXPERT.search(n)}
