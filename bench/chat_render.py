"""What finding the assistant tokens costs in chat preparation (data/chat.py `render`).

`train_on='all'` is one `apply_chat_template` call per conversation; `'assistant'` adds
two renders (no tokenization) per assistant message, to diff the conversation's
prefixes. Both on the same conversations (1-3 turns, some with a system message) with a
tiny ChatML tokenizer built locally (tests/chat_dirs.py).

Interleaved pairs (DESIGN.md §4): each pair renders every conversation once with 'all'
(A) and once with 'assistant' (B); we report the median of per-pair time ratios B/A,
and as a noise control the median ratio of two 'all' passes back to back (A/A'), plus
the conversations/s and tokens/s of each.

    .venv/bin/python bench/chat_render.py [--pairs 10] [--conversations 500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaletrain.data.chat import load_chat_tokenizer, render  # noqa: E402
from tests.chat_dirs import chat_tokenizer, random_conversations  # noqa: E402


def _pass(tok, convs, train_on: str) -> tuple[float, int]:
    t = time.perf_counter()
    n = sum(len(render(tok, c, train_on).ids) for c in convs)
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--conversations", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        chat_tokenizer(Path(d))
        tok = load_chat_tokenizer(str(Path(d) / "tokenizer.json"))
    convs = random_conversations(args.conversations, seed=3)
    _pass(tok, convs[:50], "assistant")  # warm-up (template compile, caches)
    ratios, controls, ta, tb, n = [], [], [], [], 0
    for _ in range(args.pairs):
        a, n = _pass(tok, convs, "all")
        a2, _ = _pass(tok, convs, "all")
        b, _ = _pass(tok, convs, "assistant")
        ratios.append(b / a)
        controls.append(a2 / a)
        ta.append(a)
        tb.append(b)
    k = len(convs)
    print(f"{k} conversations, {n} tokens, {args.pairs} pairs")
    for name, t in (("all", ta), ("assistant", tb)):
        m = statistics.median(t)
        print(f"  train_on={name:<9}  {k / m:8.0f} conversations/s  {n / m:9.0f} tokens/s")
    print(f"  assistant / all time ratio: median {statistics.median(ratios):.3f}  "
          f"(A/A control {statistics.median(controls):.3f})")


if __name__ == "__main__":
    main()
