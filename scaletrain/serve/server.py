"""A small HTTP completion server (stdlib `http.server`, one thread per connection).

    GET  /health          -> {"status": "ok", "model": ..., "params": ...,
                              "connections": open now, "max_connections": ...}
    POST /v1/completions  {"prompt": str, "max_tokens": int, "temperature": float,
                           "top_k": int, "seed": int}
                          -> {"object": "text_completion", "choices": [{"text", ...}],
                              "usage": {...}}   (the OpenAI completions shape)

Every answer is JSON; errors are `{"error": message}`: 400 bad or too deeply nested
JSON, 404 unknown path, 405 a method the path does not take (with `Allow`; HEAD, PUT,
DELETE, OPTIONS, ... included), 411 no Content-Length, 413 body over
`serve.max_body_bytes`, 422 a field missing / mistyped / out of range, 501 a method
HTTP does not define, 503 more than `serve.max_connections` connections open; an
unexpected failure answers 500 and the server keeps serving. A connection silent for
`serve.read_timeout_s` is closed (serve/transport.py has both bounds). Generation is
serialised by a lock (one CPU model; torch already uses every core for one request),
so concurrent requests queue and are all answered. Each request's sampling uses its own
seeded generator, so an answer does not depend on what else is being served.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler

import torch

from scaletrain.compress.artefact import load_artefact
from scaletrain.compress.report import logical_params
from scaletrain.errors import UserError
from scaletrain.generate import sample
from scaletrain.models.registry import spec_of
from scaletrain.serve.transport import BoundedHTTPServer
from scaletrain.serve.validate import RequestError, parse_completion


class CompletionService:
    """The model side: validated request -> response dict (thread-safe)."""

    def __init__(self, model, tokenizer, cfg, name: str):
        self.model, self.tok, self.cfg, self.name = model, tokenizer, cfg, name
        self.lock = threading.Lock()
        self.ids = itertools.count(1)

        spec = spec_of(cfg.model)
        self.params = logical_params(model, spec.tied)[0]
        self.decode = spec.decode  # the family's KV-cache forward (generate.py)

    def complete(self, raw: bytes) -> dict:
        s = self.cfg.serve
        req = parse_completion(raw, max_tokens=s.max_tokens, max_prompt_chars=s.max_prompt_chars)
        prompt = self.tok.encode(req.prompt)
        gen = torch.Generator().manual_seed(req.seed)
        with self.lock:
            new = sample(self.model, prompt, max_new_tokens=req.max_tokens,
                         seq_len=self.cfg.model.seq_len, temperature=req.temperature,
                         top_k=req.top_k, generator=gen, stop_id=self.tok.eot_id,
                         decode=self.decode)
        return {"id": f"cmpl-{next(self.ids)}", "object": "text_completion",
                "model": self.name,
                "choices": [{"index": 0, "text": self.tok.decode(new),
                             "finish_reason": "length" if len(new) == req.max_tokens
                             else "stop"}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(new),
                          "total_tokens": len(prompt) + len(new)}}


ROUTES = {"/health": "GET", "/v1/completions": "POST"}
"""Path -> its one method; any other method there is 405 with `Allow`."""


def make_handler(service: CompletionService, max_body: int, read_timeout_s: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "scaletrain"
        timeout = read_timeout_s  # per recv/send on the socket (serve/transport.py)

        def _send(self, status: int, obj: dict, close: bool = False,
                  headers: dict | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":  # a HEAD response has headers only (RFC 9110)
                self.wfile.write(body)

        def send_error(self, code: int, message: str | None = None,
                       explain: str | None = None) -> None:
            """http.server's own errors (bad request line, header too long, unknown
            method: 501) as JSON like every other answer, instead of its HTML page."""
            self._send(code, {"error": message or self.responses.get(code, ("error",))[0]},
                       close=True)

        def _route(self) -> bool:
            """True if this path takes this method; else answers 404 / 405 (+ Allow).
            The connection is closed: an unread body must not be parsed as a request."""
            allowed = ROUTES.get(self.path)
            if allowed is None:
                self._send(404, {"error": f"no such path {self.path}"}, close=True)
                return False
            if self.command != allowed:
                self._send(405, {"error": f"use {allowed} for {self.path}"}, close=True,
                           headers={"Allow": allowed})
                return False
            return True

        def _not_allowed(self) -> None:
            self._route()  # never True: no path takes these methods

        do_HEAD = do_PUT = do_DELETE = do_OPTIONS = do_PATCH = do_TRACE = do_CONNECT = \
            _not_allowed  # noqa: N815 (http.server's naming)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self._route():
                self._send(200, {"status": "ok", "model": service.name,
                                 "params": service.params,
                                 "connections": self.server.open_connections,
                                 "max_connections": self.server.max_connections})

        def do_POST(self) -> None:  # noqa: N802
            if not self._route():
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.strip().isdigit():
                self._send(411, {"error": "a numeric Content-Length is required"}, close=True)
                return
            n = int(length)
            if n > max_body:
                # Not read: closing the connection discards it.
                self._send(413, {"error": f"body of {n} bytes exceeds {max_body}"},
                           close=True)
                return
            raw = self.rfile.read(n)  # TimeoutError if the client stalls: one log line
            try:
                status, answer = 200, service.complete(raw)
            except RequestError as e:
                status, answer = e.status, {"error": e.message}
            except Exception as e:  # never let one request take the server down
                print(f"serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
                status, answer = 500, {"error": "internal error"}
            # Outside the try: a client that has gone away is the transport's to log.
            self._send(status, answer)

        def log_message(self, fmt: str, *args) -> None:
            sys.stderr.write(f"serve: {self.address_string()} {fmt % args}\n")

    return Handler


def make_server(path: str, overrides=()) -> tuple[BoundedHTTPServer, CompletionService]:
    """Load the artefact at `path` and bind (not yet serving)."""
    cfg, model, tok = load_artefact(path, overrides)
    if tok is None:
        raise UserError(f"'{path}' has no tokenizer.json; serve needs a text model")
    service = CompletionService(model, tok, cfg, name=str(path))
    s = cfg.serve
    try:
        httpd = BoundedHTTPServer((s.host, s.port),
                                  make_handler(service, s.max_body_bytes, s.read_timeout_s),
                                  max_connections=s.max_connections)
    except OSError as e:
        raise UserError(f"serve.host/serve.port: cannot listen on "
                        f"{s.host}:{s.port} ({e.strerror or e})") from None
    return httpd, service


def serve(path: str, overrides=()) -> None:
    """Serve until interrupted; prints the URL (with the real port) first."""
    import signal

    httpd, _ = make_server(path, overrides)
    host, port = httpd.server_address[:2]
    print(f"serving {path} on http://{host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown).start())
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
