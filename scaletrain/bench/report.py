"""`scaletrain bench`: how fast a config trains on this machine, against its limits.

1. The device's measured matmul peak in fp32 and bf16 (metrics.measure_peak_flops), and
   the "shape-matched" peak: the same matmuls at the model's own GEMM shapes
   (bench/shapes.py), a second reference line; MFU stays against the true peak.
2. The trainer's own step (Trainer.train_one_step) timed over `steps` steps after
   `warmup` steps (which absorb compilation and allocator warm-up): tokens/s and MFU
   against the peak of the compute dtype.
3. A breakdown of those same steps by timing the trainer's pieces in place, no copy of
   the step: data = `next_micro_batches` (wrapped on the instance), forward = the model's
   forward pre-hook -> forward hook, optimizer = the optimizer's step pre/post hooks; the
   rest of the step is the backward (with activation-checkpoint recomputation), the loss
   and gradient clipping. Communication is only separate under DDP/FSDP, where it overlaps
   the backward; this command runs one process, so there is none. Then one more step
   under torch.profiler, split by operator kind (GEMM, attention, LayerNorm, GELU,
   softmax/CE, casts, other element-wise, compiled kernels, optimizer, framework;
   bench/ops.py) — on a GPU by its kernels' device time instead (bench/gpu_ops.py),
   since there the pieces' host times above are launch times, not the work.
4. The hand-written loop (bench/handloop.py) timed in interleaved segments with the
   trainer (A B A' per pair, median of per-pair ratios A/B, A/A' as noise control,
   DESIGN.md §4).

Writes bench.json and bench.png (bar chart of the breakdown and of the two loops' step
times) to `out`, and returns the table as text.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from scaletrain.bench.gpu_ops import profile_step_on, synchronize
from scaletrain.bench.handloop import HandLoop
from scaletrain.bench.shapes import linear_gemm_shapes, shape_matched_peak
from scaletrain.config.dims import ParallelDims
from scaletrain.metrics import measure_peak_flops
from scaletrain.parallel.world import World
from scaletrain.train.runtime import detect_runtime
from scaletrain.train.trainer import Trainer


def _timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of `fn`; on a GPU the queued work is waited for at both ends
    (neither loop syncs each step: the hand loop never, the trainer reads a step late)."""
    synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t) / steps


class _PieceTimer:
    """Seconds spent in data, forward and optimizer inside the trainer's steps."""

    def __init__(self, tr):
        self.data = self.forward = self.optim = 0.0
        self._t = 0.0
        inner = tr.next_micro_batches

        def data():
            t = time.perf_counter()
            out = inner()
            self.data += time.perf_counter() - t
            return out

        tr.next_micro_batches = data  # instance attribute: the class is untouched
        self.handles = [
            tr.model.register_forward_pre_hook(lambda *a: self._start()),
            tr.model.register_forward_hook(lambda *a: self._stop("forward")),
            tr.optimizer.register_step_pre_hook(lambda *a: self._start()),
            tr.optimizer.register_step_post_hook(lambda *a: self._stop("optim")),
        ]
        self._restore = lambda: tr.__dict__.pop("next_micro_batches", None)

    def _start(self) -> None:
        self._t = time.perf_counter()

    def _stop(self, name: str) -> None:
        setattr(self, name, getattr(self, name) + time.perf_counter() - self._t)

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self._restore()


def run_bench(tr, *, steps: int = 5, warmup: int = 2, pairs: int = 3) -> dict:
    """Measure `tr` (a Trainer); see the module docstring. Returns the result dict."""
    threads = tr.rt.threads
    # Measured now (and the cache refreshed): a peak cached while the cores were busy
    # would inflate the MFU; measuring is ~1 s.
    peaks = {name: measure_peak_flops(dt, threads, tr.rt.device, use_cache=False)
             for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    compute = "bf16" if tr.policy.compute_dtype == torch.bfloat16 else "fp32"
    seq = getattr(tr.cfg.model, "seq_len", 1) if tr.spec.kind == "text" else 1
    shapes = linear_gemm_shapes(tr.model, tr.micro * seq)
    matched = shape_matched_peak(shapes, {"bf16": torch.bfloat16, "fp32": torch.float32}[
        compute], threads, tr.rt.device)["flops"] if shapes else None
    tr.model.train()
    t = time.perf_counter()
    for _ in range(warmup):
        tr.train_one_step()
    warmup_s = time.perf_counter() - t

    pieces = _PieceTimer(tr)
    tr.reads.flush()
    synchronize(tr.rt.device)
    tokens0, t = tr.state.tokens, time.perf_counter()
    for _ in range(steps):
        tr.train_one_step()
    tr.reads.flush()  # the token counts (read a step late on a GPU)
    synchronize(tr.rt.device)
    total = time.perf_counter() - t
    tokens = tr.state.tokens - tokens0
    pieces.close()
    ops = profile_step_on(tr.train_one_step, tr.rt.device)
    tok_s = tokens / total
    per_step = {"data": pieces.data / steps, "forward": pieces.forward / steps,
                "backward+loss+clip": (total - pieces.data - pieces.forward - pieces.optim)
                / steps, "optimizer": pieces.optim / steps, "communication": 0.0}

    hand = HandLoop(tr)
    for _ in range(warmup):
        hand.step()
    ta_all, tb_all, ratios, controls = [], [], [], []
    seg = max(1, steps // 2)
    for i in range(pairs):
        a = lambda: tr.train_one_step()  # noqa: E731
        run = lambda fn: _timed(fn, seg, tr.rt.device)  # noqa: E731
        if i % 2 == 0:  # alternate who goes first so drift favours neither
            ta, tb, ta2 = run(a), run(hand.step), run(a)
        else:
            ta2, tb, ta = run(a), run(hand.step), run(a)
        ta_all.append(ta), tb_all.append(tb)
        ratios.append(ta / tb), controls.append(ta / ta2)

    fpt = tr.flops_per_token
    return {
        "model_params": tr.n_params, "precision": tr.cfg.precision.dtype,
        "compile": tr.cfg.train.compile,
        "activation_checkpoint": tr.cfg.parallel.activation_checkpoint,
        "threads": threads, "interop_threads": torch.get_num_interop_threads(),
        "device": str(tr.rt.device), "peak_flops": peaks, "compute_dtype": compute,
        "steps": steps, "warmup_steps": warmup, "warmup_s": warmup_s,
        "tokens_per_step": tokens / steps, "step_s": total / steps, "tokens_per_s": tok_s,
        "flops_per_token": fpt,
        "mfu": tok_s * fpt / peaks[compute] if fpt else None,
        "shape_matched_peak_flops": matched,
        "mfu_vs_shape_matched": tok_s * fpt / matched if fpt and matched else None,
        "breakdown_s": per_step,
        "ops_s": ops["ops_s"], "profiled_step_s": ops["wall_s"],
        # GPU: the share of the unprofiled step the kernels keep the device busy
        "gpu_busy": ops["kernel_s"] / (total / steps) if "kernel_s" in ops else None,
        "hand_loop": {"scaletrain_step_s": statistics.median(ta_all),
                      "hand_step_s": statistics.median(tb_all),
                      "ratio": statistics.median(ratios),
                      "aa_control": statistics.median(controls),
                      "pairs": pairs, "steps_per_segment": seg},
    }


def format_table(r: dict) -> str:
    """The result as an aligned text table."""
    ms = lambda s: f"{s * 1e3:10.2f} ms"  # noqa: E731
    h = r["hand_loop"]
    rows = [
        ("model", f"{r['model_params'] / 1e6:.2f}M params, {r['precision']}, compile="
                  f"{r['compile']}, AC={r['activation_checkpoint']}"),
        ("threads", f"{r['threads']} intra-op, {r['interop_threads']} inter-op, "
                    f"{r['device']}"),
        ("peak GEMM fp32", f"{r['peak_flops']['fp32'] / 1e9:10.1f} GFLOP/s"),
        ("peak GEMM bf16", f"{r['peak_flops']['bf16'] / 1e9:10.1f} GFLOP/s"),
        ("shape-matched GEMM", "n/a" if r["shape_matched_peak_flops"] is None else
         f"{r['shape_matched_peak_flops'] / 1e9:10.1f} GFLOP/s  ({r['compute_dtype']}, "
         f"the model's GEMM shapes)"),
        ("step", ms(r["step_s"])),
        ("tokens/s", f"{r['tokens_per_s']:10.1f}"),
        ("MFU", "n/a" if r["mfu"] is None else
         f"{r['mfu'] * 100:10.1f} % of {r['compute_dtype']} peak"),
        ("MFU vs shape-matched", "n/a" if r["mfu_vs_shape_matched"] is None else
         f"{r['mfu_vs_shape_matched'] * 100:10.1f} %"),
        *[(f"  {k}", f"{ms(v)}  {v / r['step_s'] * 100:5.1f} %")
          for k, v in r["breakdown_s"].items()],
        ("profiled step by op", ms(r["profiled_step_s"])),
        *[(f"  {k}", f"{ms(v)}  {v / r['profiled_step_s'] * 100:5.1f} %")
          for k, v in r["ops_s"].items()],
        *([("GPU busy", f"{r['gpu_busy'] * 100:10.1f} % of the unprofiled step "
                        f"(kernel time / step)")] if r.get("gpu_busy") is not None else []),
        ("hand loop step", ms(h["hand_step_s"])),
        ("scaletrain / hand", f"{h['ratio']:10.4f}  (A/A control {h['aa_control']:.4f}, "
                              f"{h['pairs']} pairs)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def save(r: dict, out: Path) -> list[Path]:
    """bench.json and bench.png (breakdown bars; scaletrain vs hand-loop step) in `out`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(r, indent=1) + "\n")
    fig = Figure(figsize=(13, 3.8))
    FigureCanvasAgg(fig)
    ax1, ax3, ax2 = fig.subplots(1, 3)
    names = list(r["breakdown_s"])
    ax1.barh(names, [r["breakdown_s"][k] * 1e3 for k in names], color="tab:blue")
    ax1.invert_yaxis()
    ax1.set_xlabel("ms per step")
    mfu = "" if r["mfu"] is None else f", MFU {r['mfu'] * 100:.1f}%"
    ax1.set_title(f"step {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:.0f} tok/s{mfu}",
                  fontsize=9)
    ops = [k for k, v in r["ops_s"].items() if v > 0]
    ax3.barh(ops, [r["ops_s"][k] * 1e3 for k in ops], color="tab:orange")
    ax3.invert_yaxis()
    ax3.set_xlabel("ms per step (torch.profiler, self time)")
    sm = r.get("shape_matched_peak_flops")
    ax3.set_title("by operator" + ("" if not sm else f"; shape-matched GEMM peak "
                                   f"{sm / 1e9:.0f} GFLOP/s"), fontsize=9)
    h = r["hand_loop"]
    ax2.bar(["scaletrain", "hand loop"], [h["scaletrain_step_s"] * 1e3, h["hand_step_s"] * 1e3],
            color=["tab:blue", "tab:gray"])
    ax2.set_ylabel("ms per step (median of segments)")
    ax2.set_title(f"scaletrain / hand = {h['ratio']:.3f} (A/A {h['aa_control']:.3f})",
                  fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=100)
    return [out / "bench.json", out / "bench.png"]


def bench_command(cfg, world: World, dims: ParallelDims, *, out: str | None, steps: int,
                  warmup: int, pairs: int) -> dict:
    """Build the trainer of `cfg`, measure it, print the table, save JSON + PNG.
    `world`, `dims`: this process's place and the layout the CLI's validation resolved."""
    tr = Trainer(cfg, detect_runtime(cfg.train.device, cfg.train.threads, world), dims)
    try:
        r = run_bench(tr, steps=steps, warmup=warmup, pairs=pairs)
    finally:
        if tr.sinks is not None:
            tr.sinks.close()
        tr.dist.close()
    print(format_table(r))
    for p in save(r, Path(out) if out else Path(cfg.run.dir) / "bench"):
        print(f"wrote {p}")
    return r
