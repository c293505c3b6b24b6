"""Config rules of the `faults` section, checked before any compute.

(`checkpoint.resume=PATH` is checked when the run starts, not here: a saved config.toml
keeps the path, and `scaletrain eval` of that run must not fail once it is gone.)
"""

from __future__ import annotations

from scaletrain.errors import ConfigError


def check_checkpoint_config(cfg) -> None:
    """One ConfigError line naming the fields; called from config/checks.py."""
    f = cfg.faults
    if f.spike_sigmas > 0 and f.spike_min_history > f.spike_window:
        raise ConfigError(f"faults.spike_min_history={f.spike_min_history} exceeds "
                          f"faults.spike_window={f.spike_window}: spike detection would "
                          "never start")
