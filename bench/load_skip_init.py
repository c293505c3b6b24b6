"""Time and peak RSS of `scaletrain generate` / `eval` of a ~100M-parameter Llama Hugging
Face directory, this checkout against another one (issue #15: the loaders skip the
random init, models/registry.py `materialize(init=False)`).

    python bench/load_skip_init.py --before DIR [--pairs 5] [--dir HF_DIR]

`--before`: a checkout of the code to compare with (e.g. `git archive <commit> | tar -x
-C DIR`), run with this checkout's Python. Builds the HF directory with transformers
(LlamaForCausalLM, random weights, seed 0; a 300-token byte-level BPE with Llama 3's
special tokens) unless HF_DIR holds one, then runs each command as a user does,
`python -m scaletrain ...` under /usr/bin/time (wall seconds, max RSS), in interleaved
rounds: before, after, after again (the A/A control). Prints the medians and the median
of per-round ratios. Results: bench/results/load_skip_init.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=256,
             tie_word_embeddings=False)


def build_dir(d: Path) -> int:
    """Write the HF directory; returns its parameter count."""
    # transformers and tokenizers: this benchmark's own dependencies (requirements.txt)
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    src = Path(sysconfig.get_paths()["stdlib"])
    tk.train_from_iterator([p.read_text(errors="replace") for p in sorted(src.glob("a*.py"))],
                           trainers.BpeTrainer(vocab_size=300, special_tokens=[
                               "<|begin_of_text|>", "<|end_of_text|>"],
                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk,
                                                bos_token="<|begin_of_text|>",
                                                eos_token="<|end_of_text|>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SHAPE, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id))
    model.save_pretrained(d)
    return sum(p.numel() for p in model.parameters())


def count_params(d: Path) -> int:
    """Parameters stored in the directory's safetensors (headers only)."""
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def timed(root: Path, args: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of `python -m scaletrain ARGS` with the code at `root`."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        proc = subprocess.run(["/usr/bin/time", "-o", f.name, "-f", "%e %M", sys.executable,
                               "-m", "scaletrain", *args], cwd=root, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(root)})
        if proc.returncode != 0:
            raise SystemExit(f"{root}: scaletrain {args[0]} failed:\n{proc.stderr[-2000:]}")
        wall, rss_kb = f.read().split()[-2:]
    return float(wall), int(rss_kb) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, type=Path)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--commands", default="generate,eval",
                    help="which of generate,eval to time (eval reads the whole val split)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="load_skip_init-"))
    d = a.dir or work / "hf"
    n = build_dir(d) if not (d / "config.json").is_file() else count_params(d)
    prep = work / "prep"
    cmds = {
        "generate": ["generate", str(d), "--generate.prompt=import os\n",
                     "--generate.num_samples=1", "--generate.temperature=0",
                     "--generate.max_new_tokens=8"],
        "eval": ["eval", str(d), "--data.source=python-stdlib", "--data.max_files=24",
                 "--data.prep_workers=1", f"--data.prepared_dir={prep}", "--model.seq_len=64",
                 "--eval.batches=1", "--eval.batch_size=2", "--eval.test_batches=0"],
    }
    cmds = {c: cmds[c] for c in a.commands.split(",")}
    if "eval" in cmds:
        timed(REPO, cmds["eval"])  # prepares the data once, outside the timing
    variants = {"before": a.before.resolve(), "after": REPO, "after_again": REPO}
    runs = {c: {v: [] for v in variants} for c in cmds}
    for _ in range(a.pairs):
        for c, args in cmds.items():
            for v, root in variants.items():
                runs[c][v].append(timed(root, args))
    out = {"params": n, "shape": SHAPE, "pairs": a.pairs, "commands": cmds, "results": {}}
    for c, by in runs.items():
        med = {v: {"wall_s": statistics.median(w for w, _ in r),
                   "peak_rss_mib": statistics.median(m for _, m in r)} for v, r in by.items()}
        ratio = {f"{v}/before": {
            "wall": statistics.median(x[0] / b[0] for x, b in zip(by[v], by["before"])),
            "rss": statistics.median(x[1] / b[1] for x, b in zip(by[v], by["before"]))}
            for v in ("after", "after_again")}
        ratio["after_again/after"] = {
            "wall": statistics.median(x[0] / b[0] for x, b in zip(by["after_again"], by["after"])),
            "rss": statistics.median(x[1] / b[1] for x, b in zip(by["after_again"], by["after"]))}
        out["results"][c] = {"median": med, "ratios": ratio, "raw": by}
        print(c, json.dumps(med), json.dumps(ratio))
    res = REPO / "bench" / "results" / "load_skip_init.json"
    res.write_text(json.dumps(out, indent=2))
    print(f"wrote {res}")


if __name__ == "__main__":
    main()
