"""The `[dpo]` section: preference tuning (train.objective = "dpo", train/dpo.py)."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.fields import F


@dataclass
class DPOConfig:
    beta: float = F(0.1, "DPO's beta (Rafailov et al. 2023, eq. 7): the strength of the "
                    "implicit KL penalty to the reference model; rewards are beta x the "
                    "log-ratio of policy to reference.", gt=0.0)
    prompt_key: str = F("prompt", "The field of a preference record holding the prompt.")
    chosen_key: str = F("chosen", "The field holding the preferred response.")
    rejected_key: str = F("rejected", "The field holding the dispreferred response.")
