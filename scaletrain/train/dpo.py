"""DPO, Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290, eq. 7):
train.objective = "dpo".

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

pi / ref: the summed log-probabilities of the response tokens of the chosen (c) and
rejected (r) sequence under the policy and the frozen reference model. The reference is
a frozen copy of the initial weights (after init.from), or with LoRA the policy itself
with its adapters disabled (finetune/lora.py `adapters_disabled`: no second copy).

`DPOLoss` is the step's loss object (train/step.py calls it as it calls the LM loss): a
micro-batch's loss is the *sum* over its pairs, `count` says how many pairs it holds, so
the step divides by the global pair count of all micro-batches and ranks — the exact mean
over pairs of the whole step, as the LM loss is over tokens. It also sums the rewards of
the step's pairs for the train records (`record`) and scores evaluation splits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.finetune import apply_init
from scaletrain.finetune.lora import adapters_disabled, has_lora
from scaletrain.models.losses import IGNORE_INDEX
from scaletrain.models.registry import materialize, spec_of
from scaletrain.parallel.ac import ACPolicy
from scaletrain.parallel.parallelize import build_parallel_model
from scaletrain.precision import PrecisionPolicy

Reference = Callable[[torch.Tensor], torch.Tensor]  # inputs (N, T) -> logits (N, T, V)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """(N,) sum over the positions with a target (targets != IGNORE_INDEX: the response)
    of log p(target); logits (N, T, V) upcast to `dtype` (fp32, or fp64 runs' fp64)."""
    n, t, v = logits.shape
    nll = F.cross_entropy(logits.to(dtype).reshape(-1, v), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none")  # 0 where ignored
    return -nll.view(n, t).sum(-1)


def dpo_terms(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float):
    """Per pair (B,): (loss, chosen reward, rejected reward) from (B, 2) log-probs
    [:, 0] chosen, [:, 1] rejected. Rewards are beta x log(pi / ref) (paper §5)."""
    rewards = beta * (policy_logps - ref_logps)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return -F.logsigmoid(chosen - rejected), chosen, rejected


@dataclass
class DPOStats:
    """This rank's sums over the pairs of the current step (detached, on the device, no
    host sync): chosen reward, rejected reward, correct (margin > 0), pairs."""

    sums: torch.Tensor | None = None

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        v = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
                         torch.tensor(chosen.numel(), device=chosen.device)]
                        ).detach().to(torch.float64)
        self.sums = v if self.sums is None else self.sums + v

    def summary(self, reducer: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Means over the pairs of every rank (`reducer`: the sum over ranks, a
        collective every rank calls); {} before any pair."""
        if self.sums is None:
            return {}
        c, r, correct, n = reducer(self.sums.clone()).tolist()
        n = max(n, 1.0)
        return {"dpo_reward_margin": (c - r) / n, "dpo_chosen_reward": c / n,
                "dpo_rejected_reward": r / n, "dpo_accuracy": correct / n}


@dataclass
class DPOLoss:
    """The DPO micro-batch loss, called as train/step.py calls every step loss:
    (model, inputs, targets, policy, loss dtype) -> the loss summed over the pairs.

    Batches are data/preference.py `PreferencePairs` ones: inputs and targets (B, 2, T),
    [:, 0] chosen, [:, 1] rejected, targets IGNORE_INDEX outside the response."""

    beta: float
    reference: Reference  # the frozen reference's logits (called under no_grad)
    stats: DPOStats = field(default_factory=DPOStats)

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def extra(self) -> None:  # no model loss terms (MoE is refused with DPO)
        return None

    def count(self, targets: torch.Tensor) -> torch.Tensor:
        """What the step normalises by: the pairs of a micro-batch."""
        return torch.tensor(targets.shape[0], dtype=torch.int64, device=targets.device)

    def start_step(self) -> None:
        """A new step: the reward sums restart (the train record is the step's)."""
        self.stats = DPOStats()

    def record(self, reducer: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """The train record's DPO keys: means over the pairs of the last step."""
        return self.stats.summary(reducer)

    def terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              policy: PrecisionPolicy, dtype: torch.dtype):
        """(loss, chosen reward, rejected reward) per pair of the batch (B, 2, T)."""
        b, _, t = x.shape
        # Chosen and rejected in one forward (2B sequences), as TRL's concatenated_forward.
        xx, yy = x.reshape(2 * b, t), y.reshape(2 * b, t)
        with policy.autocast():
            logits = model(xx)
        pi = sequence_logps(logits, yy, dtype).view(b, 2)
        with torch.no_grad(), policy.autocast():
            ref = sequence_logps(self.reference(xx), yy, dtype).view(b, 2)
        return dpo_terms(pi, ref, self.beta)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 policy: PrecisionPolicy, loss_dtype: torch.dtype) -> torch.Tensor:
        loss, chosen, rejected = self.terms(model, x, y, policy, loss_dtype)
        self.stats.add(chosen, rejected)
        return loss.sum()

    def evaluate(self, model: nn.Module, batches, policy: PrecisionPolicy,
                 reducer: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """{"loss": mean DPO loss, "accuracy": fraction of pairs with margin > 0,
        "dpo_reward_margin": mean margin} over every pair of `batches` (every rank's)."""
        was_training = model.training
        model.eval()
        dtype = torch.float64 if policy.param_dtype == torch.float64 else torch.float32
        sums = torch.zeros(5, dtype=torch.float64, device=policy.device)
        with torch.no_grad():
            for x, y in batches:  # a rank's last batch may be empty: it still runs
                x, y = x.to(sums.device), y.to(sums.device)
                loss, chosen, rejected = self.terms(model, x, y, policy, dtype)
                sums += torch.stack([loss.sum(), chosen.sum(), rejected.sum(),
                                     (chosen > rejected).sum(),
                                     torch.tensor(loss.numel(), device=sums.device)]
                                    ).double()
        model.train(was_training)
        loss_sum, c, r, correct, n = reducer(sums).tolist()
        if n == 0:
            raise ValueError("evaluation saw no pairs")
        return {"loss": loss_sum / n, "accuracy": correct / n,
                "dpo_reward_margin": (c - r) / n}


def reference_of(model: nn.Module, frozen_copy: Callable[[], nn.Module]) -> Reference:
    """The reference forward: with LoRA the policy with its adapters off (the base
    model, no second copy), else a frozen copy of the initial weights
    (`frozen_copy()`, called only then)."""
    if has_lora(model):
        def base(x: torch.Tensor) -> torch.Tensor:
            with adapters_disabled(model):
                return model(x)
        return base
    return frozen_copy()


def frozen_initial_model(cfg, facts: dict, dist, policy: PrecisionPolicy,
                         device: torch.device, vocab_size: int | None) -> nn.Module:
    """The run's initial weights as a frozen module in eval mode: built and seeded as
    the policy was (the same weights on every layout, DESIGN.md §5), then init.from's
    weights without the freeze / LoRA converters. Sharded like the policy under FSDP
    (a second, frozen FSDP module: its forward gathers as the policy's does); a plain
    module otherwise (DDP's replicas hold full weights anyway, and a frozen module has
    no gradients to all-reduce). Read from init.from even when the run resumes: the
    reference is the start of the run, not the checkpoint."""
    dims = dist.dims
    if dims.fsdp:
        # No activation checkpointing nor compile: it runs without gradients.
        model = build_parallel_model(cfg.model, facts, seed=cfg.train.seed, dims=dims,
                                     mesh=dist.mesh, pcfg=cfg.parallel, policy=policy,
                                     device=device, ac=ACPolicy("none")).module
    else:
        spec = spec_of(cfg.model)
        with torch.device("meta"):
            model = spec.build(cfg.model, facts)
        model.to(dtype=policy.param_dtype)
        materialize(model, device, cfg.train.seed, tied=spec.tied)
    plain = replace(cfg, finetune=replace(cfg.finetune, freeze=[], lora_rank=0))
    model = apply_init(model, plain, vocab_size, resuming=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def dpo_loss(cfg, model: nn.Module, frozen_copy: Callable[[], nn.Module]) -> DPOLoss:
    """The run's DPO loss: dpo.beta and the reference of `model` (see `reference_of`)."""
    return DPOLoss(cfg.dpo.beta, reference_of(model, frozen_copy))
