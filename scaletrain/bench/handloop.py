"""The hand-written PyTorch loop scaletrain's step is compared with (bench, overhead).

Same model (same init), same data order, same optimizer (AdamW, same groups), same
gradient clipping and micro-batching, same precision (autocast per the config's policy)
and, with `train.compile`, `model.compile()` as a user would write it: what a careful
user writes in 15 lines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaletrain.data.loader import StatefulLoader
from scaletrain.models import build_model
from scaletrain.optim import build_optimizer


class HandLoop:
    """The minimal loop: forward, mean cross-entropy / accum, backward, clip, step."""

    def __init__(self, tr):
        cfg = tr.cfg
        facts = {"vocab_size": tr.data.vocab_size}
        self.model = build_model(cfg.model, facts, seed=cfg.train.seed,
                                 dtype=tr.policy.param_dtype).train()
        if cfg.train.compile:
            self.model.compile()
        self.opt = build_optimizer(self.model, cfg.optim,
                                   master_weights=tr.policy.master_weights)
        self.loader = StatefulLoader(tr.data.train, cfg.train.batch_size, seed=cfg.train.seed)
        self.micro, self.accum, self.clip = tr.micro, tr.accum, cfg.train.grad_clip
        self.policy = tr.policy

    def step(self) -> None:
        x, y = next(self.loader)
        for xm, ym in zip(x.split(self.micro), y.split(self.micro)):
            with self.policy.autocast():
                logits = self.model(xm)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                   ym.view(-1)) / self.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
