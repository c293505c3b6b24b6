"""The before/after table of `scaletrain compress`: size on disk, parameters, validation
loss / perplexity and generation speed of each artefact, as JSON, text and a PNG chart.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

from scaletrain import generate  # generate.sample: looked up per call (tests replace it)
from scaletrain.compress.quantize import DynamicInt8Linear, QLinear
from scaletrain.data.loader import eval_batches
from scaletrain.evaluate import evaluate
from scaletrain.models.contract import TiedPairs, head_modules
from scaletrain.precision import PrecisionPolicy

COLUMNS = ("name", "kind", "size_mb", "params", "nonzero_params", "val_loss", "val_ppl",
           "tokens_per_s")


def logical_params(model: nn.Module, tied: TiedPairs) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a model, quantized linears included.

    Quantized linears keep their weights as buffers or packed torch.ao params; each
    weight value counts once whatever its storage type. Tied tensors count once
    (`tied`: the family's pairs, ModelSpec.tied).
    """
    seen, total, nonzero = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            nonzero += int((p != 0).sum())
    heads = head_modules(tied)
    for name, m in model.named_modules():
        if name in heads:
            continue  # a quantized copy of the tied embedding: counted through wte
        if isinstance(m, QLinear):
            total += m.q.numel()
            nonzero += int((m.q != 0).sum())
        elif isinstance(m, DynamicInt8Linear):
            w, b = m.inner._weight_bias()
            codes = w.int_repr()
            total += codes.numel() + (b.numel() if b is not None else 0)
            nonzero += int((codes != 0).sum()) + (int((b != 0).sum()) if b is not None else 0)
    return total, nonzero


@torch.no_grad()
def val_loss(model: nn.Module, dataset, batch_size: int, batches: int) -> float:
    policy = PrecisionPolicy("fp32", torch.device("cpu"))
    return evaluate(model, eval_batches(dataset, batch_size, batches), policy,
                    torch.device("cpu"), "text")["loss"]


def generation_speeds(models: list[nn.Module], prompt: list[int], tokens: int, seq_len: int,
                      rounds: int = 5, threads: int = 0, decode=None) -> list[float]:
    """Median tokens/s of greedy KV-cache decoding of `tokens` new tokens for each model,
    measured round-robin (every round times every model once) so that a noisy neighbour
    slows all of them alike rather than whichever ran at that moment (DESIGN.md §4).

    Each model first decodes the same `tokens` untimed: the first call pays for lazy
    kernel selection, allocator growth and the cache's full length, and timing it made
    the first row of the table 7 tokens/s where repeats gave 429 (issue 13 item 8).
    `decode`: the family's KV-cache forward (ModelSpec.decode).
    """
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for m in models:  # warm-up: the timed call's own length, untimed
            generate.sample(m, prompt, max_new_tokens=tokens, seq_len=seq_len, temperature=0,
                            decode=decode)
        rates: list[list[float]] = [[] for _ in models]
        for _ in range(rounds):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                out = generate.sample(m, prompt, max_new_tokens=tokens, seq_len=seq_len,
                                      temperature=0, decode=decode)
                rates[i].append(len(out) / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(before)
    return [statistics.median(r) for r in rates]


def measure(name: str, kind: str, weights_file: Path, model: nn.Module, dataset, *,
            batch_size: int, batches: int, tied: TiedPairs) -> dict:
    """One row of the table, without the speed (see `generation_speeds`)."""
    total, nonzero = logical_params(model, tied)
    loss = val_loss(model, dataset, batch_size, batches)
    return {"name": name, "kind": kind, "path": str(weights_file),
            "size_mb": weights_file.stat().st_size / 2**20, "params": total,
            "nonzero_params": nonzero, "val_loss": loss, "val_ppl": math.exp(min(loss, 700))}


def table(rows: list[dict]) -> str:
    """A fixed-width text table with ratios against the first row (the original)."""
    base = rows[0]
    head = (f"{'artefact':<22}{'size MB':>9}{'x smaller':>10}{'params':>11}{'nonzero':>11}"
            f"{'val loss':>10}{'Δ loss':>9}{'ppl':>9}{'tok/s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<22}{r['size_mb']:>9.2f}{base['size_mb'] / r['size_mb']:>10.2f}"
            f"{r['params']:>11,}{r['nonzero_params']:>11,}{r['val_loss']:>10.4f}"
            f"{100 * (r['val_loss'] / base['val_loss'] - 1):>8.2f}%{r['val_ppl']:>9.2f}"
            f"{r['tokens_per_s']:>9.1f}")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict], extra: dict) -> None:
    """report.json (rows + extra facts) and report.png (one bar chart per column)."""
    (out / "report.json").write_text(json.dumps({"rows": rows, **extra}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("size_mb", "size on disk (MB)"), ("params", "parameters"),
            ("val_loss", "validation loss"), ("tokens_per_s", "generation tokens/s")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    names = [r["name"] for r in rows]
    for ax, (key, title) in zip(axes, cols):
        ax.bar(range(len(rows)), [r[key] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
