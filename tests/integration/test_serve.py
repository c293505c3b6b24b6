"""`scaletrain serve` as a subprocess, exercised by a real HTTP client (urllib):
concurrent completions, health, and malformed / oversized requests -> 4xx, no crash."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import REPO, run_cli

TIMEOUT = 60  # seconds for any one request or for the server to start


@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_dir):
    from tests.conftest import TINY_DATA, TINY_GPT

    run = tmp_path_factory.mktemp("serve") / "run"
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                   f"--run.dir={run}", "--train.steps=5", "--eval.test=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    srv = subprocess.Popen([sys.executable, "-m", "scaletrain", "serve", str(run),
                            "--serve.port=0", "--serve.max_tokens=32",
                            "--serve.max_body_bytes=2048"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(srv.stdout.readline()), daemon=True).start()
    try:
        first = lines.get(timeout=TIMEOUT)
    except queue.Empty:
        srv.kill()
        pytest.fail("server did not start")
    assert first.startswith("serving "), (first, srv.stderr.read() if srv.poll() else "")
    url = first.split(" on ")[1].strip()
    yield url, srv
    srv.terminate()
    try:
        srv.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        srv.kill()
        pytest.fail("server did not stop on SIGTERM")


def call(url: str, path: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url + path, data=body, headers=headers or {},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(url: str, **fields):
    return call(url, "/v1/completions", json.dumps(fields).encode(),
                {"Content-Type": "application/json"})


def test_health(server):
    status, body = call(server[0], "/health")
    assert status == 200 and body["status"] == "ok" and body["params"] > 0


def test_concurrent_requests_are_all_answered_correctly(server):
    url, _ = server
    reqs = [dict(prompt="def ", max_tokens=12, temperature=0, seed=i) for i in range(4)] + \
        [dict(prompt="import ", max_tokens=8, temperature=0.9, top_k=20, seed=i % 2)
         for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: complete(url, **r), reqs))
    assert all(status == 200 for status, _ in results), results
    texts = [body["choices"][0]["text"] for _, body in results]
    assert len(set(texts[:4])) == 1  # greedy ignores the seed: one answer
    assert texts[4] == texts[6] and texts[5] == texts[7]  # same seed, same sample
    for (_, body), r in zip(results, reqs):
        u = body["usage"]
        assert 1 <= u["completion_tokens"] <= r["max_tokens"] and u["prompt_tokens"] >= 1
        assert body["object"] == "text_completion"
    # Same request alone gives the same answer as under concurrency.
    assert complete(url, **reqs[5])[1]["choices"][0]["text"] == texts[5]


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (b'{"prompt": 3}', 422),
    (b'{"prompt": "x", "max_tokens": 1000}', 422),
    (b'{"prompt": "x", "max_tokens": "5"}', 422),
    (b'{"prompt": "x", "temperature": -2}', 422),
    (b'{"max_tokens": 3}', 422),
    (b'{"prompt": "' + b"x" * 4000 + b'"}', 413),
])
def test_bad_requests_get_4xx_and_the_server_lives(server, body, status):
    url, srv = server
    got, payload = call(url, "/v1/completions", body, {"Content-Type": "application/json"})
    assert got == status and "error" in payload
    assert srv.poll() is None
    assert call(url, "/health")[0] == 200


def test_unknown_paths_and_methods(server):
    url, _ = server
    assert call(url, "/nope")[0] == 404
    assert call(url, "/v1/completions")[0] == 405
    assert call(url, "/nope", b"{}")[0] == 404
