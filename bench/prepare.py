"""`scaletrain prepare` at scale (issue #16, "Bounded memory, restart, speed"): peak
memory on a large vs a small JSONL corpus, and throughput against plain `tokenizers`.

    python bench/prepare.py [--small-mb 256] [--large-mb 2048] [--extras-mb 32]
                            [--pairs 10] [--before /path/to/other/checkout]
                            [--dir /tmp/prepare-bench] [--keep]

Builds JSONL corpora from the text this machine has (the standard library's and the
installed packages' .py / .txt / .rst / .md files), each record a file's text under a
line naming its copy number, so that every record is distinct for exact dedup. Then,
in one run:

* peak memory of `scaletrain prepare` (the PSS of the whole process tree: the CLI and
  datatrove's worker processes, summed, sampled every 0.1 s; called RSS below) on the small and the large corpus,
  same settings; target large <= 1.2 x small;
* throughput of that prepare on the small corpus (MB/s of JSONL and tokens/s, 2
  processes, exact dedup, no filters) against a plain `tokenizers` `encode_batch` over
  the same texts in 2 processes (each reads and JSON-decodes its half of the lines),
  interleaved in `--pairs` rounds of plain, prepare[, prepare of `--before`], plain
  again: the median of the per-round ratios, and the plain/plain ratio of the same
  rounds as the A/A control (how far noise alone moves a ratio here); target >= 0.7x;
  and the peak RSS of prepare over that of the plain encode (target <= 1.2x);
* the cost of the quality filters (all four) and of MinHash, each on top of the
  default pipeline, on a smaller corpus (spaCy word splitting is slow).

Both sides use one tokenizer (a BPE trained here once, given as data.tokenizer), so the
comparison is the pipeline against the encoder it wraps; BPE training on the
`data.tokenizer_sample_bytes` sample is a separate, bounded cost. Writes
`<dir>/results.json`; the corpora are deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import tokenizers
from pydoc_data.topics import topics

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".txt", ".rst", ".md")
CHUNK = 256  # documents per encode_batch, as data/dt_steps.py's CHUNK_DOCS


def text_files(suffixes=SUFFIXES) -> list[Path]:
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    files = sorted(p for r in roots for p in r.rglob("*") if p.suffix in suffixes
                   and p.is_file() and 200 < p.stat().st_size < 1 << 20)
    # Shuffled (seeded): the small corpus is then a sample of the same mix of document
    # sizes as the large one, not the first files in path order.
    random.Random(0).shuffle(files)
    return files


def prose_texts() -> list[str]:
    """The reference documentation's running text in documents of 60-255 words, lines
    of 15 words ending with a full stop: prose the quality filters mostly keep (code
    fails Gopher's checks at once, which would make the filters look cheap)."""
    words = [w for w in " ".join(topics[k] for k in sorted(topics)).split()
             if re.fullmatch(r"[A-Za-z][a-z]*[.,]?", w)]
    docs, i = [], 0
    while i < len(words):
        n = 60 + (len(docs) * 37) % 196
        ws = words[i:i + n]
        docs.append("\n".join(" ".join(ws[j:j + 15]).rstrip(".,") + "."
                              for j in range(0, len(ws), 15)) + "\n")
        i += n
    return docs


def write_corpus(path: Path, megabytes: int, files: list[Path],
                 texts: list[str] | None = None) -> int:
    """JSONL of about `megabytes` MB of `texts` (default: the files' texts); returns
    its size in bytes."""
    texts = [] if texts is None else texts
    for p in files if not texts else ():
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    target, size, copy = megabytes << 20, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            for i, t in enumerate(texts):
                line = json.dumps({"text": f"# copy {copy} of document {i}\n{t}"}) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                if size >= target:
                    break
            copy += 1
    return size


def tree_rss(pid: int) -> int:
    """Memory in bytes of `pid` and all its descendants: the sum of their PSS
    (proportional set size: a page shared by n processes counts 1/n in each), so that
    the pages a forked worker shares with its parent are not counted twice, as a sum of
    RSS would (both sides fork: the plain encode's Pool, prepare's local executor)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:")) << 10
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError, StopIteration):
            continue
    return total


class PeakRSS:
    """Samples the RSS of this process's tree every 0.1 s while in the `with` block
    (the plain encode runs in this process and its Pool's workers)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self._stop.wait(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_prepare(src: Path, prepared: Path, tok: Path, extra: list[str],
                repo: Path = REPO) -> dict:
    """`scaletrain prepare` (of the checkout `repo`) in a fresh prepared_dir: wall
    seconds, peak tree RSS, tokens."""
    cmd = [sys.executable, "-m", "scaletrain", "prepare", f"--data.source={src}",
           f"--data.prepared_dir={prepared}", f"--data.tokenizer={tok}",
           "--data.prep_workers=2", *extra]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"prepare failed ({proc.returncode}): {err[-2000:]}")
    (d,) = [p for p in prepared.iterdir() if not p.name.startswith(".")]
    m = json.loads((d / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in m["splits"].values())
    shutil.rmtree(prepared)
    r = {"wall_s": wall, "peak_rss_mb": peak / 2**20, "tokens": tokens,
         "stages": m["stages"]}
    print(f"prepare {src.name} {' '.join(extra)} ({repo}): {r}", flush=True)
    return r


def _encode_share(job: tuple[str, str, int, int]) -> int:
    path, tok_json, rank, world = job
    tok = tokenizers.Tokenizer.from_str(tok_json)
    n, chunk = 0, []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % world != rank:
                continue
            chunk.append(json.loads(line)["text"])
            if len(chunk) >= CHUNK:
                n += sum(len(e.ids) for e in tok.encode_batch(chunk))
                chunk = []
    if chunk:
        n += sum(len(e.ids) for e in tok.encode_batch(chunk))
    return n


def plain_encode(src: Path, tok: Path, procs: int = 2) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread a process, as prepare's
    tok_json = tok.read_text()
    t0 = time.perf_counter()
    with PeakRSS() as rss, Pool(procs) as pool:
        tokens = sum(pool.map(_encode_share, [(str(src), tok_json, r, procs)
                                              for r in range(procs)]))
    r = {"wall_s": time.perf_counter() - t0, "tokens": tokens,
         "peak_rss_mb": rss.peak / 2**20}
    print(f"plain encode_batch {src.name}: {r}", flush=True)
    return r


def train_tokenizer(src: Path, out: Path) -> None:
    """A 4096-token byte-level BPE on the first 16 MB of the corpus, via the project's
    trainer so it is the tokenizer `prepare` would make."""
    sys.path.insert(0, str(REPO))
    from scaletrain.data.tokenizer import train_bpe

    def texts():
        seen = 0
        with open(src, encoding="utf-8") as f:
            for line in f:
                t = json.loads(line)["text"]
                seen += len(t)
                if seen > 16 << 20:
                    return
                yield t

    train_bpe(texts(), 4096, progress=False).save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small-mb", type=int, default=256)
    ap.add_argument("--large-mb", type=int, default=2048)
    ap.add_argument("--extras-mb", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=10,
                    help="interleaved rounds of the throughput comparison")
    ap.add_argument("--before", type=Path, default=None,
                    help="another checkout whose prepare runs in the same rounds")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/prepare-bench"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    files = text_files()
    res: dict = {"files_of_text": len(files)}
    corpora = {}
    for name, mb in (("small", a.small_mb), ("large", a.large_mb)):
        corpora[name] = a.dir / f"{name}.jsonl"
        res[f"{name}_bytes"] = write_corpus(corpora[name], mb, files)
    if a.extras_mb:  # 0: skip the filters' and MinHash's runs
        corpora["extras"] = a.dir / "extras.jsonl"
        res["extras_bytes"] = write_corpus(corpora["extras"], a.extras_mb, files,
                                           texts=prose_texts())
    tok = a.dir / "tokenizer.json"
    train_tokenizer(corpora["small"], tok)

    rounds = throughput_rounds(corpora["small"], a.dir, tok, a.pairs, a.before)
    small, plain = _median_run(rounds, "prepare"), _median_run(rounds, "plain")
    large = run_prepare(corpora["large"], a.dir / "p", tok, [])
    mb_small = res["small_bytes"] / 2**20
    res.update(small=small, large=large, plain_encode=plain, rounds=rounds)
    res["rss_ratio_large_over_small"] = large["peak_rss_mb"] / small["peak_rss_mb"]
    res["rss_ratio_prepare_over_plain"] = small["peak_rss_mb"] / plain["peak_rss_mb"]
    res["prepare_mb_s"] = mb_small / small["wall_s"]
    res["prepare_tokens_s"] = small["tokens"] / small["wall_s"]
    res["plain_mb_s"] = mb_small / plain["wall_s"]
    res["plain_tokens_s"] = plain["tokens"] / plain["wall_s"]
    res["throughput_ratio"] = _median_ratio(rounds, "plain", "prepare")
    res["aa_ratio"] = _median_ratio(rounds, "plain", "plain_again")
    if a.before:
        res["before_throughput_ratio"] = _median_ratio(rounds, "plain", "before")

    (a.dir / "results.json").write_text(json.dumps(res, indent=2))
    report(res, mb_small)
    if a.extras_mb:
        extras(res, corpora["extras"], a.dir, tok)
    if not a.keep:
        for p in corpora.values():
            p.unlink()


def throughput_rounds(src: Path, folder: Path, tok: Path, pairs: int,
                      before: Path | None) -> list[dict]:
    """`pairs` rounds of: plain encode, prepare, prepare of `before` (when given), plain
    encode again. Interleaved so that the load of this shared machine, which drifts
    over minutes, weighs on every side of a round alike."""
    rounds = []
    for i in range(pairs):
        r = {"plain": plain_encode(src, tok),
             "prepare": run_prepare(src, folder / "p", tok, [])}
        if before is not None:
            r["before"] = run_prepare(src, folder / "p", tok, [], repo=before)
        r["plain_again"] = plain_encode(src, tok)
        print(f"round {i + 1}/{pairs}: plain/prepare "
              f"{r['plain']['wall_s'] / r['prepare']['wall_s']:.2f}x"
              + (f", plain/before {r['plain']['wall_s'] / r['before']['wall_s']:.2f}x"
                 if before is not None else "")
              + f", A/A plain/plain {r['plain']['wall_s'] / r['plain_again']['wall_s']:.2f}x",
              flush=True)
        rounds.append(r)
    return rounds


def _median_ratio(rounds: list[dict], a: str, b: str) -> float:
    """Median over the rounds of wall(a) / wall(b): the throughput of b over a's."""
    return statistics.median(r[a]["wall_s"] / r[b]["wall_s"] for r in rounds)


def _median_run(rounds: list[dict], key: str) -> dict:
    """The run of `key` with the median wall time; its peak RSS is the rounds' max."""
    runs = sorted((r[key] for r in rounds), key=lambda x: x["wall_s"])
    return runs[len(runs) // 2] | {"peak_rss_mb": max(x["peak_rss_mb"] for x in runs)}


def extras(res: dict, corpus: Path, folder: Path, tok: Path) -> None:
    mb_x = res["extras_bytes"] / 2**20
    base = run_prepare(corpus, folder / "p", tok, [])
    filt = run_prepare(corpus, folder / "p", tok, [
        "--data.filters=gopher_repetition,gopher_quality,c4,fineweb_quality"])
    mh = run_prepare(corpus, folder / "p", tok, ["--data.dedup=minhash"])
    res["extras"] = {k: {"wall_s": v["wall_s"], "mb_s": mb_x / v["wall_s"],
                         "stages": v["stages"]}
                     for k, v in (("default", base), ("filters", filt), ("minhash", mh))}
    (folder / "results.json").write_text(json.dumps(res, indent=2))
    for k, v in res["extras"].items():
        print(f"{mb_x:.0f} MB prose corpus, {k}: {v['wall_s']:.1f} s, {v['mb_s']:.2f} MB/s")


def report(res: dict, mb_small: float) -> None:
    small, large = res["small"], res["large"]
    print(f"peak RSS: {small['peak_rss_mb']:.0f} MiB ({mb_small:.0f} MB corpus) vs "
          f"{large['peak_rss_mb']:.0f} MiB ({res['large_bytes'] / 2**20:.0f} MB): "
          f"{res['rss_ratio_large_over_small']:.2f}x (target <= 1.2x)")
    print(f"peak RSS: prepare {small['peak_rss_mb']:.0f} MiB vs plain encode_batch "
          f"{res['plain_encode']['peak_rss_mb']:.0f} MiB on the {mb_small:.0f} MB corpus: "
          f"{res['rss_ratio_prepare_over_plain']:.2f}x (target <= 1.2x)")
    n = len(res["rounds"])
    print(f"throughput: prepare {res['prepare_mb_s']:.2f} MB/s "
          f"{res['prepare_tokens_s']:.0f} tok/s vs plain encode_batch "
          f"{res['plain_mb_s']:.2f} MB/s {res['plain_tokens_s']:.0f} tok/s (median runs): "
          f"median of {n} per-round ratios {res['throughput_ratio']:.2f}x (target >= 0.7x); "
          f"A/A plain/plain {res['aa_ratio']:.2f}x", flush=True)
    if "before_throughput_ratio" in res:
        print(f"  --before's prepare in the same rounds: "
              f"{res['before_throughput_ratio']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
