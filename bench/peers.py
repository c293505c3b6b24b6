"""scaletrain side by side with its peers: the same GPT, data, optimizer and precision
trained by scaletrain, a hand-written loop, Lightning (Trainer and Fabric) and Hugging
Face Accelerate (bench/peer_loops.py says what each loop is and what they share).

Each framework trains in its own worker process (separate imports, compile caches and
thread pools), built and warmed up once (`--warmup` steps absorb compilation and
allocator warm-up), then paused. The timed part runs in rounds: in each round every
worker in turn runs one segment of `--steps` optimizer steps while the others sleep on a
pipe, so they never share the cores; the order rotates from round to round so that no
framework always goes first. A second scaletrain worker is the A/A control (DESIGN.md
§4). We report the median tokens/s of each framework and the median over rounds of
scaletrain's tokens/s divided by the peer's in the same round (> 1: scaletrain faster).

Modes: `fp32` (eager, fp32) and `best` (bf16 autocast + torch.compile, each framework's
own way of asking for both; scaletrain's is `train.compile_scope = "model"`, the whole
forward and loss as one graph, which one process allows). The peers live only in the bench environment:

    make bench-env     # .venv-bench: the project + bench/requirements-peers.txt
    flock /tmp/scaletrain-bench.lock .venv-bench/bin/python bench/peers.py --mode fp32
    flock /tmp/scaletrain-bench.lock .venv-bench/bin/python bench/peers.py --mode best

The optimizer is the same AdamW (same parameter groups and hyper-parameters) for all.
Its kernel is each one's default: scaletrain's `optim.implementation = "auto"` runs
torch's fused AdamW; the peers get the `foreach` kernel (faster than the per-parameter
loop that a bare `torch.optim.AdamW(...)` runs on CPU). `--peer-optim fused` gives the
peers the fused kernel too, which isolates what the rest of the loop costs.
scaletrain runs with its defaults (`train.malloc_mmap_threshold_mib = 256`: large
tensors reuse heap pages instead of page-faulting every step, plan/malloc.py; the peers
run glibc's allocator as it comes); `--scaletrain-malloc-mib 0` runs it with glibc's
defaults, `--scaletrain-malloc-mib 256` says the default explicitly (results stored
apart, "+mallocN").
`--scaletrain-set KEY=VALUE` (repeatable) is any other scaletrain-only setting, e.g.
`model.loss_chunks=8` (the head + loss chunk by chunk; models/chunked_loss.py).

Results accumulate per mode (and peer kernel) in bench/results/peers.json;
bench/results/peers.md is the table of every mode measured so far. `--loops llama_loops
--config configs/llama-10m.toml` runs the llama family against transformers'
LlamaForCausalLM (bench/llama_loops.py), into bench/results/llama_loops.json / .md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scaletrain.errors import ConfigError  # noqa: E402 (after the path set-up above)

MODES = {  # mode -> config overrides
    "fp32": [("precision.dtype", "fp32"), ("train.compile", "false")],
    "best": [("precision.dtype", "bf16"), ("train.compile", "true")],
}
A_A = "scaletrain (A/A)"  # the control: a second, independent scaletrain worker


class Stop(Exception):
    """The orchestrator ended the bench early (another worker failed)."""


class Gate:
    """Called after every optimizer step of a loop: times segments, pauses between them.

    Steps 1..warmup run freely; then each segment of `steps` steps starts when the
    orchestrator says "go" and ends with the segment's seconds sent back. The loop waits
    on the pipe (not spinning) while other workers run. After the last segment the gate
    waits for "stop", so that no worker's wrap-up overlaps another's timed segment.
    """

    def __init__(self, conn, warmup: int, steps: int, rounds: int):
        self.conn, self.warmup, self.steps = conn, warmup, steps
        self.total_steps = warmup + steps * rounds
        self.n, self.t0 = 0, 0.0

    def _wait(self) -> None:
        if self.conn.recv() == "stop":
            if self.n < self.total_steps:
                raise Stop
            return
        self.t0 = time.perf_counter()

    def __call__(self, loss) -> None:
        self.n += 1
        if self.n == self.warmup:
            self.conn.send(("ready", _loss(loss)))
            self._wait()
        elif self.n > self.warmup and (self.n - self.warmup) % self.steps == 0:
            dt = time.perf_counter() - self.t0
            self.conn.send(("segment", dt, _loss(loss)))
            self._wait()


def _loss(loss) -> float | None:
    return None if loss is None else float(loss.detach())


def build_cfg(args, name: str):
    from scaletrain.config import build_config

    micro = str(args.micro_batch)
    over = [("run.dir", f"/tmp/scaletrain-bench-peers/{slug(name)}"),
            ("run.overwrite", "true"), ("train.progress", "off"),
            ("train.steps", str(args.warmup + args.steps * args.rounds)),
            # One micro-batch per optimizer step: every framework does the same work.
            ("train.batch_size", micro), ("train.micro_batch_size", micro),
            ("model.seq_len", str(args.seq_len)),
            ("schedule.name", "constant"), ("schedule.warmup_steps", "0"),
            # Evaluation only at the end, after the timed part, and short.
            ("eval.interval", "0"), ("eval.batches", "1"), ("eval.batch_size", micro),
            ("eval.test", "false"), *MODES[args.mode]]
    if name not in ("scaletrain", A_A):  # scaletrain keeps its default kernel ("auto")
        over.append(("optim.implementation", args.peer_optim))
    else:
        if args.scaletrain_malloc_mib is not None:  # None: scaletrain's default
            over.append(("train.malloc_mmap_threshold_mib", str(args.scaletrain_malloc_mib)))
        over += [tuple(kv.split("=", 1)) for kv in args.scaletrain_set]
        if args.mode == "best":  # one process: the whole forward + loss as one graph
            over.append(("train.compile_scope", "model"))
    return build_config(args.config, over)


def worker(name: str, args, conn, log: str) -> None:
    """Entry point of one framework's process: run its loop under the gate."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2)  # framework banners and warnings go to the log
    try:
        import importlib

        import torch

        LOOPS = importlib.import_module(args.loops).LOOPS
        cfg = build_cfg(args, name)
        gate = Gate(conn, args.warmup, args.steps, args.rounds)
        conn.send(("threads", torch.get_num_threads()))
        LOOPS["scaletrain" if name == A_A else name](cfg, gate)
        conn.send(("threads", torch.get_num_threads()))  # a framework may change it
        conn.send(("done",))
    except Stop:
        conn.send(("done",))
    except BaseException:
        traceback.print_exc()
        conn.send(("error", traceback.format_exc()))


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


class Worker:
    def __init__(self, name: str, args, ctx, log_dir: Path):
        self.name, self.log = name, log_dir / f"{slug(name)}.log"
        self.conn, self._child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(name, args, self._child,
                                                     str(self.log)), daemon=False)
        self.seconds: list[float] = []
        self.threads: set[int] = set()
        self.losses: list[float | None] = []

    def start(self) -> None:
        self.proc.start()
        self._child.close()  # ours; a dead worker now reads as EOF, not a silent hang

    def expect(self, kind: str):
        while True:
            try:
                msg = self.conn.recv()
            except EOFError:
                raise RuntimeError(f"{self.name} died (exit code {self.proc.exitcode}); "
                                   f"log {self.log}") from None
            if msg[0] == "threads":
                self.threads.add(msg[1])
            elif msg[0] == "error":
                raise RuntimeError(f"{self.name} failed (log {self.log}):\n{msg[1]}")
            elif msg[0] == kind:
                return msg
            else:
                raise RuntimeError(f"{self.name}: expected {kind}, got {msg}")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def run(args) -> dict:
    import importlib
    import importlib.util

    loops = importlib.import_module(args.loops)
    LOOPS, NEEDS, versions = loops.LOOPS, loops.NEEDS, loops.versions
    names = [n for n in LOOPS if n not in NEEDS or importlib.util.find_spec(NEEDS[n])]
    missing = [n for n in LOOPS if n not in names]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    names.insert(1, A_A)
    ctx = mp.get_context("spawn")
    log_dir = Path("/tmp/scaletrain-bench-peers/logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    workers = [Worker(n, args, ctx, log_dir) for n in names]
    finished = False
    try:
        for w in workers:  # one at a time: compile caches fill for the next ones
            t = time.perf_counter()
            w.start()
            w.warm_loss = w.expect("ready")[1]
            print(f"  {w.name}: built and warmed up in {time.perf_counter() - t:.1f} s",
                  flush=True)
        for r in range(args.rounds):
            k = r % len(workers)
            for w in workers[k:] + workers[:k]:
                w.conn.send("go")
                _, dt, loss = w.expect("segment")
                w.seconds.append(dt)
                w.losses.append(loss)
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{w.name} {w.seconds[-1] / args.steps * 1e3:.0f} ms" for w in workers),
                flush=True)
        for w in workers:
            w.conn.send("stop")
        for w in workers:
            w.expect("done")
        finished = True
    finally:
        for w in workers:
            if w.proc.pid is None:
                continue  # never started (an earlier worker failed)
            w.proc.join(timeout=60 if finished else 0)  # failed: do not wait on paused ones
            if w.proc.is_alive():
                w.proc.kill()  # SIGKILL: scaletrain and Lightning trap SIGTERM
    return summarise(args, workers, missing, versions())


def summarise(args, workers, missing, vers) -> dict:
    tokens = args.steps * args.micro_batch * args.seq_len  # per segment
    ref = workers[0].seconds
    rows = []
    for w in workers:
        # scaletrain tokens/s / peer tokens/s in the same round = peer s / scaletrain s.
        ratios = [b / a for a, b in zip(ref, w.seconds)]
        rows.append({"framework": w.name, "threads": sorted(w.threads),
                     "tokens_per_s": statistics.median(tokens / s for s in w.seconds),
                     "step_ms": statistics.median(w.seconds) / args.steps * 1e3,
                     "ratio": statistics.median(ratios) if w is not workers[0] else None,
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "loss_end": w.losses[-1]})
    return {"mode": args.mode, "peer_optim": args.peer_optim,
            # the value scaletrain ran with; "explicit": set by --scaletrain-malloc-mib
            "scaletrain_malloc_mib": build_cfg(args, "scaletrain").train
            .malloc_mmap_threshold_mib,
            "scaletrain_malloc_explicit": args.scaletrain_malloc_mib is not None,
            "scaletrain_set": args.scaletrain_set, "config": args.config,
            "micro_batch": args.micro_batch,
            "seq_len": args.seq_len, "steps": args.steps, "rounds": args.rounds,
            "warmup": args.warmup, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(), "versions": vers, "missing": missing, "rows": rows}


MODE_TEXT = {"fp32": "fp32 eager", "best": "bf16 autocast + compile"}


def _key(args) -> str:
    key = args.mode if args.peer_optim == "foreach" else f"{args.mode}+peers-{args.peer_optim}"
    mib = args.scaletrain_malloc_mib
    key += "" if mib is None else f"+malloc{mib}"
    return key + "".join(f"+{kv}" for kv in args.scaletrain_set)


def _mode_text(res: dict) -> str:
    peer, mib = res.get("peer_optim", "foreach"), res.get("scaletrain_malloc_mib", 0)
    return (MODE_TEXT[res["mode"]] + ("" if peer == "foreach" else f", peers {peer} AdamW")
            # results stored before the explicit flag: a non-zero value was explicit
            + (f", scaletrain malloc {mib} MiB" if res.get("scaletrain_malloc_explicit",
                                                          mib != 0) else "")
            + "".join(f", scaletrain {kv}" for kv in res.get("scaletrain_set", [])))


def table(results: dict) -> str:
    lines = ["| mode | framework | tokens/s (median) | step ms | scaletrain ÷ peer "
             "(median of rounds) | range over rounds | last loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key in sorted(results, key=lambda k: (k.split("+")[0] != "fp32", k)):
        res = results[key]
        mode = _mode_text(res)
        for row in res["rows"]:
            ratio = "1 (reference)" if row["ratio"] is None else f"{row['ratio']:.3f}"
            rng = "" if row["ratio"] is None else \
                f"{row['ratio_min']:.3f}–{row['ratio_max']:.3f}"
            loss = "–" if row["loss_end"] is None else f"{row['loss_end']:.3f}"
            lines.append(f"| {mode} | {row['framework']} | "
                         f"{row['tokens_per_s']:.0f} | {row['step_ms']:.0f} | {ratio} | {rng} "
                         f"| {loss} |")
    notes = []
    for res in results.values():
        v = res["versions"]
        notes.append(
            f"- {_mode_text(res)}: {res['config']}, micro-batch {res['micro_batch']} x seq "
            f"{res['seq_len']}, {res['rounds']} rounds x {res['steps']} steps after "
            f"{res['warmup']} warm-up steps; {res['date']}; {res['machine']}; threads "
            f"{sorted({t for r in res['rows'] for t in r['threads']})}; torch {v['torch']}, "
            f"lightning {v['lightning']}, accelerate {v['accelerate']}"
            + (f"; not installed: {', '.join(res['missing'])}" if res["missing"] else ""))
    return "\n".join(lines + [""] + notes) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("fp32", "best"), required=True)
    ap.add_argument("--config", default="configs/gpt-10m.toml")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=0, help="steps per timed segment "
                    "(default: 2 in fp32, 4 in best: ~2 s)")
    ap.add_argument("--rounds", type=int, default=0, help="default: 15 in fp32, 12 in best")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated subset of frameworks")
    ap.add_argument("--loops", default="peer_loops", help="the module of loops: "
                    "peer_loops (the GPT's peers) or llama_loops (transformers' "
                    "LlamaForCausalLM by the HF Trainer / Accelerate, with "
                    "--config configs/llama-10m.toml)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--peer-optim", choices=("foreach", "fused"), default="foreach",
                    help="the peers' AdamW kernel (scaletrain keeps its default, fused)")
    ap.add_argument("--scaletrain-malloc-mib", type=int, default=None,
                    help="scaletrain's train.malloc_mmap_threshold_mib (default: "
                    "scaletrain's default; 0: glibc's defaults, as the peers run)")
    ap.add_argument("--scaletrain-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the scaletrain workers only (repeatable), "
                    "e.g. model.loss_chunks=8: a scaletrain setting the peers have no "
                    "counterpart of")
    args = ap.parse_args()
    bad = [kv for kv in args.scaletrain_set if "=" not in kv or kv.startswith("=")]
    if bad:  # before any worker starts
        ap.error(f"--scaletrain-set {bad[0]!r}: expected KEY=VALUE")
    args.steps = args.steps or {"fp32": 2, "best": 4}[args.mode]
    args.rounds = args.rounds or {"fp32": 15, "best": 12}[args.mode]
    os.chdir(ROOT)  # config paths and data/prepared are relative to the repo
    try:  # a bad --config / --scaletrain-set ends here, not in a worker
        build_cfg(args, "scaletrain")
    except ConfigError as e:
        ap.error(str(e))
    # SIGTERM (timeout, kill): unwind through run()'s `finally`, which ends the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"peers, mode {args.mode}: {args.config}, micro-batch {args.micro_batch} x seq "
          f"{args.seq_len}", flush=True)
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "peers" if args.loops == "peer_loops" else args.loops  # llama_loops.json / .md
    store = out / f"{stem}.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    results[_key(args)] = res
    store.write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    (out / f"{stem}.md").write_text(f"# scaletrain and its peers (bench/peers.py --loops "
                                    f"{args.loops})\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
