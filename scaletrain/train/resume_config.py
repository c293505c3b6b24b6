"""The config of `scaletrain train`: a resume starts from the run's own config.toml.

Precedence (README "Resuming"): CLI > --config file > the run's saved config.toml >
defaults, where the saved config counts only when run.dir holds a checkpoint to resume
from (and run.overwrite is off). So `scaletrain train --run.dir=runs/demo` resumes the
demo as it was configured, not with the defaults (issue 13 item 4), and every flag or
file value on top of it is a change: refused if it cannot change (checkpoint/compat.py),
otherwise applied from the resumed step on (checkpoint/reconfigure.py).

The saved config's run.dir, run.overwrite and checkpoint.resume are not inherited: they
say what to do with the directory *this* time (the run may have been moved; a fine-tune
that started from another run's checkpoint resumes from its own).
"""

from __future__ import annotations

from pathlib import Path

from scaletrain.checkpoint.compat import NOT_SETTINGS as NOT_INHERITED
from scaletrain.config import Config, build_config
from scaletrain.config.load import load_toml
from scaletrain.config.run_files import CONFIG_FILE
from scaletrain.train.run_guard import check_run_dir, resumes_in_place


def saved_base(run_dir: Path) -> dict:
    """The run's saved config.toml without the fields that are not inherited."""
    saved = load_toml(run_dir / CONFIG_FILE)
    for sec, keys in NOT_INHERITED.items():
        table = saved.get(sec)
        if isinstance(table, dict):
            for k in keys:
                table.pop(k, None)
    return saved


def build_train_config(config_file: str | None, overrides: list[tuple[str, str]],
                       guard: bool = True) -> Config:
    """The validated config a `train` command runs; with `guard`, refuses a run.dir it
    must not use (train/run_guard.py).

    `guard` is for the process that writes the run directory (the launcher and rank 0):
    another rank may look only after rank 0 has written config.toml (the parameter-server
    rank 0 does so before the rendezvous) and would take the fresh run for a foreign one."""
    cfg = build_config(config_file, overrides)
    if resumes_in_place(cfg):
        cfg = build_config(config_file, [*overrides, ("run.dir", cfg.run.dir)],
                           base=saved_base(Path(cfg.run.dir)))
    if guard:
        check_run_dir(cfg)
    return cfg
