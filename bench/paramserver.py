"""Parameter-server consistency models with a straggler: wall time to a target val loss.

Two workers and one server (`scaletrain train --nproc 3 --parallel.mode=ps`); worker 1
sleeps after every step for as long as a step takes (`parallel.ps_slow_delay_s`), so it
runs 2x slower. For `sync`, `ssp` (s=2) and `async` we measure the wall time until the
validation loss first reaches the target, the samples needed, and the staleness of every
applied gradient; DDP (`--nproc 2 --parallel.dp_replicate=2`, no straggler: the SPMD
trainer has no delay knob) is the reference of the same machine.

Method (DESIGN.md §4): a calibration run (sync, no delay, `--steps`) gives the step time
(the delay) and the target: 1.001 x its val loss at half of its steps (the margin keeps
runs that equal sync up to fp32 rounding, like DDP, from missing it by 1e-6; a later
target is not reached by ssp/async, which plateau above sync with AdamW at this LR). The
measured runs get a budget of 1.5 x `--steps`, so a mode that needs more samples than
sync can still get there. `--rounds` rounds run every mode once, in a rotated order; we
report per-mode medians and the median over rounds of each mode's time divided by sync's
in the same round. `sync` runs twice per round (A/A control: the ratio of the two sync
runs shows the noise).

PS time: `wall_s` of the first eval record at or below the target (seconds since the
coordinator started, evals included). DDP time: its summary wall time x (step of that
eval / steps). Both exclude process start-up (torchrun, imports, data).

    .venv/bin/python bench/paramserver.py [--rounds 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODEL = ["--model.name=gpt", "--model.n_layer=2", "--model.n_head=2", "--model.d_model=64",
         "--model.seq_len=32", "--train.batch_size=16", "--optim.lr=3e-3",
         "--schedule.name=constant", "--train.progress=off", "--train.log_interval=5",
         "--eval.interval=5", "--eval.batches=4", "--eval.batch_size=16", "--eval.test=false",
         "--data.source=python-stdlib", "--data.max_files=48", "--data.vocab_size=512",
         "--data.prep_workers=1"]
MODES = {
    "sync": ["--parallel.mode=ps", "--parallel.ps_consistency=sync"],
    "ssp2": ["--parallel.mode=ps", "--parallel.ps_consistency=ssp",
             "--parallel.ps_staleness=2"],
    "async": ["--parallel.mode=ps", "--parallel.ps_consistency=async"],
}


def train(args: list[str], nproc: int, run_dir: Path) -> tuple[list[dict], dict]:
    cmd = [sys.executable, "-m", "scaletrain", "train", f"--nproc={nproc}", *args,
           f"--run.dir={run_dir}", "--run.overwrite=true"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_CPP_LOG_LEVEL": "ERROR"}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return recs, json.loads((run_dir / "summary.json").read_text())


def time_to_target(recs: list[dict], summary: dict, target: float, steps: int):
    """(seconds, step) of the first validation at or below `target`; (inf, None) if none."""
    for r in recs:
        if r["kind"] == "eval" and r["split"] == "val" and r["step"] > 0 \
                and r["loss"] <= target:
            if "wall_s" in r:
                return r["wall_s"], r["step"]
            return summary["wall_time_s"] * r["step"] / steps, r["step"]
    return float("inf"), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--no-ddp", action="store_true")
    ap.add_argument("--prepared-dir", default=str(Path(tempfile.gettempdir()) / "ps_bench"))
    a = ap.parse_args()
    base = MODEL + [f"--train.steps={a.steps}", f"--data.prepared_dir={a.prepared_dir}"]
    work = Path(tempfile.mkdtemp(prefix="ps_bench_"))

    recs, summ = train(base + MODES["sync"], 3, work / "calib")
    step_s = summ["wall_time_s"] / a.steps
    at = a.steps // 2
    target = 1.001 * next(r["loss"] for r in recs if r["kind"] == "eval" and r["step"] >= at)
    print(f"calibration: sync, no straggler: {step_s * 1e3:.0f} ms/step; target val loss "
          f"{target:.4f} (reached at step {at})")
    slow = ["--parallel.ps_slow_worker=1", f"--parallel.ps_slow_delay_s={step_s:.4f}"]
    steps = 3 * a.steps // 2
    base = MODEL + [f"--train.steps={steps}", f"--data.prepared_dir={a.prepared_dir}"]

    modes = ["sync", "sync_aa", "ssp2", "async"] + ([] if a.no_ddp else ["ddp"])
    times: dict[str, list[float]] = {m: [] for m in modes}
    steps_hit: dict[str, list] = {m: [] for m in modes}
    hists: dict[str, dict] = {}
    for r in range(a.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for m in order:
            if m == "ddp":
                args, nproc = base + ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"], 2
            else:
                args, nproc = base + MODES[m.replace("_aa", "")] + slow, 3
            recs, summ = train(args, nproc, work / f"{m}-{r}")
            t, s = time_to_target(recs, summ, target, steps)
            times[m].append(t)
            steps_hit[m].append(s)
            if "staleness_hist" in summ:
                h = hists.setdefault(m, {})
                for k, v in summ["staleness_hist"].items():
                    h[k] = h.get(k, 0) + v
            print(f"  round {r} {m:8s} {t:7.2f} s to target (step {s})", flush=True)

    print(f"\nwall time to val loss {target:.4f}, worker 1 slowed 2x (median of "
          f"{a.rounds} rounds; ratio = median over rounds of mode / sync):")
    for m in modes:
        ratios = [t / s for t, s in zip(times[m], times["sync"])]
        print(f"  {m:8s} {statistics.median(times[m]):7.2f} s   ratio {statistics.median(ratios):.3f}"
              f"   steps to target {steps_hit[m]}")
    for m, h in hists.items():
        total = sum(h.values())
        dist = ", ".join(f"{k}: {v / total:.1%}" for k, v in sorted(h.items(), key=lambda kv: int(kv[0])))
        print(f"  staleness {m:8s} ({total} gradients): {dist}")


if __name__ == "__main__":
    main()
