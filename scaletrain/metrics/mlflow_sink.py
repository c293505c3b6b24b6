"""An MLflow metric sink: every record as metrics of one MLflow run (the tags of
`scalar_fields`, at the record's step), the resolved config as its parameters, and at
the end summary.json, config.toml and plots/*.png as its artefacts.

Uses `MlflowClient` with an explicit run id rather than `mlflow.start_run`'s global
active run: the sink owns its run, and a resumed training run passes the id it saved
(metrics/trackers.py) to continue the same MLflow run.
"""

from __future__ import annotations

import time
from pathlib import Path

from scaletrain.metrics.sinks import scalar_fields

# MLflow's own limits on one log_batch call (mlflow.utils.validation).
_MAX_METRICS, _MAX_PARAMS, _MAX_PARAM_CHARS = 1000, 100, 6000


def tracking_uri(uri: str) -> tuple[str, str | None]:
    """`metrics.mlflow_uri` -> (tracking URI, artefact location for a new experiment or
    None for the server's). A plain directory becomes an SQLite store inside it (MLflow
    3 keeps its file store in maintenance mode and refuses it by default)."""
    if "://" in uri or uri.startswith("databricks"):
        return uri, None
    root = Path(uri).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


class MlflowSink:
    def __init__(self, uri: str, experiment: str, run_dir: Path, *, run_id: str | None,
                 params: dict[str, str]):
        """A new MLflow run named after the run directory with `params` logged, or,
        with `run_id`, the run a previous session of this training started (resume)."""
        # Optional dependency (scaletrain[mlflow]): imported when a sink is asked for.
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric

        self.run_dir = Path(run_dir)
        store, artifacts = tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=store)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifacts)
        run = self.client.create_run(exp_id, run_name=self.run_dir.name,
                                     tags={"scaletrain.run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        items = [Param(k, v[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[i:i + _MAX_PARAMS])

    def write(self, record: dict) -> None:
        now, step = int(time.time() * 1000), int(record["step"])
        metrics = [self._metric(k, v, now, step) for k, v in scalar_fields(record).items()]
        for i in range(0, len(metrics), _MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _MAX_METRICS])

    def close(self) -> None:
        """The run's files as artefacts (those that exist: a stopped run has no
        summary yet), then the MLflow run ends FINISHED (a resume reopens it)."""
        for name in ("summary.json", "config.toml"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        if (self.run_dir / "plots").is_dir():
            self.client.log_artifacts(self.run_id, str(self.run_dir / "plots"), "plots")
        self.client.set_terminated(self.run_id, status="FINISHED")
