"""`http://...` and `https://...` model sources: a deployed prediction endpoint as a black-box model.

The harness POSTs batches of images as JSON and reads one row of scores per image back:

    request   {"inputs": [IMAGE, ...]}
              IMAGE, format "list":   nested lists C x H x W of floats in [0, 1]
              IMAGE, format "base64": {"b64": base64 of the float32 little-endian C*H*W bytes, "shape": [C, H, W]}
    response  {"outputs": [[score per class], ...]}   one row per image, in order (logits or probabilities)

Knobs (`model.kwargs`): `format`, `batch` (images per request), `timeout` (seconds per request),
`retries` (on a connection error, 5xx or 429; backoff doubling from `backoff` seconds, or the server's
Retry-After, capped at 60 s), `max_queries` (images sent over the whole run; past it the run stops,
exit 3), `rate` (requests per second at most, client-side); both count every process of the run
(the driver and, on the Ray engine, its workers share one Meter), and `auth: {header, env, scheme}`: the
header's value is `scheme + " " + $env`, read from the environment when the model loads. The secret
itself is never in the config, and every message the endpoint's errors make has it replaced by `***`.
An endpoint gives no gradients: only black-box attacks and corruptions run against it.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from harness.core.errors import BadInput, RunFailed, one_line

__all__ = ["Endpoint", "EndpointModule", "Meter", "endpoint_of", "load_endpoint", "MAX_BACKOFF", "THROTTLE_STATUSES"]

MAX_BACKOFF = 60.0
FORMATS = ("list", "base64")
THROTTLE_STATUSES = (429, 503)  # Too Many Requests; Service Unavailable, as rate limiters also answer


@dataclass(frozen=True)
class Endpoint:
    """How to call one endpoint (the knobs of the module docstring), validated."""

    url: str
    format: str = "list"
    batch: int = 64
    timeout: float = 30.0
    retries: int = 4
    backoff: float = 0.5
    max_queries: Optional[int] = None
    rate: Optional[float] = None
    auth: Optional[dict] = None

    def __post_init__(self) -> None:
        checks = {"format": self.format in FORMATS, "batch": isinstance(self.batch, int) and self.batch >= 1,
                  "timeout": isinstance(self.timeout, (int, float)) and self.timeout > 0,
                  "retries": isinstance(self.retries, int) and 0 <= self.retries <= 20,
                  "backoff": isinstance(self.backoff, (int, float)) and self.backoff >= 0,
                  "max_queries": self.max_queries is None or (isinstance(self.max_queries, int) and self.max_queries >= 1),
                  "rate": self.rate is None or (isinstance(self.rate, (int, float)) and self.rate > 0)}
        for key, ok in checks.items():
            if not ok:
                valid = f"one of {', '.join(FORMATS)}" if key == "format" else "a positive number" if key != "retries" else "0..20"
                raise BadInput(f"model.kwargs.{key}", f"expected {valid}, got {getattr(self, key)!r}")
        if self.auth is not None:
            if not isinstance(self.auth, dict) or set(self.auth) - {"header", "env", "scheme"} or "env" not in self.auth:
                raise BadInput("model.kwargs.auth", "expected {header: Authorization, env: ENV_VAR_NAME, scheme: Bearer} "
                               "(the secret stays in the environment variable)")


class Meter:
    """What one endpoint was sent: images (`queries`) and requests, and the next free slot of a
    client-side rate. Thread-safe within a process; an engine whose workers are other processes (Ray)
    puts one in an actor and hands every copy of the module the same (harness.engines.meters)."""

    def __init__(self, queries: int = 0, requests: int = 0, last: float = 0.0) -> None:
        self.queries, self.requests, self.last = queries, requests, last
        self._lock = threading.Lock()

    def reserve(self, images: int, most: Optional[int]) -> Optional[int]:
        """Counts `images` unless that would take the count past `most`: then None, else the count before."""
        with self._lock:
            if most is not None and self.queries + images > most:
                return None
            before, self.queries = self.queries, self.queries + images
            return before

    def request(self) -> int:
        """Counts one request; returns the number made before it."""
        with self._lock:
            self.requests += 1
            return self.requests - 1

    def wait(self, rate: float) -> float:
        """Seconds to wait before the next request at `rate` requests per second (its slot is taken)."""
        gap = 1.0 / rate
        with self._lock:
            now = time.monotonic()
            wait = self.last + gap - now
            self.last = max(now, self.last + gap)
        return max(0.0, wait)

    def counts(self) -> tuple[int, int]:
        """(images, requests) so far."""
        with self._lock:
            return self.queries, self.requests


class EndpointModule(nn.Module):
    """The endpoint as a module: images in, the endpoint's scores out (float32, on the input's device)."""

    black_box_reason = "an HTTP endpoint answers queries, not gradients"

    def __init__(self, endpoint: Endpoint, headers: dict[str, str], secret: Optional[str]) -> None:
        super().__init__()
        self.endpoint, self._headers, self._secret, self.meter = endpoint, headers, secret, Meter()

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self._post(chunk) for chunk in x.detach().to("cpu", torch.float32).split(self.endpoint.batch)]
        return torch.from_numpy(np.concatenate(rows).astype(np.float32)).to(x.device)

    def _body(self, x: torch.Tensor) -> bytes:
        if self.endpoint.format == "list":
            inputs: list[Any] = x.tolist()
        else:
            inputs = [{"b64": base64.b64encode(img.numpy().astype("<f4").tobytes()).decode("ascii"), "shape": list(img.shape)} for img in x]
        return json.dumps({"inputs": inputs}).encode()

    def _wait_for_rate(self) -> None:
        if self.endpoint.rate is not None:
            wait = self.meter.wait(self.endpoint.rate)
            if wait > 0:
                time.sleep(wait)

    def _reserve(self, x: torch.Tensor, what: str) -> None:
        ep = self.endpoint
        if self.meter.reserve(len(x), ep.max_queries) is None:
            raise RunFailed(f"the endpoint's query budget (model.kwargs.max_queries: {ep.max_queries} images) would be exceeded "
                            f"after {self.meter.counts()[0]} images; raise it or {what}")

    def _post(self, x: torch.Tensor) -> np.ndarray:
        ep = self.endpoint
        self._reserve(x, "query less (fewer points, attacks or queries)")
        body, delay = self._body(x), ep.backoff
        for attempt in range(ep.retries + 1):
            self._wait_for_rate()
            request = urllib.request.Request(ep.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json", "Accept": "application/json", **self._headers})
            retry_after: Optional[float] = None
            try:
                self.meter.request()
                with urllib.request.urlopen(request, timeout=ep.timeout) as response:
                    return self._scores(response.read(), len(x))
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    raise BadInput("model.kwargs.auth", f"the endpoint refused the credentials (HTTP {e.code}) at {ep.url}") from None
                if e.code != 429 and e.code < 500:
                    detail = self._redact(e.read(300).decode("utf-8", "replace").strip())
                    raise BadInput("model.source", f"the endpoint answered HTTP {e.code} ({one_line(detail, 200)})") from None
                problem = f"HTTP {e.code}"
                header = e.headers.get("Retry-After") if e.headers else None
                retry_after = float(header) if header and header.replace(".", "", 1).isdigit() else None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                problem = self._redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            if attempt == ep.retries:
                raise RunFailed(f"the endpoint {ep.url} failed {ep.retries + 1} time(s), the last with {problem}")
            time.sleep(min(MAX_BACKOFF, retry_after if retry_after is not None else delay))
            delay *= 2
        raise AssertionError("unreachable")

    def try_once(self, x: torch.Tensor) -> dict[str, Any]:
        """One request of images `x`, sent at once: no retry and no client-side pace (the `rate-limit`
        probe measures the server's limits, not this client's). Counts against `max_queries`. Returns
        {"outcome": "answered" | "throttled" | "refused", "status": HTTP status or None, "retry_after":
        the server's Retry-After or None, "detail": what went wrong, secrets replaced}. HTTP 429 and 503
        are throttling; a connection refused, reset or timed out is a refusal; wrong credentials are
        bad input, as for a prediction; any other answer fails the run."""
        ep = self.endpoint
        x = x.detach().to("cpu", torch.float32)
        self._reserve(x, "send a smaller burst")
        self.meter.request()
        request = urllib.request.Request(ep.url, data=self._body(x), method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json", **self._headers})
        try:
            with urllib.request.urlopen(request, timeout=ep.timeout) as response:
                self._scores(response.read(), len(x))
                return {"outcome": "answered", "status": int(response.status), "retry_after": None, "detail": None}
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise BadInput("model.kwargs.auth", f"the endpoint refused the credentials (HTTP {e.code}) at {ep.url}") from None
            if e.code in THROTTLE_STATUSES:
                header = e.headers.get("Retry-After") if e.headers else None
                return {"outcome": "throttled", "status": e.code, "retry_after": None if header is None else one_line(self._redact(header), 60),
                        "detail": f"HTTP {e.code}"}
            detail = self._redact(e.read(300).decode("utf-8", "replace").strip())
            raise RunFailed(f"the endpoint answered HTTP {e.code} during the burst ({one_line(detail, 200)})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            return {"outcome": "refused", "status": None, "retry_after": None,
                    "detail": one_line(self._redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}"), 200)}

    def _scores(self, raw: bytes, n: int) -> np.ndarray:
        try:
            rows = json.loads(raw)["outputs"]
            scores = np.asarray(rows, dtype=np.float64)
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput("model.source", f"the endpoint's answer is not {{\"outputs\": [[scores], ...]}} ({type(e).__name__})") from None
        if scores.ndim != 2 or len(scores) != n or not np.isfinite(scores).all():
            raise BadInput("model.source", f"the endpoint answered {scores.shape} for {n} images; expected one finite row of scores each")
        return scores


def endpoint_of(model: nn.Module) -> Optional[EndpointModule]:
    """The endpoint inside `model` (a BoundedModel around one), or None for any other model."""
    return next((m for m in model.modules() if isinstance(m, EndpointModule)), None)


def load_endpoint(url: str, num_classes: Optional[int], kwargs: dict) -> EndpointModule:
    known = {"format", "batch", "timeout", "retries", "backoff", "max_queries", "rate", "auth"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise BadInput(f"model.kwargs.{unknown[0]}", f"an endpoint takes {', '.join(sorted(known))}")
    endpoint = Endpoint(url, **kwargs)
    headers, secret = {}, None
    if endpoint.auth is not None:
        env = str(endpoint.auth["env"])
        secret = os.environ.get(env)
        if not secret:
            raise BadInput("model.kwargs.auth.env", f"the environment variable {env} holding the endpoint's credentials is not set")
        scheme = endpoint.auth.get("scheme", "Bearer")
        headers[str(endpoint.auth.get("header", "Authorization"))] = f"{scheme} {secret}" if scheme else secret
    module = EndpointModule(endpoint, headers, secret)
    module.num_classes = num_classes
    return module
