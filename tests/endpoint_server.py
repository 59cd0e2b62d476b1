"""A real prediction endpoint for the tests: the builtin digits CNN behind a ThreadingHTTPServer on
127.0.0.1 (an ephemeral port), speaking the request/response format of harness/sources/endpoint.py,
with an optional bearer token, failures before it answers, and a rate limiter (at most N answered
requests in any `window` seconds; past it HTTP 429 with Retry-After, or the connection dropped without
an answer). Stopped by the context."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Optional

import numpy as np
import torch


class Served:
    """What the server saw: request arrival times and the images it scored."""

    def __init__(self, model: torch.nn.Module, token: Optional[str], fail_first: int, retry_after: Optional[str],
                 limit: Optional[tuple[int, float]], drop: bool) -> None:
        self.model, self.token, self.fail_first, self.retry_after, self.limit, self.drop = model, token, fail_first, retry_after, limit, drop
        self.arrivals: list[float] = []
        self.statuses: list[int] = []  # per request, in arrival order: the HTTP status, or 0 for a dropped connection
        self.answered_at: list[float] = []
        self.images = 0
        self.lock = threading.Lock()
        self.url = ""


def _handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, code: int, body: dict, headers: Optional[dict] = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 (the http.server name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with served.lock:
                now = time.monotonic()
                served.arrivals.append(now)
                count = len(served.arrivals)
                status = 200
                if served.token is not None and self.headers.get("Authorization") != f"Bearer {served.token}":
                    status = 401
                elif count <= served.fail_first:
                    status = 503
                elif served.limit is not None:
                    most, window = served.limit
                    recent = [t for t in served.answered_at if now - t < window]
                    if len(recent) >= most:
                        status = 0 if served.drop else 429
                        wait = max(1, int(window - (now - recent[0])) + 1)
                if status == 200:
                    served.answered_at.append(now)
                served.statuses.append(status)
            if status == 401:
                return self._send(401, {"error": "bad credentials"})
            if status == 503:
                return self._send(503, {"error": "warming up"}, {"Retry-After": served.retry_after} if served.retry_after else None)
            if status == 429:
                return self._send(429, {"error": "too many requests"}, {"Retry-After": str(wait)})
            if status == 0:  # refused: the connection closes with no answer at all
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            inputs = json.loads(body)["inputs"]
            if inputs and isinstance(inputs[0], dict):
                x = np.stack([np.frombuffer(base64.b64decode(i["b64"]), dtype="<f4").reshape(i["shape"]) for i in inputs])
            else:
                x = np.asarray(inputs, dtype=np.float32)
            with torch.no_grad():
                logits = served.model(torch.from_numpy(np.ascontiguousarray(x)))
            with served.lock:
                served.images += len(x)
            self._send(200, {"outputs": logits.tolist()})

    return Handler


@contextlib.contextmanager
def serve(model: torch.nn.Module, token: Optional[str] = None, fail_first: int = 0, retry_after: Optional[str] = None,
          limit: Optional[tuple[int, float]] = None, drop: bool = False) -> Iterator[Served]:
    served = Served(model, token, fail_first, retry_after, limit, drop)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    served.url = f"http://127.0.0.1:{server.server_address[1]}/predict"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
