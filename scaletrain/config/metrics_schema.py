"""The `[metrics]` section: the experiment trackers a run reports to, beside
metrics.jsonl and TensorBoard (which every run writes)."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.fields import F


@dataclass
class MetricsConfig:
    mlflow: bool = F(False, "Report the run to MLflow (needs `pip install "
                     "'scaletrain[mlflow]'`): every metrics.jsonl record, the resolved "
                     "config as parameters, summary / config / plots as artefacts.")
    mlflow_uri: str = F("mlruns", "Where MLflow keeps the run: a local directory (an SQLite "
                        "store mlflow.db and the artefacts; `mlflow ui --backend-store-uri "
                        "sqlite:///mlruns/mlflow.db` shows it), or a tracking URI with a "
                        "scheme (http://host:port of an `mlflow server`, sqlite:///...).")
    mlflow_experiment: str = F("scaletrain", "MLflow experiment the run is logged under.")
    wandb_project: str = F("", "Report the run to this Weights & Biases project (needs "
                           "`pip install 'scaletrain[wandb]'`); '' = off.")
    wandb_mode: str = F("auto", "W&B mode: 'online', 'offline' (files under "
                        "<run.dir>/wandb, uploaded later with `wandb sync`), or 'auto' "
                        "(online when WANDB_API_KEY is set, else offline).",
                        choices=("auto", "online", "offline"))
