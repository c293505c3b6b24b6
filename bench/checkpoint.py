"""How long a training step is blocked by a checkpoint: async vs synchronous save.

The ~125M GPT of configs/gpt2-small.toml (12 x 768, vocab 50304, 1024 positions) with
AdamW state (fp32 params + two moments: ~1.5 GB on disk), saved through the real
`CheckpointManager`. Blocked time is the wall time of `manager.save()` as the trainer
calls it: for a synchronous save the whole write (DCP write + fsync + manifest hashing
+ rename); for an async save only the staging copy to CPU memory (the write then goes
on in a background thread; before each timed save the previous one is waited for, as
the manager does, untimed).

Interleaved pairs (DESIGN.md §4): each pair times one sync save (A) and one async save
(B); we report the median of per-pair ratios B/A, and as a noise control the median
ratio of two sync saves taken back to back (A/A').

    .venv/bin/python bench/checkpoint.py [--pairs 10] [--device cpu|cuda] [--dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from scaletrain.checkpoint.manager import CheckpointManager  # noqa: E402
from scaletrain.config import build_config  # noqa: E402
from scaletrain.models import build_model, count_params  # noqa: E402
from scaletrain.optim import build_optimizer, build_scheduler  # noqa: E402
from scaletrain.train.state import TrainState  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def config(run_dir: Path, async_save: bool):
    return build_config(str(REPO / "configs" / "gpt2-small.toml"),
                        [("run.dir", str(run_dir)), ("checkpoint.keep", "1"),
                         ("checkpoint.async_save", str(async_save).lower())])


def build(cfg, device: str):
    """The model, an AdamW with its state, and the small stateful pieces."""
    model = build_model(cfg.model, {"vocab_size": cfg.model.vocab_size}, seed=0,
                        device=device)
    opt = build_optimizer(model, cfg.optim)
    for p in model.parameters():  # one step with zero gradients: Adam state exists
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, {"scheduler": build_scheduler(opt, cfg), "train_state": TrainState()}


def timed_save(mgr: CheckpointManager, step: int, device: str) -> float:
    mgr.wait()  # the previous async write, untimed (at most one in flight)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    mgr.save(step)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    try:
        sync_cfg, async_cfg = config(root / "sync", False), config(root / "async", True)
        model, opt, stateful = build(sync_cfg, args.device)
        # Two managers over the same model and optimizer: only the save mode differs.
        sync_mgr = CheckpointManager(root / "sync", sync_cfg, model=model, optimizer=opt,
                                     stateful=stateful)
        async_mgr = CheckpointManager(root / "async", async_cfg, model=model, optimizer=opt,
                                      stateful=stateful)
        n = count_params(model)
        print(f"model: {n / 1e6:.1f}M params on {args.device}, threads "
              f"{torch.get_num_threads()}")
        timed_save(sync_mgr, 0, args.device)  # warm-up: page cache, allocator, DCP plans
        timed_save(async_mgr, 0, args.device)
        async_mgr.wait()
        size = sum(p.stat().st_size for p in (root / "sync").rglob("*") if p.is_file())
        print(f"checkpoint: {size / 2**30:.2f} GiB")
        ratios, controls, syncs, asyncs = [], [], [], []
        for i in range(1, args.pairs + 1):
            a = timed_save(sync_mgr, 2 * i, args.device)
            b = timed_save(async_mgr, 2 * i, args.device)
            async_mgr.wait()  # untimed: A' must not share the disk with B's write
            a2 = timed_save(sync_mgr, 2 * i + 1, args.device)
            syncs += [a, a2]
            asyncs.append(b)
            ratios.append(b / a)
            controls.append(a2 / a)
            print(f"pair {i:2d}: sync {a:7.3f}s  async (blocked) {b:7.3f}s  "
                  f"ratio {b / a:6.3f}  control sync/sync {a2 / a:6.3f}", flush=True)
        async_mgr.close()
        print(f"median sync save {statistics.median(syncs):.3f}s, median async blocked "
              f"{statistics.median(asyncs):.3f}s")
        print(f"median per-pair ratio async/sync: {statistics.median(ratios):.3f} "
              f"(target <= 0.10); A/A control sync/sync: {statistics.median(controls):.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
