"""The experiment trackers of a run (`[metrics]`: MLflow, Weights & Biases): checked
before launch, built on the main rank beside metrics.jsonl and TensorBoard.

The run's tracker ids live in `<run.dir>/trackers.json`, written when a tracker run is
first created; a resumed training run (the same run directory) finds it and continues
the same MLflow run and W&B run instead of starting new ones. `run.overwrite` removes it
with the rest of the run, so an overwritten run starts new tracker runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from scaletrain.errors import ConfigError
from scaletrain.metrics.summary import write_json_atomic
from scaletrain.metrics.mlflow_sink import MlflowSink
from scaletrain.metrics.wandb_sink import WandbSink

IDS_FILE = "trackers.json"
_PROBE_TIMEOUT_S = 10.0
WANDB_URL = "https://api.wandb.ai"  # wandb's default base_url (WANDB_BASE_URL overrides it)


def wandb_mode(m) -> str:
    """'online' / 'offline' from metrics.wandb_mode ('auto': online with an API key)."""
    if m.wandb_mode != "auto":
        return m.wandb_mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def check_trackers(m) -> None:
    """One line (ConfigError) before any compute for a tracker that cannot work: its
    package is missing, its server does not answer (MLflow's tracking server; W&B's,
    online), W&B online without a login."""
    if m.mlflow:
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError("metrics.mlflow=true needs the mlflow package: pip install "
                              "'scaletrain[mlflow]'")
        uri = m.mlflow_uri
        if uri.startswith(("http://", "https://")):
            try:  # an MLflow tracking server answers GET /health with "OK"
                with urllib.request.urlopen(uri.rstrip("/") + "/health",
                                            timeout=_PROBE_TIMEOUT_S) as r:
                    r.read()
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise ConfigError(f"metrics.mlflow_uri={uri}: no MLflow tracking server "
                                  f"answers there ({reason})") from None
    if m.wandb_project:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"metrics.wandb_project={m.wandb_project!r} needs the wandb "
                              "package: pip install 'scaletrain[wandb]'")
        if wandb_mode(m) == "online" and not os.environ.get("WANDB_API_KEY"):
            netrc = Path.home() / ".netrc"
            if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")):
                raise ConfigError("metrics.wandb_mode='online' needs a W&B login "
                                  "(WANDB_API_KEY or `wandb login`); use 'offline' and "
                                  "`wandb sync` later")
        if wandb_mode(m) == "online":
            _probe_wandb(os.environ.get("WANDB_BASE_URL") or WANDB_URL)


def _probe_wandb(url: str) -> None:
    """ConfigError unless the W&B server at `url` answers: any HTTP reply, even an
    error status (the API root answers 404 to a bare GET), means it can be reached;
    no reply within the timeout (no network, a wrong WANDB_BASE_URL) means wandb.init
    would fail or hang later, after the run has started."""
    try:
        with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT_S) as r:
            r.read(1)
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"metrics.wandb_mode='online': no W&B server answers at {url} "
                          f"({reason}); use --metrics.wandb_mode=offline and `wandb sync` "
                          f"later") from None


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """{"section": {"key": v}} -> {"section.key": "v"}: the config as tracker params."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def tracker_sinks(m, run_dir: Path, config: dict) -> list:
    """The tracker sinks `m` (the `[metrics]` section) asks for, continuing the tracker
    runs recorded in `run_dir/trackers.json` (a resume) or starting new ones and
    recording them. `config`: the resolved config as nested dicts. Main rank only."""
    if not m.mlflow and not m.wandb_project:
        return []
    path = Path(run_dir) / IDS_FILE
    ids = json.loads(path.read_text()) if path.is_file() else {}
    sinks = []
    if m.mlflow:
        saved = ids.get("mlflow", {})
        same = saved.get("uri") == m.mlflow_uri
        sink = MlflowSink(m.mlflow_uri, m.mlflow_experiment, run_dir,
                          run_id=saved.get("run_id") if same else None,
                          params=flat_params(config))
        ids["mlflow"] = {"uri": m.mlflow_uri, "run_id": sink.run_id}
        sinks.append(sink)
    if m.wandb_project:
        saved = ids.get("wandb", {})
        resumed = saved.get("project") == m.wandb_project
        # W&B run ids: up to 64 letters and digits; 8 hex digits, as wandb makes them
        run_id = saved["id"] if resumed else uuid.uuid4().hex[:8]
        sinks.append(WandbSink(m.wandb_project, wandb_mode(m), run_dir, run_id=run_id,
                               config=None if resumed else config))
        ids["wandb"] = {"project": m.wandb_project, "id": run_id}
    write_json_atomic(path, ids)
    return sinks
