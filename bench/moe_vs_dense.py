"""Training tokens/s of the tiny MoE llama (configs/moe-tiny.toml) against a dense llama
with the same ACTIVATED parameters, side by side in one process, with an A/A control.

moe-tiny: d_model 128, 4 blocks, block 0 dense (SwiGLU of the Llama rule's width, 384),
blocks 1-3 MoE with 8 experts of width 128, top-2, one shared expert of width 128: each
token runs 2·128 + 128 = 384 hidden units in every block, what the dense twin
(`model.moe_experts=0`: every block a SwiGLU of width 384) runs too. The two differ by
the MoE's router (8 × 128 weights per MoE block, 0.1% of the activated parameters) and
by the MoE's work: routing, sorting the tokens by expert, one matmul per expert and
projection over its rows (the CPU path of models/moe.py `grouped_matmul`), combining.

Variants, each a model built from the config (same seed, precision policy, AdamW) and
trained on the same random token batches (the data path is the same for all and not
what is compared): "moe", "dense", and "moe-again", a second copy of the MoE built
alike (the A/A control: the spread between "moe" and "moe-again" is the noise floor of
this machine at the moment). Each round runs every variant for `--steps` timed steps
after one untimed step, in a rotated order (drift in the machine's load falls on all
variants alike); the table gives the median tokens/s over the rounds and the ratios
moe / dense and moe-again / moe per round and their medians. One step = forward (summed CE + the MoE's aux / z
terms, as the trainer adds them: models/moe_terms.py), backward, clip, AdamW step.

    .venv/bin/python bench/moe_vs_dense.py [--rounds 5] [--steps 4] [--json OUT]

Speed is measured here, never asserted in tests. The machine's load average is printed:
on a shared 2-core machine the absolute numbers move with the other processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaletrain.config import build_config  # noqa: E402
from scaletrain.models import build_model  # noqa: E402
from scaletrain.models.moe_terms import moe_step_terms  # noqa: E402
from scaletrain.optim import build_optimizer  # noqa: E402
from scaletrain.precision import PrecisionPolicy  # noqa: E402

CONFIG = str(ROOT / "configs" / "moe-tiny.toml")
# the dense twin: every moe_* field of the config back to its default (a dense llama)
DENSE = [("model.moe_experts", "0"), ("model.moe_d_ff", "0"),
         ("model.moe_shared_experts", "0"), ("model.moe_first_dense", "0"),
         ("model.moe_aux_loss", "0"), ("model.moe_z_loss", "0")]
VARIANTS = {"moe": [], "dense": DENSE, "moe-again": []}
VOCAB = 4096


class Variant:
    """One model + optimizer trained on the shared batches."""

    def __init__(self, overrides: list[tuple[str, str]], seed: int):
        self.cfg = build_config(CONFIG, [("model.vocab_size", str(VOCAB)), *overrides])
        self.policy = PrecisionPolicy(self.cfg.precision.dtype, torch.device("cpu"))
        self.model = build_model(self.cfg.model, {"vocab_size": VOCAB}, seed=seed,
                                 dtype=self.policy.param_dtype).train()
        self.opt = build_optimizer(self.model, self.cfg.optim,
                                   master_weights=self.policy.master_weights)
        self.terms = moe_step_terms(self.model, lambda t: t, 0.0)
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.policy.autocast():
            loss = self.model(x, y)
        if self.terms is not None:  # the router's aux / z terms, as the trainer adds them
            loss = loss + self.terms.collect()
        (loss / y.numel()).backward()
        if self.terms is not None:
            self.terms.end_step(True)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    variants = {name: Variant(o, seed=1337) for name, o in VARIANTS.items()}
    cfg = variants["moe"].cfg
    B, T = cfg.train.batch_size, cfg.model.seq_len
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB, (B, T + 1), generator=g) for _ in range(a.steps + 1)]
    rates: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            v = variants[name]
            v.step(batches[0][:, :-1], batches[0][:, 1:])  # untimed: warm caches
            t0 = time.perf_counter()
            for b in batches[1:]:
                v.step(b[:, :-1], b[:, 1:])
            rates[name].append(a.steps * B * T / (time.perf_counter() - t0))
    med = {n: statistics.median(v) for n, v in rates.items()}
    active = {n: v.params - (sum(p.numel() for p in v.model.parameters()
                                 if p.dim() == 3) * (1 - cfg.model.moe_top_k
                                                     / cfg.model.moe_experts))
              for n, v in variants.items()}
    print(f"batch {B} x {T} tokens, {cfg.precision.dtype}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores, {a.rounds} rounds x {a.steps} steps")
    print(f"{'variant':10} {'params':>10} {'activated':>10} {'median tok/s':>13}  rounds")
    for n in variants:
        print(f"{n:10} {variants[n].params:>10,} {int(active[n]):>10,} {med[n]:>13,.0f}  "
              + " ".join(f"{x:,.0f}" for x in rates[n]))
    # paired per round (the variants of one round ran minutes apart at most): the load
    # of this shared machine moves several-fold between rounds, less within one
    paired = [m / d for m, d in zip(rates["moe"], rates["dense"])]
    paired_aa = [b / m for b, m in zip(rates["moe-again"], rates["moe"])]
    ratio, aa = statistics.median(paired), statistics.median(paired_aa)
    print("per round moe / dense: " + " ".join(f"{x:.2f}" for x in paired)
          + "   A/A: " + " ".join(f"{x:.2f}" for x in paired_aa))
    print(f"median over rounds: moe / dense = {ratio:.3f}   A/A moe-again / moe = {aa:.3f}"
          f"   (ratio of the median tok/s: {med['moe'] / med['dense']:.3f})")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "rates": rates, "median": med, "moe_over_dense": ratio, "aa": aa,
            "per_round": paired, "per_round_aa": paired_aa,
            "params": {n: v.params for n, v in variants.items()},
            "activated": active, "load_average": os.getloadavg()[0],
            "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
