"""The CUDA paths, compared with the CPU computation they claim to equal.

Skipped where torch sees no GPU (CI has none); on a GPU machine:
    python3 -m pytest -q -n 4 tests/gpu
`SCALETRAIN_TEST_DEVICE=cpu` runs the same flow on the CPU (a dry run of the tests
themselves: every comparison then holds trivially).

Tolerances: fp64 on both devices leaves only the order of reductions (cuBLAS' and the
CPU's GEMMs, CUDA's SDPA) to differ, ~1e-15 relative per op; after 10 AdamW steps the
losses agree to ~1e-12, so 1e-9 fails on any real difference (a wrong kernel, a cast
to fp32, a dropped term) and never on rounding. Mixed precision is compared with the
fp64 run on the same device at bf16's resolution.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaletrain.generate import sample
from scaletrain.models.llama import Llama, LlamaConfig
from scaletrain.models.moe import grouped_matmul
from scaletrain.models.registry import REGISTRY
from tests.conftest import TINY_DATA, TINY_GPT, run_cli

DEVICE = os.environ.get("SCALETRAIN_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="no CUDA device")]

LLAMA = ["--model.name=llama", "--model.n_kv_head=1", "--model.d_ff=64"]
MOE = [*LLAMA, "--model.moe_experts=4", "--model.moe_top_k=2", "--model.moe_d_ff=32",
       "--model.moe_aux_loss=0.01", "--model.moe_z_loss=0.001"]
FAMILIES = {"gpt": [], "llama": LLAMA, "moe": MOE}


def train(prepared_dir: Path, run: Path, device: str, *extra: str) -> list[float]:
    """A 10-step tiny run through the CLI; its logged training losses."""
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                   f"--run.dir={run}", f"--train.device={device}", "--train.steps=10",
                   "--eval.test=false", "--train.threads=1", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                   .splitlines()) if r["kind"] == "train"]


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == 10
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def assert_weights_close(a: Path, b: Path, rel: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        err = (wa[k].double() - wb[k].double()).abs().max() / wb[k].double().abs().max()
        assert err <= rel, (k, float(err))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp64_on_the_gpu_equals_the_cpu(family, prepared_dir, tmp_path):
    extra = ["--precision.dtype=fp64", *FAMILIES[family]]
    cpu = train(prepared_dir, tmp_path / "cpu", "cpu", *extra)
    gpu = train(prepared_dir, tmp_path / "gpu", DEVICE, *extra)
    assert max_rel_diff(gpu, cpu) < 1e-9, (gpu, cpu)
    assert_weights_close(tmp_path / "gpu", tmp_path / "cpu", 1e-9)


@pytest.mark.parametrize("mode", ["bf16", "bf16-pure", "fp16", "fp32"])
@pytest.mark.parametrize("family", ["gpt", "moe"])
def test_precision_modes_track_fp64(mode, family, prepared_dir, tmp_path):
    ref = train(prepared_dir, tmp_path / "ref", DEVICE, "--precision.dtype=fp64",
                *FAMILIES[family])
    got = train(prepared_dir, tmp_path / "got", DEVICE, f"--precision.dtype={mode}",
                *FAMILIES[family])
    # bf16 keeps 8 mantissa bits (4e-3 per rounding); through 10 steps of a 2-layer
    # model the loss stays within a few times that. fp32: 1e-5 (TF32 is off).
    tol = {"fp32": 1e-5, "fp16": 2e-2, "bf16": 3e-2, "bf16-pure": 5e-2}[mode]
    assert max_rel_diff(got, ref) < tol, (got, ref)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_compile_equals_eager(family, prepared_dir, tmp_path):
    extra = ["--precision.dtype=fp32", *FAMILIES[family]]
    eager = train(prepared_dir, tmp_path / "eager", DEVICE, *extra)
    compiled = train(prepared_dir, tmp_path / "compiled", DEVICE, "--train.compile=true",
                     *extra)
    assert max_rel_diff(compiled, eager) < 1e-5, (compiled, eager)  # fused fp32 kernels


@pytest.mark.parametrize("option", ["--parallel.activation_checkpoint=full",
                                    "--parallel.activation_checkpoint=selective",
                                    "--model.loss_chunks=4",
                                    "--train.micro_batch_size=2"])
def test_shortcuts_equal_the_plain_step(option, prepared_dir, tmp_path):
    extra = ["--precision.dtype=fp64", *LLAMA]
    plain = train(prepared_dir, tmp_path / "plain", DEVICE, *extra)
    got = train(prepared_dir, tmp_path / "got", DEVICE, option, *extra)
    assert max_rel_diff(got, plain) < 1e-9, (got, plain)


def test_resume_on_the_gpu_is_exact(prepared_dir, tmp_path):
    # fp64 and a tolerance, not bitwise equality: CUDA's atomic-add kernels (the
    # embedding's backward) sum in a different order in every process; a lost RNG,
    # loader or optimizer state moves the losses by far more than 1e-9. Dropout on: the
    # CUDA generator's state is part of what is restored.
    extra = ["--precision.dtype=fp64", "--checkpoint.interval=5", "--model.dropout=0.1",
             *LLAMA]
    ref = train(prepared_dir, tmp_path / "ref", DEVICE, *extra)
    run = tmp_path / "resumed"
    train(prepared_dir, run, DEVICE, *extra)
    # Back to the step-5 checkpoint, as if the run had died after it.
    for p in (run / "checkpoints").iterdir():
        if not p.name.endswith("00005"):
            shutil.rmtree(p)
    for name in ("model.safetensors", "summary.json"):
        (run / name).unlink(missing_ok=True)
    got = train(prepared_dir, run, DEVICE, *extra)
    assert max_rel_diff(got, ref) < 1e-9, (got, ref)
    assert_weights_close(run, tmp_path / "ref", 1e-9)


def test_grouped_mm_equals_the_segment_loop():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 17, 3, 0, 9])  # experts with no tokens too
    x = torch.randn(int(counts.sum()), 64, generator=g).to(DEVICE, torch.bfloat16)
    w = torch.randn(6, 64, 32, generator=g).to(DEVICE, torch.bfloat16)
    x.requires_grad_(), w.requires_grad_()
    counts = counts.to(DEVICE)
    out = {}
    for grouped in (True, False):
        y = grouped_matmul(x, w, counts, grouped=grouped)
        gx, gw = torch.autograd.grad(y.float().square().sum(), (x, w))
        out[grouped] = (y.float(), gx.float(), gw.float())
    for a, b in zip(out[True], out[False]):  # bf16 outputs: 2^-8 relative
        assert ((a - b).norm() / b.norm()) < 1e-2


def test_kv_cache_generation_equals_rerunning_the_context():
    cfg = LlamaConfig(vocab_size=97, seq_len=24, n_layer=2, n_head=4, n_kv_head=2,
                      d_model=32, d_ff=64, qk_norm=True, init_std=0.3)
    model = Llama(cfg)
    model.init_weights(5)
    model = model.to(DEVICE, torch.float64).eval()
    prompt = [3, 1, 4, 1, 5]
    a = sample(model, prompt, max_new_tokens=40, seq_len=cfg.seq_len, temperature=0,
               decode=REGISTRY["llama"].decode)
    b = sample(model, prompt, max_new_tokens=40, seq_len=cfg.seq_len, temperature=0)
    assert a == b and len(set(a)) > 3
