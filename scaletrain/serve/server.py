"""A small HTTP completion server (stdlib `http.server.ThreadingHTTPServer`).

    GET  /health          -> {"status": "ok", "model": ..., "params": ...}
    POST /v1/completions  {"prompt": str, "max_tokens": int, "temperature": float,
                           "top_k": int, "seed": int}
                          -> {"object": "text_completion", "choices": [{"text", ...}],
                              "usage": {...}}   (the OpenAI completions shape)

Errors are JSON `{"error": message}` with a 4xx status: 400 bad JSON, 404 unknown path,
405 wrong method, 411 no Content-Length, 413 body over `serve.max_body_bytes`, 422 a
field missing / mistyped / out of range; an unexpected failure answers 500 and the
server keeps serving. Each connection has its own thread; generation itself is
serialised by a lock (one CPU model; torch already uses every core for one request),
so concurrent requests queue and are all answered. Each request's sampling uses its own
seeded generator, so an answer does not depend on what else is being served.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from scaletrain.serve.validate import RequestError, parse_completion


class CompletionService:
    """The model side: validated request -> response dict (thread-safe)."""

    def __init__(self, model, tokenizer, cfg, name: str):
        self.model, self.tok, self.cfg, self.name = model, tokenizer, cfg, name
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        from scaletrain.compress.report import logical_params

        self.params = logical_params(model)[0]

    def complete(self, raw: bytes) -> dict:
        from scaletrain.generate import sample

        s = self.cfg.serve
        req = parse_completion(raw, max_tokens=s.max_tokens, max_prompt_chars=s.max_prompt_chars)
        prompt = self.tok.encode(req.prompt)
        gen = torch.Generator().manual_seed(req.seed)
        with self.lock:
            new = sample(self.model, prompt, max_new_tokens=req.max_tokens,
                         seq_len=self.cfg.model.seq_len, temperature=req.temperature,
                         top_k=req.top_k, generator=gen, stop_id=self.tok.eot_id)
        return {"id": f"cmpl-{next(self.ids)}", "object": "text_completion",
                "model": self.name,
                "choices": [{"index": 0, "text": self.tok.decode(new),
                             "finish_reason": "length" if len(new) == req.max_tokens
                             else "stop"}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(new),
                          "total_tokens": len(prompt) + len(new)}}


def make_handler(service: CompletionService, max_body: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "scaletrain"

        def _send(self, status: int, obj: dict, close: bool = False) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._send(200, {"status": "ok", "model": service.name,
                                 "params": service.params})
            elif self.path == "/v1/completions":
                self._send(405, {"error": "use POST for /v1/completions"})
            else:
                self._send(404, {"error": f"no such path {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/completions":
                self._send(404, {"error": f"no such path {self.path}"}, close=True)
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
            raw = self.rfile.read(n)
            try:
                self._send(200, service.complete(raw))
            except RequestError as e:
                self._send(e.status, {"error": e.message})
            except Exception as e:  # never let one request take the server down
                print(f"serve: internal error: {type(e).__name__}: {e}", file=sys.stderr)
                self._send(500, {"error": "internal error"})

        def log_message(self, fmt: str, *args) -> None:
            sys.stderr.write(f"serve: {self.address_string()} {fmt % args}\n")

    return Handler


def make_server(path: str, overrides=()) -> tuple[ThreadingHTTPServer, CompletionService]:
    """Load the artefact at `path` and bind (not yet serving)."""
    from scaletrain.compress.artefact import load_artefact
    from scaletrain.errors import UserError

    cfg, model, tok = load_artefact(path, overrides)
    if tok is None:
        raise UserError(f"'{path}' has no tokenizer.json; serve needs a text model")
    service = CompletionService(model, tok, cfg, name=str(path))
    try:
        httpd = ThreadingHTTPServer((cfg.serve.host, cfg.serve.port),
                                    make_handler(service, cfg.serve.max_body_bytes))
    except OSError as e:
        raise UserError(f"serve.host/serve.port: cannot listen on "
                        f"{cfg.serve.host}:{cfg.serve.port} ({e.strerror or e})") from None
    httpd.daemon_threads = True
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
