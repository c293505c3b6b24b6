"""The rules of `train.objective = "dpo"`: what preference tuning honours, and a one-line
refusal (ConfigError, exit 2) of every setting it does not (DESIGN.md §6: a mode refuses
what it does not honour)."""

from __future__ import annotations

from dataclasses import fields

from scaletrain.config.model_checks import FAMILY_RULES
from scaletrain.config.schema import Config, DPOConfig
from scaletrain.errors import ConfigError


def check_dpo(cfg: Config) -> None:
    """ConfigError naming the field when `cfg` asks for DPO with a setting it cannot run."""
    if cfg.train.objective != "dpo":
        changed = [f.name for f in fields(DPOConfig)
                   if getattr(cfg.dpo, f.name) != getattr(DPOConfig(), f.name)]
        if changed:
            raise ConfigError(f"dpo.{changed[0]} is set but train.objective="
                              f"'{cfg.train.objective}'; set train.objective='dpo' to use it")
        return
    p = cfg.parallel
    if FAMILY_RULES[cfg.model.name].kind != "text":
        raise ConfigError(f"train.objective='dpo' needs a text model, not model.name="
                          f"'{cfg.model.name}'")
    refused = [
        (p.mode == "ps", "parallel.mode='ps'", "the parameter server trains the LM loss"),
        (p.tp > 1, f"parallel.tp={p.tp}",
         "the response log-probabilities need the whole vocabulary's logits"),
        (p.pp > 1, f"parallel.pp={p.pp}",
         "the pipeline's last stage computes the LM loss only"),
        (bool(cfg.distill.teacher), "distill.teacher", "distillation is its own objective"),
        (cfg.data.document_masking, "data.document_masking",
         "each sequence is one prompt + response already"),
        (cfg.train.batch_ramp > 0, "train.batch_ramp", "the ramp counts tokens, DPO pairs"),
        (cfg.model.moe_experts > 0, "model.moe_experts",
         "MoE balance terms are not wired into the DPO loss"),
        (bool(cfg.data.mixture), "data.mixture",
         "preference pairs come from one data.source"),
        (cfg.data.format == "chat" and cfg.data.train_on != "assistant",
         f"data.train_on='{cfg.data.train_on}'",
         "a chat pair's response is its chosen / rejected assistant tokens"),
    ]
    for bad, field, why in refused:
        if bad:
            raise ConfigError(f"{field} is not supported with train.objective='dpo' ({why})")
