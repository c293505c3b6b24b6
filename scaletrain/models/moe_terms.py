"""The step's side of a model's MoE layers (models/moe.py): their loss terms into the
gradient, their load into the metrics and into DeepSeek-V3's balancing bias.

    after each micro-batch's forward   collect(): the layers' loss terms (per-token sums,
                                       with their graph) for the step to divide by its
                                       global target count, like the summed CE; the
                                       detached load statistics accumulate
    after each optimizer step          end_step(applied): the step's statistics summed
                                       over the data-parallel ranks (one all-reduce), the
                                       sigmoid_bias routers' biases moved toward balance
                                       (same global load on every rank: same bias), the
                                       step's record kept for the log
    on a log step                      record(): the metrics.jsonl fields

The model never sees the step: it only leaves `MoE.last` after a training forward. The
terms are collected once per micro-batch, right after its forward, so an activation-
checkpoint recompute (which runs the forward again inside backward) cannot count twice.

A pipeline rank holds some of the model's MoE layers (parallel/pipeline_moe.py): the
step's statistics keep one row per MoE layer of the *whole* model (`whole`), this rank's
rows filled and the others zero, and the reducer sums over every rank, so after
`end_step` each rank has every layer's global row (the stages' rows are disjoint) for
the record and its own layers' rows for their bias; `collect(module)` takes the layers
of one stage's module only, right after that stage's forward.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn

from scaletrain.models.moe import MoE, moe_layers

_BLOCK = re.compile(r"blocks\.(\d+)\.")
# Columns of a layer's statistics row after its E loads.
_DROPPED, _TOKENS, _AUX, _Z = range(4)


class MoeStepTerms:
    """`layers`: this rank's MoE layers by module path; `whole`: the whole model's
    (their settings; a pipeline rank's `layers` are some of them), default `layers`;
    `device`: where the statistics live (the reducer's collective runs there: NCCL needs
    the GPU), default that of the first forward's load."""

    def __init__(self, layers: dict[str, MoE], reducer: Callable[[torch.Tensor], torch.Tensor],
                 bias_rate: float, whole: dict[str, MoE] | None = None,
                 device: torch.device | None = None):
        whole = layers if whole is None else whole
        self.layers = list(layers.values())
        self.labels = [m.group(1) if (m := _BLOCK.search(name + ".")) else name
                       for name in whole]
        self.settings = [m.settings for m in whole.values()]  # per row of the statistics
        # This rank's layers -> their row (by identity: a stage view shares the layers).
        row_of = {name: i for i, name in enumerate(whole)}
        self._row = {id(m): row_of[name] for name, m in layers.items()}
        # sum over the data-parallel ranks (identity on one); over every rank when the
        # rows are split over pipeline stages
        self.reducer = reducer
        self.bias_rate = bias_rate
        self.device = device
        self._acc: torch.Tensor | None = None  # (L, E + 4) this step's sums, fp64
        self.step_stats: torch.Tensor | None = None  # the last step's, over all ranks

    def collect(self, module: nn.Module | None = None) -> torch.Tensor | None:
        """The loss terms of the forward just run (a per-token sum over the MoE layers of
        `module`, default this rank's, with its graph), and their statistics added to
        the step's rows. None when no layer ran in training mode (or `module` has none)."""
        layers = self.layers if module is None else \
            [m for m in module.modules() if id(m) in self._row]
        if self._acc is None:  # a stage without MoE layers still joins the step's sum
            self._acc = self._zeros(layers)
        total = None
        for layer in layers:
            f, layer.last = layer.last, None
            if f is None:  # not run in training mode
                return None
            total = f.loss if total is None else total + f.loss
            row = torch.cat([f.load.to(torch.float64), torch.stack([
                f.dropped.to(torch.float64), f.aux.new_tensor(f.tokens).to(torch.float64),
                f.aux.to(torch.float64), f.z.to(torch.float64)])])
            self._acc[self._row[id(layer)]] += row
        return total

    def _zeros(self, layers: list[MoE]) -> torch.Tensor:
        """(L, E + 4) fp64 zeros (every MoE layer has model.moe_experts experts)."""
        loads = [m.last.load for m in layers if m.last is not None]
        device = self.device or (loads[0].device if loads else None)
        return torch.zeros(len(self.settings), self.settings[0].experts + 4,
                           dtype=torch.float64, device=device)

    @torch.no_grad()
    def end_step(self, applied: bool) -> None:
        """After the optimizer step (`applied` False: the guard skipped it, the bias
        stays): the global statistics, the bias update (DeepSeek-V3 §2.1.2:
        b_e += γ · sign(mean load − load_e), outside the gradient)."""
        if self._acc is None:
            return
        stats, self._acc = self.reducer(self._acc), None
        self.step_stats = stats
        if not applied or not self.bias_rate:
            return
        for layer in self.layers:
            if layer.expert_bias is None:
                continue
            load = stats[self._row[id(layer)], :layer.settings.experts]
            step = torch.sign(load.mean() - load) * self.bias_rate
            layer.expert_bias.add_(step.to(layer.expert_bias.dtype))

    def record(self) -> dict:
        """metrics.jsonl fields of the last step: the balance and z losses (unweighted
        means per token, summed over layers; the balance term is top_k when the load is
        uniform), dropped share of the assignments, and per MoE block the load imbalance
        max / mean tokens per expert (1.0 = balanced) and the load itself (assignments
        per expert, before drops; TensorBoard draws it as a histogram)."""
        if self.step_stats is None:
            return {}
        s = self.step_stats.cpu()
        imbalance, loads, dropped, assigned, aux, z = {}, {}, 0.0, 0.0, 0.0, 0.0
        for label, settings, row in zip(self.labels, self.settings, s):
            E = settings.experts
            load, tail = row[:E], row[E:]
            tokens = float(tail[_TOKENS])
            imbalance[label] = float(load.max() / load.mean()) if load.sum() else 1.0
            loads[label] = [int(n) for n in load.tolist()]
            dropped += float(tail[_DROPPED])
            assigned += tokens * settings.top_k
            aux += float(tail[_AUX]) / tokens
            z += float(tail[_Z]) / tokens
        return {"moe_aux_loss": aux, "moe_z_loss": z,
                "moe_dropped": dropped / assigned if assigned else 0.0,
                "moe_imbalance": imbalance, "moe_load": loads}


def moe_step_terms(model: nn.Module, reducer: Callable[[torch.Tensor], torch.Tensor],
                   bias_rate: float, whole: nn.Module | None = None,
                   device: torch.device | None = None) -> MoeStepTerms | None:
    """The step's MoE terms of `model`, or None for a model without MoE layers.
    `whole`: the whole model (on meta) when `model` is a pipeline rank's stages: the
    terms then exist whenever the whole model has MoE layers, even on a stage without
    (which must give `device`)."""
    layers = moe_layers(model)
    every = moe_layers(whole) if whole is not None else layers
    return MoeStepTerms(layers, reducer, bias_rate, every, device) if every else None
