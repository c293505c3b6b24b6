"""Which config changes a resume accepts.

A checkpoint stores the resolved config it was saved with. Resuming under a config that
changes the *shape* of what was saved (the model, the optimizer's state layout, the
parameter dtype) or the token ids the data loader hands out would either fail deep
inside the load or, worse, silently train on something else; such changes are refused
with the list of differences. Everything else (steps to run, log/eval/checkpoint
intervals, threads, the parallel layout — DCP reshards) is allowed.
"""

from __future__ import annotations

from scaletrain.config.paths import resolved
from scaletrain.errors import CheckpointError

INCOMPATIBLE = {
    "model": ("name", "n_layer", "n_head", "d_model", "d_ff", "seq_len", "vocab_size",
              "bias", "hidden", "channels", "n_blocks"),
    "optim": ("name",),
    # These change the prepared dataset (tokenizer, documents, splits): the loader's
    # saved position would index different samples.
    "data": ("source", "mixture", "vocab_size", "val_fraction", "test_fraction", "min_chars",
             "max_files"),
}
# Incompatible fields newer than some checkpoints: a config saved before one existed
# meant its default (a checkpoint from before data.mixture trained on data.source).
ADDED_LATER = {("data", "mixture"): []}
# precision.dtype changes are compared through the parameter dtype they imply.
_PARAM_DTYPE = {"fp32": "float32", "bf16": "float32", "fp16": "float32",
                "bf16-pure": "bfloat16", "fp64": "float64"}


def differences(saved: dict, now: dict) -> list[str]:
    """'section.key: saved -> now' for each incompatible difference."""
    out = []
    for sec, keys in INCOMPATIBLE.items():
        a, b = saved.get(sec, {}), now.get(sec, {})
        for k in keys:  # a checkpoint from before paths were absolute: same meaning
            if resolved(sec, k, a.get(k, ADDED_LATER.get((sec, k)))) != \
                    resolved(sec, k, b.get(k)):
                out.append(f"{sec}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    pa = _PARAM_DTYPE.get(saved.get("precision", {}).get("dtype"))
    pb = _PARAM_DTYPE.get(now.get("precision", {}).get("dtype"))
    if pa != pb:
        out.append(f"precision.dtype: {saved['precision']['dtype']!r} -> "
                   f"{now['precision']['dtype']!r} (parameters {pa} -> {pb})")
    return out


# Where the run is and how to treat its directory this time, not how it trains: a moved
# run or a resume of a fine-tune is no "changed setting".
NOT_SETTINGS = {"run": ("dir", "overwrite"), "checkpoint": ("resume",)}


def changed_settings(saved: dict, now: dict) -> list[str]:
    """'section.key: saved -> now' for every field that differs (the allowed changes a
    resume applies from the resumed step on, e.g. optim.lr or train.steps)."""
    out = []
    for sec, table in now.items():
        old = saved.get(sec, {})
        for k, v in table.items():
            if k in old and k not in NOT_SETTINGS.get(sec, ()) and old[k] != v and not (isinstance(v, (list, tuple))
                                                 and list(old[k]) == list(v)):
                out.append(f"{sec}.{k}: {old[k]!r} -> {v!r}")
    return out


class IncompatibleCheckpoint(CheckpointError):
    """The config differs from the checkpoint's in a field that cannot change."""

    def __init__(self, message: str, saved: dict):
        super().__init__(message)
        self.saved = saved


def check_compatible(ckpt: str, saved: dict, now: dict) -> None:
    """Raise IncompatibleCheckpoint listing every incompatible difference (exit 2)."""
    diffs = differences(saved, now)
    if diffs:
        raise IncompatibleCheckpoint(
            f"cannot resume from {ckpt}: the config changed incompatibly ("
            + "; ".join(diffs) + "); use a new run.dir, set run.overwrite=true, or "
            "revert these fields", saved)
