"""The connection side of the server: a bounded number of threads, quiet disconnects.

`ThreadingHTTPServer` starts one thread per accepted connection with no limit, and a
client that connects and then sends nothing holds its thread forever (1,400 stalled
clients held 1,400 threads). Two bounds fix that:

- a read timeout (`serve.read_timeout_s`): the handler's socket timeout
  (`StreamRequestHandler.timeout`, applied by `setup()` to every recv and send), so a
  connection that goes silent mid-request, or idles between keep-alive requests, is
  closed; `BaseHTTPRequestHandler` catches the `TimeoutError` and logs one line;
- a bound on open connections (`serve.max_connections`): one more connection is
  answered 503 at once, from the accepting thread, and closed — the client learns
  that the server is busy instead of waiting in a queue behind stalled sockets.

A client that disconnects (reset, broken pipe) or times out while its response is being
written is logged as one line, not socketserver's traceback: it is the client's doing,
not a server error. Any other exception keeps its traceback.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from http.server import ThreadingHTTPServer

# Failures that mean "the client went away or went silent", not a bug in the server.
CLIENT_GONE = (ConnectionError, TimeoutError)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server holding at most `max_connections` connections open."""

    daemon_threads = True  # a stalled client never delays shutdown
    # Listen backlog (socketserver's default is 5): a burst of connections is accepted
    # and answered (200 or 503) instead of having its SYNs dropped and retried.
    request_queue_size = 128

    def __init__(self, address, handler, max_connections: int):
        self.max_connections = max_connections
        self.open_connections = 0
        self._count_lock = threading.Lock()
        super().__init__(address, handler)

    def _take_slot(self) -> bool:
        with self._count_lock:
            if self.open_connections >= self.max_connections:
                return False
            self.open_connections += 1
            return True

    def _free_slot(self) -> None:
        with self._count_lock:
            self.open_connections -= 1

    def process_request(self, request, client_address) -> None:
        """Runs in the accepting thread: a slot and a handler thread, or a 503."""
        if not self._take_slot():
            self._refuse(request, client_address)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._free_slot()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._free_slot()

    def _refuse(self, sock: socket.socket, client_address) -> None:
        body = json.dumps({"error": f"server busy: {self.max_connections} connections "
                                    f"open (serve.max_connections); retry later"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            sock.settimeout(1.0)  # a fresh socket's send buffer takes ~200 bytes at once
            sock.sendall(head.encode() + body)
            # Read what the client already sent: closing a socket with unread data
            # sends a reset, which can destroy the 503 before the client reads it.
            sock.setblocking(False)
            sock.recv(65536)
        except OSError:  # BlockingIOError (nothing sent yet) or the client is gone
            pass
        sys.stderr.write(f"serve: {client_address[0]}:{client_address[1]} refused, "
                         f"{self.max_connections} connections open\n")
        self.shutdown_request(sock)

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, CLIENT_GONE):
            sys.stderr.write(f"serve: {client_address[0]}:{client_address[1]} "
                             f"disconnected ({type(exc).__name__})\n")
            return
        super().handle_error(request, client_address)  # a real bug: keep the traceback
