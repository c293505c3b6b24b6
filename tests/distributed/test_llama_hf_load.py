"""Loading a Hugging Face directory into a model laid out over ranks
(finetune/hf_import.py `load_hf_into`): under FSDP2 and tensor parallelism each rank
copies only its DTensor block (whole rows with one pread: FSDP2's dim-0 shards, TP's
q/k/v/gate/up and vocabulary; TP's columns of o/down through safetensors' get_slice),
under a pipeline only its stage's tensors, a last stage's tied head from the stored
embedding. Every tensor a rank holds, gathered, equals the stored
one bit for bit."""

from __future__ import annotations

import pytest
import torch

from spawn import run_distributed
from scaletrain.config.dims import resolve_dims
from scaletrain.config.schema import ModelConfig, ParallelConfig
from scaletrain.finetune import hf_import
from scaletrain.models.registry import spec_of
from scaletrain.parallel.context import DistContext
from scaletrain.parallel.parallelize import build_parallel_model
from scaletrain.parallel.weights import full_state_dict
from scaletrain.precision import PrecisionPolicy

transformers = pytest.importorskip("transformers")  # pinned in requirements.txt

# (architecture, config extras, parallel layout, save shard size)
CASES = {
    # q/k/v biases (dim-0 slices), tied head: one vocabulary-parallel tensor
    "qwen2 tp2 tied": ("Qwen2", dict(tie_word_embeddings=True), dict(tp=2), "5GB"),
    # FSDP2 row blocks (one pread each); the tied head is the embedding's DTensor
    "mistral fsdp2 tied": ("Mistral", dict(tie_word_embeddings=True, sliding_window=None),
                           dict(dp_shard=2), "20KB"),
    # sharded index, untied; tied head read on the last stage from the embedding
    "llama pp2 untied": ("Llama", dict(tie_word_embeddings=False), dict(pp=2), "20KB"),
    "llama pp2 tied": ("Llama", dict(tie_word_embeddings=True), dict(pp=2), "20KB"),
}


def _load_on_rank(rank: int, world: int, cases: dict) -> dict:
    out = {}
    for name, (d, layout) in cases.items():
        pcfg = ParallelConfig(**{"dp_shard": 1, "timeout_s": 60, **layout})
        ctx = DistContext.setup(pcfg, rank, resolve_dims(pcfg, world), torch.device("cpu"))
        mcfg = ModelConfig(**hf_import.check_hf_dir(d))
        pm = build_parallel_model(mcfg, {"vocab_size": mcfg.vocab_size}, seed=0,
                                  dims=ctx.dims, mesh=ctx.mesh, pcfg=pcfg,
                                  policy=PrecisionPolicy("fp32", torch.device("cpu")),
                                  device=torch.device("cpu"))
        hf_import.load_hf_into(pm.module, d, spec_of(mcfg).tied)
        out[name] = full_state_dict(pm.module)
    return out


# On 4 ranks: FSDP over TP, both splitting dim 0 of q/k/v/gate/up (FSDP's strided
# shard of the TP block) and dims 0 and 1 of o/down; qk-norm weights replicated over tp.
CASES_4 = {
    "qwen3 fsdp2 x tp2": ("Qwen3", dict(tie_word_embeddings=False), dict(dp_shard=2, tp=2),
                          "20KB"),
}


def test_tp_and_pipeline_ranks_load_exactly_the_stored_tensors(tmp_path):
    _check_layouts(CASES, 2, tmp_path)


def test_fsdp_over_tp_ranks_load_exactly_the_stored_tensors(tmp_path):
    _check_layouts(CASES_4, 4, tmp_path)


def _check_layouts(layouts: dict, world: int, tmp_path) -> None:
    """Each layout's ranks load a fresh transformers save; gathered, their tensors are
    the stored ones bit for bit, and together they are all of them."""
    cases, stored = {}, {}
    for name, (arch, extra, layout, shard) in layouts.items():
        torch.manual_seed(0)
        cfg = getattr(transformers, f"{arch}Config")(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            **extra)
        if arch == "Qwen2":
            cfg.attention_bias = True
        model = getattr(transformers, f"{arch}ForCausalLM")(cfg)
        for n, p in model.named_parameters():  # norms and biases not at 1 / 0
            if n.endswith(("bias", "norm.weight")):
                torch.nn.init.normal_(p, std=0.5)
        d = tmp_path / name.replace(" ", "-")
        model.save_pretrained(d, max_shard_size=shard)
        cases[name] = (d, layout)
        stored[name] = hf_import.hf_state_dict(d)
    outs = run_distributed(_load_on_rank, world, cases, timeout=120)
    for name, (_, extra, layout, _) in layouts.items():
        tied = extra["tie_word_embeddings"]
        seen = set()
        for rank, out in enumerate(outs):
            for k, v in out[name].items():
                src = "embed_tokens.weight" if tied and k == "lm_head.weight" else k
                assert torch.equal(v, stored[name][src]), (name, rank, k)
                seen.add(k)
        want = set(stored[name]) | ({"lm_head.weight"} if tied else set())
        assert seen == want, (name, seen ^ want)
        if "pp" in layout:  # each stage holds only its part
            assert all(len(out[name]) < len(want) for out in outs), name
