"""The hand-written PyTorch loop scaletrain's step is compared with (bench, overhead).

Same model (same init), same data order, same optimizer (AdamW, same groups), same
gradient clipping and micro-batching, same precision (autocast per the config's policy)
and, with `train.compile`, `model.compile()` as a user would write it: what a careful
user writes in 15 lines. `compile_loss=True` also compiles the cast + cross-entropy
(as scaletrain does with `train.compile`; nanoGPT gets the same by computing the loss
inside its compiled forward): the stricter baseline for the compiled comparison.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaletrain.data.loader import StatefulLoader
from scaletrain.models import build_model
from scaletrain.optim import build_optimizer


class HandLoop:
    """The minimal loop: forward, mean cross-entropy / accum, backward, clip, step."""

    def __init__(self, tr, compile_loss: bool = False):
        cfg = tr.cfg
        facts = {"vocab_size": tr.data.vocab_size}
        self.device = tr.rt.device
        self.model = build_model(cfg.model, facts, seed=cfg.train.seed, device=self.device,
                                 dtype=tr.policy.param_dtype).train()
        if cfg.train.compile:
            self.model.compile()
        self.opt = build_optimizer(self.model, cfg.optim,
                                   master_weights=tr.policy.master_weights)
        self.loader = StatefulLoader(tr.data.train, cfg.train.batch_size, seed=cfg.train.seed)
        self.micro, self.accum, self.clip = tr.micro, tr.accum, cfg.train.grad_clip
        self.policy = tr.policy
        self.loss = torch.compile(_loss) if compile_loss and cfg.train.compile else _loss

    def step(self) -> None:
        x, y = next(self.loader)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        for xm, ym in zip(x.split(self.micro), y.split(self.micro)):
            with self.policy.autocast():
                logits = self.model(xm)
            loss = self.loss(logits, ym) / self.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
