"""Completion request validation (serve/validate.py)."""

from __future__ import annotations

import json

import pytest

from scaletrain.serve.validate import RequestError, parse_completion


def parse(body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_completion(raw, max_tokens=32, max_prompt_chars=100)


def test_defaults_and_values():
    c = parse({"prompt": "def f", "max_tokens": 5, "temperature": 0, "top_k": 3, "seed": 9})
    assert (c.prompt, c.max_tokens, c.temperature, c.top_k, c.seed) == ("def f", 5, 0.0, 3, 9)
    assert parse({"prompt": "x"}).max_tokens == 16
    assert parse(b'{"prompt": "\\ud83d\\ude00"}').prompt == "\U0001F600"  # a pair is text


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "JSON"),
    (b"\xff\xfe", 400, "UTF-8"),
    ([1, 2], 400, "object"),
    ({}, 422, "'prompt' is required"),
    ({"prompt": 5}, 422, "'prompt' must be a string"),
    ({"prompt": ""}, 422, "empty"),
    ({"prompt": "x" * 101}, 422, "101 characters"),
    ({"prompt": "x", "max_tokens": "3"}, 422, "'max_tokens' must be an integer"),
    ({"prompt": "x", "max_tokens": True}, 422, "'max_tokens' must be an integer"),
    ({"prompt": "x", "max_tokens": 33}, 422, "[1, 32]"),
    ({"prompt": "x", "max_tokens": 0}, 422, "[1, 32]"),
    ({"prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ({"prompt": "x", "top_k": 1.5}, 422, "top_k"),
    ({"prompt": "x", "seed": -1}, 422, "seed"),
    ({"prompt": "x", "stream": True}, 422, "unknown field"),
    (b'{"prompt": "a\\ud800b"}', 422, "lone surrogate U+D800 at character 1"),
    (b'{"prompt": "\\udfff"}', 422, "lone surrogate U+DFFF"),
    (b"[" * 30000 + b"]" * 30000, 400, "nested too deeply"),
    (b'{"prompt": "x", "seed": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400, "nested too"),
])
def test_bad_requests(body, status, fragment):
    with pytest.raises(RequestError) as e:
        parse(body)
    assert e.value.status == status and fragment in e.value.message
