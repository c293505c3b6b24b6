"""Where `scaletrain prepare`'s memory goes, stage by stage (issue #16, bounded memory).

    python bench/prepare_stages.py [--mb 8 64 256] [--repo CHECKOUT ...]
                                   [--dir /tmp/prepare-stages] [--keep]

For each corpus size (JSONL built as bench/prepare.py builds it, same tokenizer given
as data.tokenizer, 2 workers, default settings) runs `scaletrain prepare` and samples,
every 0.1 s, the PSS of the CLI process and of its descendants (datatrove's workers)
and which stage the run is in, told from the files it has written so far:

    start     before the work directory exists (listing, fingerprint, imports)
    read      read + clean + filters (logs-read/ there, no logs-split/)
    split     exact dedup + split (logs-split/, no parts.json yet)
    tokenizer training / loading the tokenizer (parts.json, no logs-tokenize/)
    tokenize  the tokenize tasks (logs-tokenize/, no train.bin in the output yet)
    merge     joining the token parts into <split>.bin (train.bin there, work dir too)
    report    manifest, report.png, publishing (work directory removed)

Prints the peak per stage (total, the CLI process, its children) for every size and
checkout (`--repo`, default this one; give another to compare code before a change)
and writes `<dir>/stages.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import REPO, text_files, train_tokenizer, write_corpus  # noqa: E402  (bench/prepare.py)

STAGES = ("start", "read", "split", "tokenizer", "tokenize", "merge", "report")


def pss(pid: int) -> int:
    """PSS of one process in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:")) << 10
    except (OSError, StopIteration, ValueError):
        return 0


def descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
        out += kids
        stack += kids
    return out


def stage(prepared: Path) -> str:
    """The stage of the run writing into `prepared`, from its files (see the docstring)."""
    works = list(prepared.glob(".work-*"))
    tmps = list(prepared.glob(".tmp-*"))
    if not works:
        return "report" if tmps or any(prepared.glob("*/manifest.json")) else "start"
    w = works[0]
    if (w / "logs-tokenize").is_dir():
        return "merge" if tmps and (tmps[0] / "train.bin").exists() else "tokenize"
    if (w / "parts.json").exists():
        return "tokenizer"
    if (w / "logs-split").is_dir():
        return "split"
    return "read" if (w / "logs-read").is_dir() else "start"


def profile(src: Path, prepared: Path, tok: Path, extra: list[str],
            repo: Path = REPO) -> dict:
    cmd = [sys.executable, "-m", "scaletrain", "prepare", f"--data.source={src}",
           f"--data.prepared_dir={prepared}", f"--data.tokenizer={tok}",
           "--data.prep_workers=2", *extra]
    # A killed earlier profile leaves its work directory, which prepare would resume.
    shutil.rmtree(prepared, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    peaks = {s: {"total": 0, "main": 0, "children": 0, "seconds": 0.0} for s in STAGES}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    last = time.perf_counter()
    while proc.poll() is None:
        s = stage(prepared)
        main, kids = pss(proc.pid), sum(pss(p) for p in descendants(proc.pid))
        now = time.perf_counter()
        p = peaks[s]
        p["seconds"] += now - last
        last = now
        p["total"] = max(p["total"], main + kids)
        p["main"] = max(p["main"], main)
        p["children"] = max(p["children"], kids)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"prepare failed ({proc.returncode}): {err[-2000:]}")
    shutil.rmtree(prepared)
    mib = {s: {k: (v / 2**20 if k != "seconds" else round(v, 1)) for k, v in p.items()}
           for s, p in peaks.items()}
    return {"wall_s": wall, "peak_mb": max(p["total"] for p in mib.values()), "stages": mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--repo", type=Path, nargs="+", default=[REPO])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/prepare-stages"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    files = text_files()
    res = {}
    tok = a.dir / "tokenizer.json"
    for mb in a.mb:
        corpus = a.dir / f"c{mb}.jsonl"
        if not corpus.exists():
            write_corpus(corpus, mb, files)
        if not tok.exists():
            train_tokenizer(corpus, tok)
        for repo in a.repo:  # interleaved per size: the machine's load hits both alike
            r = profile(corpus, a.dir / "p", tok, [], repo)
            res[f"{mb} {repo}"] = r
            print(f"{mb} MB, {repo}: {r['wall_s']:.0f} s, peak {r['peak_mb']:.0f} MiB",
                  flush=True)
            for s, p in r["stages"].items():
                if p["seconds"]:
                    print(f"  {s:<10} {p['seconds']:>7.1f} s  total {p['total']:>6.0f}  "
                          f"main {p['main']:>6.0f}  children {p['children']:>6.0f} MiB",
                          flush=True)
        if not a.keep:
            corpus.unlink()
    (a.dir / "stages.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
