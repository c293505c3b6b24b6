"""JSON encoding shared by `metrics.jsonl` and `summary.json`.

Two problems the standard library leaves to us:

* ``json.dumps(float("nan"))`` writes ``NaN``, which is not JSON (RFC 8259) and breaks
  strict readers (``jq``, JavaScript, pandas with some engines). A diverged run logs
  NaN losses, so this is not hypothetical. We write non-finite floats as the strings
  ``"nan"``, ``"inf"`` and ``"-inf"`` and turn them back into floats on reading.
* numpy scalars (``np.float32``) and 0-d tensors are not JSON serialisable; trainers
  routinely hand them over, so we unwrap them with ``.item()``.

Finite floats keep full precision: ``json`` formats them with ``float.__repr__``, the
shortest string that reads back to the identical double (DESIGN.md §3).
"""

from __future__ import annotations

import math
from typing import Any

# The exact strings written for non-finite floats, mapped back by `from_jsonable`.
_STR_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _float_to_json(x: float) -> float | str:
    if math.isfinite(x):
        return float(x)  # np.float64 -> float: same repr, but plain type
    if math.isnan(x):
        return "nan"
    return "inf" if x > 0 else "-inf"


def to_jsonable(value: Any) -> Any:
    """Return `value` with non-finite floats as strings and numpy/torch scalars unwrapped.

    Containers (dict, list, tuple) are converted recursively; dict keys become strings.
    Anything else that has ``.item()`` (numpy scalar, one-element tensor) is unwrapped.
    Other objects are returned unchanged and left to ``json`` to accept or reject.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return _float_to_json(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return to_jsonable(item())
        except (ValueError, RuntimeError):  # multi-element array / tensor
            pass
    return value


def from_jsonable(value: Any) -> Any:
    """Inverse of :func:`to_jsonable` for what it changed: ``"nan"``/``"inf"``/``"-inf"``
    strings become floats again (recursively through dicts and lists)."""
    if isinstance(value, str):
        return _STR_TO_NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value
