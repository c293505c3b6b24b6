"""Peak RSS per rank while loading a sharded Hugging Face Llama checkpoint into 2 FSDP2
ranks (issue #15, "Loading big checkpoints"), against the model's full fp32 size.

    python bench/hf_load.py [--size 1b|300m] [--dir DIR] [--dtype bf16|fp32]

Writes a Llama-shape `save_pretrained`-style directory (config.json, shards of at most
1 GB, index; random weights, `--dtype` on disk: bf16 halves the disk use, 2.2 GB for
1b) unless DIR already holds one, then launches 2 gloo ranks that each build the model
on meta, shard it with FSDP2 (fully_shard per block and the root), materialise their
shard and load the checkpoint with finetune/hf_import.py `load_hf_into` (each rank
reads only its own slices). Each rank reports its RSS after setup (the baseline:
imports, process group) and its peak RSS (getrusage ru_maxrss) after the load; the
target is peak - baseline <= 0.6 x the full fp32 model size per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {  # Llama-3-like shapes (GQA 4:1, SwiGLU); parameter counts in the output
    "1b": dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192, vocab_size=32000),
    "300m": dict(n_layer=12, n_head=16, n_kv_head=4, d_model=1024, d_ff=4096, vocab_size=32000),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def model_cfg(size: str):
    from scaletrain.config.schema import ModelConfig

    return ModelConfig(name="llama", seq_len=2048, hf_architecture="LlamaForCausalLM",
                       **SIZES[size])


def write_checkpoint(size: str, d: Path, dtype: torch.dtype) -> None:
    from scaletrain.checkpoint.hf_export import write_shards
    from scaletrain.models.registry import spec_of

    m = model_cfg(size)
    spec = spec_of(m)
    with torch.device("meta"):
        model = spec.build(m, {})
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(spec.hf.config_json(m, None), indent=2))
    g = torch.Generator().manual_seed(0)
    tensors = {spec.hf.to_hf(k): (torch.randn(v.shape, generator=g) * 0.02).to(dtype)
               for k, v in model.state_dict().items()}
    write_shards(tensors, d, 1000**3)


def rank_main(d: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from scaletrain.finetune import hf_import
    from scaletrain.config.schema import ModelConfig
    from scaletrain.models.registry import materialize, spec_of

    dist.init_process_group("gloo")
    fields = hf_import.check_hf_dir(d)  # headers only
    m = ModelConfig(**fields)
    spec = spec_of(m)
    with torch.device("meta"):
        model = spec.build(m, {})
    full_bytes = 4 * sum(p.numel() for p in model.parameters())
    base = rss_bytes()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    materialize(model, "cpu", 0, tied=spec.tied)  # as the trainer does (init, then load)
    init_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hf_import.load_hf_into(model, d, spec.tied)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"rank": dist.get_rank(), "params": full_bytes // 4, "full_fp32_gb": full_bytes / 1e9,
           "baseline_gb": base / 1e9, "peak_after_init_gb": init_peak / 1e9,
           "peak_gb": peak / 1e9,
           "above_baseline_x_full": (peak - base) / full_bytes}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print(json.dumps(rows, indent=1))
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=SIZES, default="1b")
    p.add_argument("--dir", default="")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    d = Path(a.dir or f"/tmp/scaletrain-hf-load-{a.size}-{a.dtype}")
    if a.rank:
        rank_main(d)
        return 0
    if not (d / "config.json").is_file():
        write_checkpoint(a.size, d, torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=2", __file__, "--rank", "--dir", str(d)]
    return subprocess.call(cmd, env={**os.environ, "PYTHONPATH": str(REPO)})


if __name__ == "__main__":
    sys.exit(main())
