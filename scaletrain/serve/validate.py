"""Validation of a completion request body: every field's type and range, one message.

Kept apart from the HTTP plumbing so it can be unit-tested without sockets. A failure
raises `RequestError(status, message)`: 400 for a body that is not a JSON object (or is
nested too deeply to parse), 422 for a well-formed object with a missing, unknown,
mistyped or out-of-range field (a prompt with a lone surrogate is out of range: it is
not text the tokenizer can encode).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Completion:
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0


def _int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(422, f"'{key}' must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise RequestError(422, f"'{key}' must be in [{lo}, {hi}], got {v}")
    return v


def parse_completion(raw: bytes, *, max_tokens: int, max_prompt_chars: int) -> Completion:
    """Bytes of a POST /v1/completions body -> Completion, or RequestError."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"body is not valid UTF-8 JSON ({e})") from None
    except RecursionError:  # json's parser recurses per nesting level ([[[[...]]]])
        raise RequestError(400, "body is nested too deeply to be a completion request"
                           ) from None
    if not isinstance(body, dict):
        raise RequestError(400, "body must be a JSON object")
    unknown = sorted(set(body) - {"prompt", "max_tokens", "temperature", "top_k", "seed"})
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}")
    if "prompt" not in body:
        raise RequestError(422, "'prompt' is required")
    prompt = body["prompt"]
    if not isinstance(prompt, str):
        raise RequestError(422, f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt:
        raise RequestError(422, "'prompt' must not be empty")
    try:  # JSON may escape a lone surrogate ("\ud800"): valid JSON, not valid text
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(422, f"'prompt' is not valid Unicode text (lone surrogate "
                                f"U+{ord(prompt[e.start]):04X} at character {e.start})"
                           ) from None
    if len(prompt) > max_prompt_chars:
        raise RequestError(422, f"'prompt' is {len(prompt)} characters, more than "
                                f"{max_prompt_chars}")
    t = body.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise RequestError(422, "'temperature' must be a finite number")
    if not 0 <= t <= 100:
        raise RequestError(422, f"'temperature' must be in [0, 100], got {t}")
    return Completion(prompt=prompt, max_tokens=_int(body, "max_tokens", 16, 1, max_tokens),
                      temperature=float(t), top_k=_int(body, "top_k", 0, 0, 1 << 20),
                      seed=_int(body, "seed", 0, 0, 2**63 - 1))
