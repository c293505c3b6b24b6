"""A Weights & Biases metric sink: every record logged to one W&B run (the tags of
`scalar_fields`, plotted against the record's `step`), the resolved config as the run's
config, and at the end summary.json, config.toml and plots/*.png saved with it.

Offline mode writes the run under `<run.dir>/wandb/offline-run-*` for a later `wandb
sync`; a resumed training run passes the id it saved (metrics/trackers.py) with
resume="allow", so the synced run is one run.
"""

from __future__ import annotations

from pathlib import Path

from scaletrain.metrics.sinks import scalar_fields

STEP = "step"  # the x-axis of every chart: the record's optimizer step


class WandbSink:
    def __init__(self, project: str, mode: str, run_dir: Path, *, run_id: str,
                 config: dict | None):
        import wandb  # optional dependency: scaletrain[wandb]

        self.run_dir = Path(run_dir)
        self.run = wandb.init(project=project, dir=str(self.run_dir), id=run_id,
                              resume="allow", mode=mode, name=self.run_dir.name,
                              config=config,
                              settings=wandb.Settings(silent=True, console="off"))
        # Records come at the run's own steps (eval at step 0, faults, a resume that
        # repeats steps): W&B's internal _step must only grow, so charts use "step".
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)

    def write(self, record: dict) -> None:
        self.run.log({STEP: int(record["step"]), **scalar_fields(record)})

    def close(self) -> None:
        for name in ("summary.json", "config.toml"):
            if (self.run_dir / name).is_file():
                self.run.save(str(self.run_dir / name), base_path=str(self.run_dir),
                              policy="now")
        for png in sorted((self.run_dir / "plots").glob("*.png")):
            self.run.save(str(png), base_path=str(self.run_dir), policy="now")
        self.run.finish()
