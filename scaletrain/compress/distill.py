"""Knowledge distillation as a loss hook of the training step (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network", arXiv:1503.02531).

    loss = (1 - alpha) · CE(student, data) + alpha · T² · KL(p_teacher^T || p_student^T)

where p^T = softmax(logits / T). The T² keeps the soft term's gradient magnitude
independent of T (paper §2). Both terms are *sums* over target positions (positions
whose target is IGNORE_INDEX are skipped), so the step still divides by the global
target count of the whole step (DESIGN.md principle 7; train/step.py).

The teacher runs in eval mode under `torch.no_grad`, on the same micro-batch inputs, on
every data-parallel rank (each rank holds a full teacher copy: it is not trained, so
it needs no sharding or gradient sync).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.compress.artefact import load_artefact
from scaletrain.errors import ConfigError
from scaletrain.models.losses import IGNORE_INDEX, sum_cross_entropy


def distill_sum_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     targets: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """(B, T, V) student and teacher logits, (B, T) targets -> summed distillation loss."""
    ce = sum_cross_entropy(student_logits, targets)
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    # KL(t || s) per position = sum_v p_t (log p_t - log p_s); kl_div takes (input=log q,
    # target=log p) with log_target=True.
    kl = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    kl = kl[targets.reshape(-1) != IGNORE_INDEX].sum().to(ce.dtype)
    return (1.0 - alpha) * ce + alpha * temperature ** 2 * kl


def make_distill_loss(teacher: nn.Module, alpha: float, temperature: float
                      ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The custom loss of train/step_loss.py `build_step_loss`: (student logits,
    inputs, targets) -> summed loss."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(x)
        if t_logits.shape[-1] != logits.shape[-1]:
            raise ConfigError(f"distill.teacher has a vocabulary of {t_logits.shape[-1]}, "
                              f"the student {logits.shape[-1]}; they must share a tokenizer")
        return distill_sum_loss(logits, t_logits, y, alpha, temperature)

    return loss_fn


def build_distill_loss(cfg, device: torch.device | str):
    """The loss hook for `cfg.distill`, or None when distillation is off."""
    d = cfg.distill
    if not d.teacher:
        return None

    tcfg, teacher, _ = load_artefact(d.teacher, device=device)
    if tcfg.model.seq_len < cfg.model.seq_len:
        raise ConfigError(f"distill.teacher has seq_len {tcfg.model.seq_len}, shorter than "
                          f"the student's model.seq_len={cfg.model.seq_len}")
    return make_distill_loss(teacher, d.alpha, d.temperature)
