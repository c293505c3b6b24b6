"""The 'digits' image source: scikit-learn's bundled 8x8 handwritten digits (offline).

1797 grey images of 0-16 intensities, 10 classes — small enough to train an MLP or CNN
on a CPU in seconds, which makes it the image counterpart of the python-stdlib corpus.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from scaletrain.config.schema import DataConfig
from scaletrain.data.cache import build_cached, cache_key
from scaletrain.data.clean import check_fractions

DIGITS = "digits"
SPLIT_SEED = 0
"""Seed of the train/val/test permutation: fixed, not train.seed, so every run with the
same fractions evaluates on the same images."""
NPZ = "digits.npz"


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test): rounded fractions of n, at least 1 when the fraction is > 0."""
    def size(f: float) -> int:
        return max(1, round(n * f)) if f > 0 else 0
    return size(val_fraction), size(test_fraction)


def prepare_digits(dcfg: DataConfig, *, progress: bool) -> Path:
    """Prepare the digits into `<prepared_dir>/digits-<key[:12]>/digits.npz` unless cached.

    The npz holds x_{train,val,test} (N, 1, 8, 8) float32, y_* (N,) int64 and idx_* (the
    rows of `load_digits()` each split took). Pixels are standardised with one scalar
    mean and std computed on the train split only, so no statistic of val/test leaks into
    training. A scalar (not per-pixel) statistic, because several border pixels are zero
    in almost every image and a per-pixel std would blow their rare values up.
    `progress` is accepted for symmetry with text; there is nothing slow to show.
    """
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    check_fractions(dcfg.val_fraction, dcfg.test_fraction)
    d = load_digits()
    x = np.asarray(d.images, dtype=np.float32)  # (1797, 8, 8)
    y = np.asarray(d.target, dtype=np.int64)
    inputs = {"sha256": hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest(),
              "n": int(len(y))}
    settings = {"kind": "image", "dataset": DIGITS, "val_fraction": dcfg.val_fraction,
                "test_fraction": dcfg.test_fraction, "split_seed": SPLIT_SEED,
                "normalise": "scalar-train"}
    key = cache_key(inputs, settings)
    final = Path(dcfg.prepared_dir) / f"{DIGITS}-{key[:12]}"

    def build(out: Path) -> dict:
        n = len(y)
        n_val, n_test = _split_sizes(n, dcfg.val_fraction, dcfg.test_fraction)
        perm = np.random.default_rng(SPLIT_SEED).permutation(n)
        # Sorted within a split: the loader shuffles, and sorted rows are easier to trace.
        idx = {"val": np.sort(perm[:n_val]), "test": np.sort(perm[n_val:n_val + n_test]),
               "train": np.sort(perm[n_val + n_test:])}
        train = x[idx["train"]].astype(np.float64)
        mean, std = float(train.mean()), float(train.std())
        arrays = {}
        for s, ix in idx.items():
            arrays[f"x_{s}"] = ((x[ix] - mean) / std).astype(np.float32)[:, None]
            arrays[f"y_{s}"] = y[ix]
            arrays[f"idx_{s}"] = ix.astype(np.int64)
        np.savez(out / NPZ, **arrays)
        return {
            "kind": "image",
            "source": DIGITS,
            "settings": settings,
            "splits": {s: {"samples": int(len(ix))} for s, ix in idx.items()},
            "mean": mean,
            "std": std,
            "num_classes": 10,
            "input_shape": [1, 8, 8],
            "file": NPZ,
        }

    return build_cached(final, key, build)


def load_digits_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a prepared digits dir, read fully (the file is ~0.5 MB)."""
    with np.load(Path(path) / NPZ) as z:
        return {k: z[k] for k in z.files}
