"""Text preparation as datatrove pipelines (steps in `dt_steps.py`, quality filters in
`filters.py`), run by the executor of `data.executor` (local, Ray or Slurm:
`executors.py`), with the checks that make bad input one line (exit 2) and the counts
that go into manifest.json.

Jobs, each `data.prep_workers` processes at most: read + clean + `data.filters` (one
task per worker, files dealt round-robin), dedup + split (one task: "first copy kept"
needs the global order; with `data.dedup = "minhash"` preceded by exact dedup in that
order and datatrove's four MinHash jobs), tokenize (one task per split part). Between
them the tokenizer is trained, in this process, on a bounded sample of the train split.
Work files live in the work directory the caller names (`prepare.py`: one per cache
key), where datatrove also marks each finished task: run again after a crash, every job
skips the tasks already done, and the counts are read back from the per-task stats
files, so the resumed tasks count too. The work directory is removed once the token
files (the flat layout of `shards.py` that the loaders memory-map) are written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets,
                                               MinhashDedupCluster, MinhashDedupFilter,
                                               MinhashDedupSignature)
from datatrove.utils.hashing import HashConfig

from scaletrain.config.schema import DataConfig
from scaletrain.data import shards
from scaletrain.data import tokenizer as tokenizer_mod
from scaletrain.data.clean import SPLITS, Counts, documents_needed
from scaletrain.data.dt_steps import (LENGTH_STAT, CleanedReader, CleanedWriter, Clean,
                                      DedupSplit, MergeDedup, SourceReader, TokenizePart)
from scaletrain.data.executors import check_executor, run_steps
from scaletrain.data.filters import check_filters, filter_steps
from scaletrain.data.records import check_text_column
from scaletrain.data.shards import token_dtype
from scaletrain.data.sources import TEXT, InputFiles, file_format
from scaletrain.errors import DataError

STAGES = ("records", "malformed", "skipped_binary", "skipped_undecodable", "too_short",
          "duplicates", "documents")
"""The per-stage counts of the manifest's "stages", in pipeline order."""


@dataclass
class Built:
    """What the pipeline leaves in `out` besides the token files and tokenizer.json."""

    counts: Counts
    splits: dict[str, dict]
    stages: dict[str, int]
    sources: list[dict]
    tokenizer: tokenizer_mod.Tokenizer
    lengths: dict[str, list[int]]


def _run(steps: list, tasks: int, workers: int, logs: Path,
         dcfg: DataConfig) -> dict[str, int]:
    """Run `steps` on `data.executor` (local, Ray or Slurm; `executors.py`) until every
    task is done; the summed stats of every step."""
    return run_steps(steps, tasks, workers, logs, dcfg)


def _job(steps: list, tasks: int, workers: int, logs: Path,
         dcfg: DataConfig) -> list[dict[str, int]]:
    """Run one datatrove job unless every task of it is already done, and return the
    totals of each step (in `steps`' order) over all its tasks.

    The totals come from the per-task stats files datatrove writes beside each task's
    completion mark, not from `_run`'s return, so a task finished by an earlier,
    killed `prepare` still counts; datatrove skips such tasks (that is the restart)."""
    done = len(list((logs / "completions").glob("*"))) if (logs / "completions").is_dir() \
        else 0
    if done:
        print(f"prepare: resuming {logs.name.removeprefix('logs-')}: {min(done, tasks)} of "
              f"{tasks} tasks done before", file=sys.stderr)
    if done < tasks:
        _run(steps, tasks=tasks, workers=workers, logs=logs, dcfg=dcfg)
    totals: list[dict[str, int]] = [defaultdict(int) for _ in steps]
    for path in sorted((logs / "stats").glob("*.json")):
        with open(path, encoding="utf-8") as f:
            per_task = json.load(f)  # [{"name", "stats": {key: {"total", ...} or 0}}]
        for i, step in enumerate(per_task):
            for key, metric in step["stats"].items():
                totals[i][key] += int(metric["total"] if isinstance(metric, dict)
                                      else metric)
    return totals


def _merged(totals: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for step in totals:
        for k, v in step.items():
            out[k] += v
    return out


def build_text(out: Path, inputs: list[InputFiles], dcfg: DataConfig,
               progress: bool, work: Path | None = None) -> Built:
    """Run the pipeline over the sources `inputs` into `out` (train/val/test.bin and
    tokenizer.json). Raises DataError (one line, naming the source) on unusable input.

    `work` holds datatrove's work files and task completions: a `prepare` started again
    after a crash, with the same `work`, resumes from the tasks already done there."""
    files = [(str(p), file_format(p), i) for i, inp in enumerate(inputs) for p in inp.files]
    check_text_column([(Path(p), fmt) for p, fmt, _ in files], dcfg.text_key)
    specs = check_filters(dcfg.filters, dcfg.filter_args)
    check_executor(dcfg)  # Ray reachable / Slurm there, before any task starts
    work = out / ".work" if work is None else work
    workers = dcfg.prep_workers
    filters = filter_steps(specs)
    read_steps = _job([SourceReader(files, dcfg.text_key), Clean(dcfg.min_chars), *filters,
                       CleanedWriter(str(work))],
                      tasks=min(workers, len(files)), workers=workers,
                      logs=work / "logs-read", dcfg=dcfg)
    read = _merged(read_steps)
    _check_read(inputs, files, read, dcfg.text_key)
    dropped = {f"dropped_{name}": read_steps[2 + i].get("dropped", 0)
               for i, (name, _) in enumerate(specs)}
    folder, dup_stages = "clean", {}
    if dcfg.dedup == "minhash":
        folder, dup_stages = "deduped", _minhash(work, dcfg, workers)
    dedup = _merged(_job([DedupSplit(str(work), dcfg.val_fraction, dcfg.test_fraction,
                                     split_part_chars(work / folder, workers), folder)],
                         tasks=1, workers=1, logs=work / "logs-split", dcfg=dcfg))
    parts = json.loads((work / "parts.json").read_text())
    duplicates = dup_stages.pop("duplicates", 0) + dedup["duplicates"]
    counts = Counts(files=len(files), skipped_binary=read["skipped_binary"],
                    skipped_undecodable=read["skipped_undecodable"],
                    too_short=read["too_short"], duplicates=duplicates,
                    documents=sum(p["documents"] for p in parts))
    _check_documents(dcfg, counts, inputs, sum(dropped.values()))

    tok = _tokenizer_once(dcfg, work, parts, progress)
    tok.save(out / "tokenizer.json")
    tokens = _merged(_job([TokenizePart(str(work), [p["name"] for p in parts], tok.to_str(),
                                        token_dtype(tok.vocab_size).str,
                                        one_thread=workers > 1)],
                          tasks=max(1, len(parts)), workers=workers,
                          logs=work / "logs-tokenize", dcfg=dcfg)) if parts else {}
    splits = {s: _concat(work, out, s, [p for p in parts if p["split"] == s], tokens)
              for s in SPLITS}
    shutil.rmtree(work)
    stages = {k: read.get(k, 0) for k in STAGES[:5]} | dropped | {
        "duplicates": counts.duplicates} | dup_stages | {"documents": counts.documents}
    sources = [{"source": inp.source, "files": len(inp.files),
                "records": read.get(f"records/src{i}", 0),
                "malformed": read.get(f"malformed/src{i}", 0),
                "tokens": {s: tokens.get(f"tokens/{s}/src{i}", 0) for s in SPLITS}}
               for i, inp in enumerate(inputs)]
    return Built(counts, splits, stages, sources, tok, _length_histogram(tokens))


MIN_PART_CHARS = 1 << 20
"""Split parts are not made smaller than this to spread a corpus over the workers: a
tokenize task has a fixed cost (loading the tokenizer, its task files), ~0.1 s."""


def split_part_chars(cleaned: Path, workers: int) -> int:
    """Characters per split part (one tokenize task each): `shards.CHUNK_CHARS`, or less
    when the cleaned documents in `cleaned` (their JSONL bytes, about their characters)
    would then give fewer than two parts per worker. A corpus under 16 MB was one train
    part, tokenized by one worker while the others had the small val / test parts; two
    per worker let the task queue even out parts of unequal size. The token files do not
    depend on this: parts are tokenized document by document and joined in order."""
    chunk = shards.CHUNK_CHARS  # read when called: tests make parts small
    if workers <= 1:
        return chunk
    total = sum(p.stat().st_size for p in cleaned.glob("*.jsonl"))
    return min(chunk, max(MIN_PART_CHARS, -(-total // (2 * workers))))


def _minhash(work: Path, dcfg: DataConfig, workers: int) -> dict[str, int]:
    """`data.dedup = "minhash"`: exact dedup in the sources' order (`MergeDedup`), then
    datatrove's four MinHash stages (signatures, buckets, clusters, filter), which leave
    the kept documents in `<work>/deduped`. Returns the exact and near duplicates."""
    exact = _merged(_job([MergeDedup(str(work))], tasks=1, workers=1,
                         logs=work / "logs-merge", dcfg=dcfg))
    names = json.loads((work / "merged.json").read_text())
    mh = work / "minhash"
    # sha1, not datatrove's default xxhash: datatrove 0.10 hashes str shingles, which
    # xxhash >= 4 refuses (it wants bytes), and xxhash 4 is what datasets / wandb here
    # run with. Same 64-bit MinHash, another hash function.
    config = MinhashConfig(n_grams=dcfg.minhash_ngrams, num_buckets=dcfg.minhash_buckets,
                           hashes_per_bucket=dcfg.minhash_hashes_per_bucket,
                           hash_config=HashConfig(precision=64, hash_fc="sha1"))
    if not names:
        return {"duplicates": exact["duplicates"], "near_duplicates": 0}
    _job([CleanedReader(str(work), "merged", names),
          MinhashDedupSignature(str(mh / "signatures"), config=config)],
         tasks=len(names), workers=workers, logs=work / "logs-mh-signatures", dcfg=dcfg)
    _job([MinhashDedupBuckets(str(mh / "signatures"), str(mh / "buckets"), config=config)],
         tasks=config.num_buckets, workers=workers, logs=work / "logs-mh-buckets", dcfg=dcfg)
    _job([MinhashDedupCluster(str(mh / "buckets"), str(mh / "remove"), config=config)],
         tasks=1, workers=1, logs=work / "logs-mh-cluster", dcfg=dcfg)
    kept = _job([CleanedReader(str(work), "merged", names),
                 MinhashDedupFilter(str(mh / "remove")), CleanedWriter(str(work), "deduped")],
                tasks=len(names), workers=workers, logs=work / "logs-mh-filter", dcfg=dcfg)
    return {"duplicates": exact["duplicates"], "near_duplicates": kept[1].get("dropped", 0)}


def _length_histogram(tokens: dict[str, int]) -> dict[str, list[int]]:
    """Documents per length bin (tokens, end-of-text included), all splits together:
    bin i counts lengths in [lo[i], 2 * lo[i])."""
    bins = sorted(int(k.removeprefix(LENGTH_STAT)) for k in tokens
                  if k.startswith(LENGTH_STAT))
    if not bins:
        return {"lo": [], "documents": []}
    ks = range(bins[0], bins[-1] + 1)
    return {"lo": [2 ** k for k in ks],
            "documents": [tokens.get(f"{LENGTH_STAT}{k:02d}", 0) for k in ks]}


def _check_read(inputs: list[InputFiles], files: list, read: dict, text_key: str) -> None:
    """DataError for a source whose files are all binary / not UTF-8, or whose every
    record is malformed (no string `text_key` field)."""
    for i, inp in enumerate(inputs):
        records, bad = read.get(f"records/src{i}", 0), read.get(f"malformed/src{i}", 0)
        where = inp.files[0] if len(inp.files) == 1 else inp.source
        if records and bad == records:
            raise DataError(f"{where}: none of its {records} records has a string "
                            f"'{text_key}' field (data.text_key)")
    unreadable = read["skipped_binary"] + read["skipped_undecodable"]
    n_text = sum(fmt == TEXT for _, fmt, _ in files)
    if n_text and unreadable == n_text == len(files):
        raise DataError(f"{inputs[0].source}: {len(files)} files, all binary or not UTF-8")


def _check_documents(dcfg: DataConfig, counts: Counts, inputs: list[InputFiles],
                     filtered: int = 0) -> None:
    need = documents_needed(dcfg.val_fraction, dcfg.test_fraction)
    if counts.documents < need:
        unreadable = counts.skipped_binary + counts.skipped_undecodable
        raise DataError(
            f"{inputs[0].source}: {counts.documents} document(s) left of {counts.files} "
            f"files after filtering ({counts.too_short} shorter than data.min_chars="
            f"{dcfg.min_chars}, {filtered} dropped by data.filters, {counts.duplicates} "
            f"duplicates, {unreadable} binary or not UTF-8); need at least {need} for the "
            f"train/val/test splits")


def _train_sample(work: Path, parts: list[dict], sample_bytes: int):
    """The train split's texts in order, or a deterministic sample of about
    `sample_bytes` of them (by the digest's second 8 bytes; the first decide the split)."""
    total = sum(p["bytes"] for p in parts)
    rate = 1.0 if total <= sample_bytes else sample_bytes / total
    for p in parts:
        with open(work / "split" / f"{p['name']}.jsonl", encoding="utf-8") as f:
            for line in f:
                _src, h, text = json.loads(line)
                if rate >= 1.0 or int(h[16:32], 16) / 2.0**64 < rate:
                    yield text


def _tokenizer_once(dcfg: DataConfig, work: Path, parts: list[dict],
                    progress: bool) -> tokenizer_mod.Tokenizer:
    """`_tokenizer`, kept in the work directory: a restarted `prepare` does not train
    it again (nor could the tokenize tasks it resumes use another one)."""
    path = work / "tokenizer.json"
    if path.is_file():
        return tokenizer_mod.Tokenizer.load(str(path))
    tok = _tokenizer(dcfg, work, parts, progress)
    tmp = path.with_suffix(".tmp")
    tok.save(tmp)
    os.replace(tmp, path)  # a kill mid-write leaves no half file that looks done
    return tok


def _tokenizer(dcfg: DataConfig, work: Path, parts: list[dict],
               progress: bool) -> tokenizer_mod.Tokenizer:
    # Looked up through the module so tests can replace the trainer (cache-hit checks).
    if dcfg.tokenizer:  # fine-tuning / distillation: the source model's token ids
        return tokenizer_mod.Tokenizer.load(dcfg.tokenizer)
    train = [p for p in parts if p["split"] == "train"]
    whole = sum(p["bytes"] for p in train) <= dcfg.tokenizer_sample_bytes
    return tokenizer_mod.train_bpe(_train_sample(work, train, dcfg.tokenizer_sample_bytes),
                                   dcfg.vocab_size, progress=progress,
                                   length=sum(p["documents"] for p in train) if whole
                                   else None)


def _concat(work: Path, out: Path, split: str, parts: list[dict], tokens: dict) -> dict:
    """Join a split's token parts, in order, into `<out>/<split>.bin`; its manifest entry."""
    path = out / f"{split}.bin"
    with open(path, "wb") as f:
        for p in parts:
            with open(work / "tokens" / f"{p['name']}.bin", "rb") as part:
                shutil.copyfileobj(part, f, 1 << 20)
    n_tokens = sum(v for k, v in tokens.items() if k.startswith(f"tokens/{split}/"))
    return {"documents": sum(p["documents"] for p in parts), "tokens": n_tokens,
            "bytes": sum(p["bytes"] for p in parts), "file": path.name}


def ordered_stages(manifest: dict) -> dict[str, int]:
    """The manifest's stage counts in pipeline order (its "stage_order"; manifests
    written before it existed have only the sorted keys)."""
    stages = manifest.get("stages", {})
    return {k: stages[k] for k in manifest.get("stage_order", stages)}


def stage_table(manifest: dict) -> list[str]:
    """The lines `scaletrain prepare` prints: documents per stage, then per source."""
    stages = ordered_stages(manifest)
    lines = ["  stage                 count"]
    lines += [f"  {k:<20} {v:>7}" for k, v in stages.items()]
    for src in manifest.get("sources", []):
        tok = src["tokens"]
        lines.append(f"  source {src['source']}: {src['files']} files, {src['records']} "
                     f"records, {src['malformed']} malformed, tokens train {tok['train']} "
                     f"val {tok['val']} test {tok['test']}")
    return lines
