"""A real prediction endpoint for the tests: the builtin digits CNN behind a ThreadingHTTPServer on
127.0.0.1 (an ephemeral port), speaking the request/response format of harness/sources/endpoint.py,
with an optional bearer token, failures before it answers, and throttling. Stopped by the context."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Optional

import numpy as np
import torch


class Served:
    """What the server saw: request arrival times and the images it scored."""

    def __init__(self, model: torch.nn.Module, token: Optional[str], fail_first: int, retry_after: Optional[str],
                 throttle_after: Optional[int]) -> None:
        self.model, self.token, self.fail_first, self.retry_after, self.throttle_after = model, token, fail_first, retry_after, throttle_after
        self.arrivals: list[float] = []
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
                served.arrivals.append(time.monotonic())
                count = len(served.arrivals)
            if served.token is not None and self.headers.get("Authorization") != f"Bearer {served.token}":
                return self._send(401, {"error": "bad credentials"})
            if count <= served.fail_first:
                return self._send(503, {"error": "warming up"}, {"Retry-After": served.retry_after} if served.retry_after else None)
            if served.throttle_after is not None and count > served.throttle_after:
                return self._send(429, {"error": "too many requests"}, {"Retry-After": "1"})
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
          throttle_after: Optional[int] = None) -> Iterator[Served]:
    served = Served(model, token, fail_first, retry_after, throttle_after)
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
