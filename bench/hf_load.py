"""Peak RSS per rank while loading a sharded Hugging Face Llama checkpoint into 2 FSDP2
ranks (issue #15, "Loading big checkpoints"), against the model's full fp32 size.

    python bench/hf_load.py [--size 1b|300m] [--dir DIR] [--dtype bf16|fp32] [--keep]

Writes a Llama-shape `save_pretrained`-style directory (config.json, shards of at most
1 GB, index; random weights, `--dtype` on disk: bf16 halves the disk use, 2.2 GB for
1b) unless DIR already holds one (deleted afterwards unless --keep or DIR was given),
then launches 2 gloo ranks twice, one torchrun each (a peak is per process):
- "trainer": what `scaletrain train --init.from=DIR --parallel.dp_shard=2` does — the
  model built on meta and sharded by the trainer's `build_parallel_model`, its random
  init skipped (`init=False`: the loader writes every parameter), then
  finetune/hf_import.py `load_hf_into`: each rank reads only its own rows (one pread)
  or slices (safetensors get_slice), one tensor at a time;
- "init first": the same with the seeded init run before the load (main before this
  change): the init draws each parameter whole before cutting the rank's shard.
Each rank reports its RSS after setup (the baseline: imports, process group) and its
peak RSS (getrusage ru_maxrss) after the load; the target is
peak - baseline <= 0.6 x the full fp32 model size per rank (a rank's fp32 shard is 0.5x).
Results: bench/results/hf_load.{json,md}.

    python bench/hf_load.py --size moe [--dtype bf16|fp32]

An MoE (`MixtralForCausalLM` shape: 8 blocks of 16 experts, d 1024, expert width 1024;
experts are 82% of its 489M parameters) loaded three ways, one torchrun each, the
trainer's path (random init skipped): one process; 2 FSDP2 ranks (ep=1: each rank's
dim-0 block of every (E, D, F) expert stack, i.e. 8 of the 16 experts); 2 ranks with
parallel.ep=2 (each owns 8 experts whole). Each rank also reports the bytes it read
(finetune/hf_reads.py's recording BlockReader): which tensors, not only the RSS.
Results: bench/results/hf_load_moe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script, from any directory

from scaletrain.checkpoint.hf_export import write_shards  # noqa: E402
from scaletrain.config.dims import resolve_dims  # noqa: E402
from scaletrain.config.schema import ModelConfig, ParallelConfig  # noqa: E402
from scaletrain.finetune import hf_import  # noqa: E402
from scaletrain.finetune.hf_reads import BlockReader  # noqa: E402
from scaletrain.models.registry import spec_of  # noqa: E402
from scaletrain.parallel.context import DistContext  # noqa: E402
from scaletrain.parallel.parallelize import build_parallel_model  # noqa: E402
from scaletrain.precision import PrecisionPolicy  # noqa: E402

SIZES = {  # Llama-3-like shapes (GQA 4:1, SwiGLU); parameter counts in the output
    "1b": dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192, vocab_size=32000),
    "300m": dict(n_layer=12, n_head=16, n_kv_head=4, d_model=1024, d_ff=4096, vocab_size=32000),
    "moe": dict(n_layer=8, n_head=16, n_kv_head=4, d_model=1024, vocab_size=32000,
                moe_experts=16, moe_top_k=2, moe_d_ff=1024),
}
ARCH = {"moe": "MixtralForCausalLM"}  # the rest: LlamaForCausalLM


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def model_cfg(size: str):
    return ModelConfig(name="llama", seq_len=2048,
                       hf_architecture=ARCH.get(size, "LlamaForCausalLM"), **SIZES[size])


def write_checkpoint(size: str, d: Path, dtype: torch.dtype) -> None:
    m = model_cfg(size)
    spec = spec_of(m)
    with torch.device("meta"):
        model = spec.build(m, {})
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(spec.hf.config_json(m, None), indent=2))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for k, v in model.state_dict().items():
        t = (torch.randn(v.shape, generator=g) * 0.02).to(dtype)
        # the MoE's 3-D experts are written one (out, in) tensor per expert, as HF does
        tensors.update(spec.hf.tensors_to_hf(m, k, t) if spec.hf.tensors_to_hf is not None
                       else {spec.hf.to_hf(k): t})
    write_shards(tensors, d, 1000**3)


def rank_main(d: Path, init: bool, ep: int) -> None:
    fields = hf_import.check_hf_dir(d)  # headers only, as init.from's find_source
    m = ModelConfig(**fields)
    spec = spec_of(m)
    params = _count(spec, m)
    full_bytes = 4 * params
    world = int(os.environ["WORLD_SIZE"])
    pcfg = ParallelConfig(dp_shard=world, ep=ep)
    cpu = torch.device("cpu")
    ctx = DistContext.setup(pcfg, int(os.environ["RANK"]), resolve_dims(pcfg, world), cpu)
    base = rss_bytes()  # imports, process group, mesh: what any run holds
    pm = build_parallel_model(m, {"vocab_size": m.vocab_size}, seed=0, dims=ctx.dims,
                              mesh=ctx.mesh, pcfg=pcfg, policy=PrecisionPolicy("fp32", cpu),
                              device=cpu, init=init, expert_mesh=ctx.expert_mesh)
    built_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    log: list = []
    hf_import.load_hf_into(pm.module, d, spec.tied, BlockReader(log))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    expert_reads = [b for name, _, b in log if ".experts." in name]
    path = "init first" if init else "trainer"
    if m.moe_experts:
        path = f"world {world}, ep {ep}"
    rank = dist.get_rank() if world > 1 else 0  # one process: no process group
    row = {"path": path, "rank": rank,
           "read_gb": sum(b for _, _, b in log) / 1e9,
           "expert_tensors_read": len(expert_reads), "expert_read_gb": sum(expert_reads) / 1e9,
           "params": params, "full_fp32_gb": full_bytes / 1e9, "baseline_gb": base / 1e9,
           "peak_after_build_gb": built_peak / 1e9, "peak_gb": peak / 1e9,
           "above_baseline_x_full": (peak - base) / full_bytes}
    if world == 1:
        print("ROWS " + json.dumps([row]), flush=True)
        return
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print("ROWS " + json.dumps(rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _count(spec, m) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in spec.build(m, {}).parameters())


def _launch(d: Path, init: bool, nproc: int = 2, ep: int = 1) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", __file__, "--rank", "--dir", str(d),
           f"--ep={ep}"] + (["--init"] if init else [])
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True)
    rows = [json.loads(line[5:]) for line in out.stdout.splitlines()
            if line.startswith("ROWS ")]
    if out.returncode != 0 or not rows:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"ranks failed (exit {out.returncode})")
    return rows[0]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=SIZES, default="1b")
    p.add_argument("--dir", default="")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--init", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    d = Path(a.dir or f"/tmp/scaletrain-hf-load-{a.size}-{a.dtype}")
    if a.rank:
        rank_main(d, a.init, a.ep)
        return 0
    written = not (d / "config.json").is_file()
    if written:
        write_checkpoint(a.size, d, torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    try:
        if a.size == "moe":  # one process, FSDP2 on 2, EP=2 on 2: the trainer's path
            rows = (_launch(d, False, 1) + _launch(d, False, 2) + _launch(d, False, 2, ep=2))
        else:
            rows = _launch(d, init=False) + _launch(d, init=True)
    finally:
        if written and not (a.keep or a.dir):
            shutil.rmtree(d)
    print(json.dumps(rows, indent=1))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = "hf_load_moe" if a.size == "moe" else "hf_load"
    (out / f"{stem}.json").write_text(json.dumps({"size": a.size, "dtype": a.dtype,
                                                  "rows": rows}, indent=1) + "\n")
    ranks = ("one process, 2 FSDP2 ranks, 2 ranks with ep=2" if a.size == "moe"
             else "2 FSDP2 gloo ranks")
    lines = [f"# bench/hf_load.py --size {a.size} (checkpoint on disk in {a.dtype}, "
             f"{ranks})", "",
             "| path | rank | params | full fp32 GB | baseline GB | peak GB | "
             "(peak - baseline) / full | read GB | expert tensors read | expert GB read |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['rank']} | {r['params']:,} | {r['full_fp32_gb']:.3f} | "
              f"{r['baseline_gb']:.3f} | {r['peak_gb']:.3f} | "
              f"{r['above_baseline_x_full']:.3f} | {r['read_gb']:.3f} | "
              f"{r['expert_tensors_read']} | {r['expert_read_gb']:.3f} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
