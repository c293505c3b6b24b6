"""`scaletrain serve` as a subprocess, exercised by a real HTTP client (urllib) and raw
sockets, all on 127.0.0.1: concurrent completions, health, malformed / oversized
requests -> 4xx, no crash; methods -> 405 + Allow; stalled clients are dropped after the
read timeout; open connections are bounded; disconnecting clients leave no traceback."""

from __future__ import annotations

import http.client
import json
import os
import queue
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import REPO, run_cli

TIMEOUT = 60  # seconds for any one request or for the server to start
READ_TIMEOUT = 2.0  # the server's serve.read_timeout_s: short, so stalls end quickly
MAX_CONNECTIONS = 10  # the server's serve.max_connections (> the 8 concurrent requests)


@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_dir):
    from tests.conftest import TINY_DATA, TINY_GPT

    run = tmp_path_factory.mktemp("serve") / "run"
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                   f"--run.dir={run}", "--train.steps=5", "--eval.test=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # stderr goes to a file that tests read (a pipe nobody drains could fill and block).
    err_path = run.parent / "serve.stderr"
    err = open(err_path, "w")
    srv = subprocess.Popen([sys.executable, "-m", "scaletrain", "serve", str(run),
                            "--serve.port=0", "--serve.max_tokens=32",
                            "--serve.max_body_bytes=65536",
                            f"--serve.read_timeout_s={READ_TIMEOUT}",
                            f"--serve.max_connections={MAX_CONNECTIONS}"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    srv.stderr_path = err_path
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(srv.stdout.readline()), daemon=True).start()
    try:
        first = lines.get(timeout=TIMEOUT)
    except queue.Empty:
        srv.kill()
        pytest.fail("server did not start")
    assert first.startswith("serving "), (first, err_path.read_text() if srv.poll() else "")
    url = first.split(" on ")[1].strip()
    yield url, srv
    srv.terminate()
    try:
        srv.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        srv.kill()
        pytest.fail("server did not stop on SIGTERM")
    finally:
        err.close()


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
    (b'{"prompt": "' + b"x" * 70000 + b'"}', 413),
    (b'{"prompt": "a\\ud800b"}', 422),  # JSON's escape of a lone surrogate: not text
    (b"[" * 30000 + b"]" * 30000, 400),  # deeper than json's recursion limit
    (b'{"prompt": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400),
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


def address(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    assert u.hostname == "127.0.0.1"  # every test talks to this machine only
    return u.hostname, u.port


def wait_until_idle(url: str) -> None:
    """Until the server holds no connection but this /health one (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        status, body = call(url, "/health")
        if status == 200 and body["connections"] == 1:
            return
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def ends_in_order_of_arrival(socks: list[socket.socket]) -> list[tuple[bytes, float]]:
    """(all bytes until EOF, seconds until the first of them arrived) of each socket,
    each timed when it becomes readable rather than when the loop reaches it."""
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        sel.register(s, selectors.EVENT_READ, i)
    t0, ends = time.monotonic(), [None] * len(socks)
    deadline = t0 + READ_TIMEOUT + 30
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            t = time.monotonic() - t0
            sel.unregister(key.fileobj)
            ends[key.data] = (read_to_eof(key.fileobj), t)
    sel.close()
    assert None not in ends, "a connection was neither answered nor closed"
    return ends


def test_tiny_temperatures_sample_greedily(server):
    url, _ = server
    greedy = complete(url, prompt="def ", max_tokens=8, temperature=0)[1]["choices"][0]
    for t in (1e-45, 1e-300, 5e-324):  # dividing fp32 logits by these gave inf/nan -> 500
        status, body = complete(url, prompt="def ", max_tokens=8, temperature=t, seed=3)
        assert status == 200, body
        assert body["choices"][0]["text"] == greedy["text"]


@pytest.mark.parametrize("method", ["HEAD", "PUT", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path, allow", [("/health", "GET"), ("/v1/completions", "POST")])
def test_other_methods_get_json_405_with_allow(server, method, path, allow):
    conn = http.client.HTTPConnection(*address(server[0]), timeout=TIMEOUT)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    assert (r.status, r.getheader("Allow")) == (405, allow)
    assert r.getheader("Content-Type") == "application/json"
    if method != "HEAD":  # a HEAD answer has no body
        assert allow in json.loads(body)["error"]


def test_stalled_clients_are_dropped_after_the_read_timeout(server):
    url, _ = server
    stalls = [b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n",  # headers never end
              b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n"
              b"\r\n{\"prompt\":"]  # the body never ends
    socks = [socket.create_connection(address(url), timeout=READ_TIMEOUT + 30)
             for _ in stalls]
    try:
        for s, data in zip(socks, stalls):
            s.sendall(data)
        t0 = time.monotonic()
        for s in socks:
            assert read_to_eof(s) == b""  # closed by the server, nothing answered
        waited = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    assert READ_TIMEOUT * 0.5 <= waited <= READ_TIMEOUT + 20, waited
    assert call(url, "/health")[0] == 200


def test_open_connections_are_bounded(server):
    url, _ = server
    wait_until_idle(url)
    extra = 3
    socks = [socket.create_connection(address(url), timeout=READ_TIMEOUT + 30)
             for _ in range(MAX_CONNECTIONS + extra)]  # none sends anything
    try:
        ends = ends_in_order_of_arrival(socks)
    finally:
        for s in socks:
            s.close()
    refused = [(data, t) for data, t in ends if data]
    held = [t for data, t in ends if not data]
    # A connection of the previous call may still hold a slot for a moment, so at least
    # `extra` are refused; never more than the bound are held.
    assert len(refused) >= extra and len(held) <= MAX_CONNECTIONS, ends
    for data, t in refused:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head, data
        assert "serve.max_connections" in json.loads(body)["error"]
        assert t < READ_TIMEOUT * 0.5  # answered at once, not after a wait
    assert all(t >= READ_TIMEOUT * 0.5 for t in held)  # dropped by the read timeout
    wait_until_idle(url)  # every slot came back


def test_disconnecting_clients_leave_no_traceback(server):
    url, srv = server
    wait_until_idle(url)
    before = len(srv.stderr_path.read_text().splitlines())
    body = json.dumps({"prompt": "def ", "max_tokens": 4}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
               % len(body)) + body
    clients = 3
    for _ in range(clients):
        s = socket.create_connection(address(url), timeout=TIMEOUT)
        s.sendall(request)
        # Linger 0: close() resets the connection, so the answer has nowhere to go.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    wait_until_idle(url)  # every handler thread has finished
    new = srv.stderr_path.read_text().splitlines()[before:]
    assert not any("Traceback" in line or "Exception" in line for line in new), new
    # At most the request's access line and one "disconnected" line per client.
    assert len([ln for ln in new if "/health" not in ln]) <= 2 * clients, new
    assert srv.poll() is None
