"""What `scaletrain train` may do with its run directory, decided before any compute.

A run directory is trained into in exactly three cases:

- it is new or holds nothing training writes: a fresh run;
- it holds a checkpoint: a resume (checkpoint/session.py; the run's own config.toml is
  the base of the config, train/resume_config.py);
- `run.overwrite=true` and it is recognisably a scaletrain run (its config.toml has
  scaletrain's sections): the files training writes are removed first, nothing else.

Everything else is refused with one line (exit 2), because training would overwrite
what is there: an empty `run.dir` (it would mean the current directory), a finished run
whose checkpoints were deleted, `run.overwrite=true` on a folder that is not a run, a
path that cannot be created (issue 13 items 9, 10, 11, 16).
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from scaletrain.config import Config, dumps_toml
from scaletrain.config.run_files import CONFIG_FILE, write_atomic
from scaletrain.config.schema import sections
from scaletrain.errors import ConfigError

# Files and folders training writes into a run directory (trainer.py, paramserver/,
# plan/auto.py, metrics/): what overwrite removes and what a fresh start would clobber.
OUTPUT_FILES = (CONFIG_FILE, "model.safetensors", "best.safetensors", "metrics.jsonl",
                "summary.json", "tokenizer.json", "plan.json", "trackers.json",
                # chat runs (data/chat.py save_chat_files): transformers' tokenizer files
                "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
CKPT_DIR, PLOTS_DIR, TB_DIR = "checkpoints", "plots", "tensorboard"
PLOT_FILES = ("loss.png", "lr.png")  # metrics/plots.py plot_run
TB_PREFIX = "events.out.tfevents."  # TensorBoard's SummaryWriter file names
STEP_PREFIX = "step-"  # checkpoint/manager.py and paramserver/checkpoint.py


def is_scaletrain_run(d: Path) -> bool:
    """True if `d/config.toml` is a resolved scaletrain config: only scaletrain's
    sections, [run] and [train] among them."""
    try:
        data = tomllib.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    known = set(sections())
    return {"run", "train"} <= set(data) and set(data) <= known and \
        all(isinstance(v, dict) for v in data.values())


def has_checkpoint(d: Path) -> bool:
    """True if `d/checkpoints/` holds a completed (renamed) checkpoint directory."""
    root = d / CKPT_DIR
    return root.is_dir() and any(
        p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()
        for p in root.iterdir())


def resumes_in_place(cfg) -> bool:
    """True if `train` resumes run.dir from its own checkpoint: the run's config.toml is
    the config's base (train/resume_config.py) and a checkpoint replaces every weight,
    so a fine-tune needs nothing from its init.from any more (issue 13 item 7)."""
    d = Path(cfg.run.dir)
    return bool(cfg.run.dir.strip()) and not cfg.run.overwrite and has_checkpoint(d) \
        and (d / CONFIG_FILE).is_file()


def outputs_in(d: Path) -> list[str]:
    """The names of what training writes that `d` already holds."""
    found = [n for n in OUTPUT_FILES if (d / n).exists()]
    found += [f"{n}/" for n in (CKPT_DIR, PLOTS_DIR, TB_DIR)
              if (d / n).is_dir() and any((d / n).iterdir())]
    return found


def check_run_dir(cfg) -> Path:
    """Refuse a run directory training must not use (one ConfigError line); creates
    nothing (`make_run_dir` does, once every other check has passed).

    Called before any data is prepared (cli/train.py) and again by the trainer's rank 0."""
    raw = cfg.run.dir
    if not raw.strip():
        raise ConfigError("run.dir is empty: name the directory to train into "
                          "(e.g. --run.dir=runs/demo)")
    d = Path(raw)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"run.dir '{d}' exists and is not a directory")
    if d.is_dir():
        if cfg.run.overwrite:
            if any(d.iterdir()) and not is_scaletrain_run(d):
                raise ConfigError(f"run.overwrite=true but run.dir '{d}' is not a scaletrain "
                                  f"run (no {CONFIG_FILE} of one) and is not empty; nothing "
                                  "was deleted: choose a new or empty run.dir")
        elif not has_checkpoint(d):
            found = outputs_in(d)
            if found:
                raise ConfigError(f"run.dir '{d}' holds {', '.join(found)} but no checkpoint "
                                  "to resume from; training would overwrite them: set "
                                  "run.overwrite=true to start afresh or choose a new run.dir")
    return d


def make_run_dir(d: Path) -> Path:
    """Create run directory `d` (and its parents); one ConfigError line if it cannot be."""
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.dir '{d}': cannot create the directory "
                          f"({e.strerror or e})") from None
    return d


def clear_run_outputs(d: Path) -> None:
    """Remove what training wrote into run directory `d` (run.overwrite=true), only that:
    other files and folders the user keeps there stay."""
    for name in OUTPUT_FILES:
        (d / name).unlink(missing_ok=True)
    ckpts = d / CKPT_DIR
    if ckpts.is_dir():  # step-XXXXXXXX, and the .tmp / .old of an interrupted save
        for p in ckpts.iterdir():
            if p.name.startswith(STEP_PREFIX):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    for sub, keep in ((PLOTS_DIR, lambda n: n not in PLOT_FILES),
                      (TB_DIR, lambda n: not n.startswith(TB_PREFIX))):
        if (d / sub).is_dir():
            for p in (d / sub).iterdir():
                if p.is_file() and not keep(p.name):
                    p.unlink()
    for sub in (CKPT_DIR, PLOTS_DIR, TB_DIR):  # now-empty folders go too
        try:
            (d / sub).rmdir()
        except OSError:
            pass  # absent, or still holding the user's files


def prepare_run_dir(cfg: Config) -> Path:
    """Check the run directory may be trained into (`check_run_dir`), clear a run's
    outputs when asked (run.overwrite) and write the resolved config (rank 0 only)."""
    d = make_run_dir(check_run_dir(cfg))
    if cfg.run.overwrite:
        clear_run_outputs(d)
    write_atomic(d / CONFIG_FILE, dumps_toml(cfg))
    return d
