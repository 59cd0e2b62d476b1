"""What the report shows beyond numbers: example adversarial images (inline PNG) and per-class figures.

PNG is written here with zlib and struct (no imaging library needed): 8-bit greyscale for one
channel, RGB for three; any other channel count shows its first channel. Images are records of
plain data (base64 strings), so a scorecard stays one JSON file and the report one HTML file.
"""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any, Optional

__all__ = ["png_bytes", "png_base64", "pixels_png_base64", "encode_probe_images", "example_records", "class_records"]

EXAMPLES_PER_NORM = 4


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(pixels) -> bytes:
    """A PNG of `pixels`: uint8 numpy array (H, W) greyscale or (H, W, 3) RGB."""
    import numpy as np

    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    if a.ndim == 2:
        colour, rows = 0, a
    elif a.ndim == 3 and a.shape[2] == 3:
        colour, rows = 2, a.reshape(a.shape[0], -1)
    else:
        raise ValueError(f"expected (H, W) or (H, W, 3) pixels, got {a.shape}")
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def png_base64(image) -> str:
    """A (C, H, W) tensor in [0, 1] as base64 PNG (for a data: URI)."""
    import numpy as np

    a = image.detach().float().clamp(0, 1).cpu().numpy()
    a = a[0] if a.shape[0] != 3 else np.transpose(a, (1, 2, 0))
    return base64.b64encode(png_bytes(np.round(a * 255))).decode("ascii")


def _images(x, adv) -> dict[str, Any]:
    delta = adv - x
    peak = float(delta.abs().max())
    gain = 0.5 / peak if peak > 0 else 1.0
    return {"original": png_base64(x), "adversarial": png_base64(adv), "perturbation": png_base64(0.5 + gain * delta),
            "amplification": round(gain, 3)}


def example_records(ev, data, limit: int = EXAMPLES_PER_NORM) -> list[dict[str, Any]]:
    """Per norm, up to `limit` adversarial examples at the smallest epsilon that has them, preferring
    distinct true classes; each with its original, amplified perturbation and adversarial image. Reads
    only the shown samples of `data` (a harness.sources.data.Data)."""
    import torch

    out: list[dict[str, Any]] = []
    by_norm: dict[str, list] = {}
    for r in ev.results:
        if r.norm is not None and r.value is not None and r.examples:
            by_norm.setdefault(r.norm, []).append(r)
    for norm, results in sorted(by_norm.items()):
        eps = min(r.value for r in results)
        chosen: dict[int, tuple] = {}
        for r in (r for r in results if r.value == eps):
            for sample, adv, pred in r.examples:
                chosen.setdefault(sample, (r, adv, pred))
        ordered = sorted(chosen.items(), key=lambda kv: kv[0])
        labels, first = set(), []
        for sample, _ in ordered:  # distinct labels first, then the rest
            if int(data.y[sample]) not in labels:
                labels.add(int(data.y[sample]))
                first.append(sample)
        order = first + [s for s, _ in ordered if s not in set(first)]
        shown = order[:limit]
        for sample, x in zip(shown, data.read(torch.tensor(shown, dtype=torch.long))):  # only the rows shown
            r, adv, pred = chosen[sample]
            out.append({"attack": r.subject, "norm": norm, "epsilon": r.label, "sample": int(data.ids[sample]),
                        "label": int(data.y[sample]), "prediction": pred, "distance": float(r.distance[sample]),
                        **_images(x, adv.to(x.dtype))})
    return out


def class_records(ev, y, num_classes: Optional[int] = None) -> dict[str, Any]:
    """Per true class: sample count, clean accuracy and the robust accuracy of every worst case."""
    import torch

    classes = int(num_classes or (int(y.max()) + 1 if y.numel() else 0))
    n = torch.bincount(y, minlength=classes)

    def rate(mask) -> list[Optional[float]]:
        hits = torch.bincount(y[mask], minlength=classes)
        return [round(int(h) / int(c), 6) if int(c) else None for h, c in zip(hits, n)]

    return {"ids": list(range(classes)), "n": [int(c) for c in n], "clean_accuracy": rate(ev.correct),
            "robust_accuracy": {key: rate(robust) for key, robust in ev.worst_case().items()}}


def pixels_png_base64(pixels: Any) -> str:
    """Raw (C, H, W) pixels in [0, 1] (nested lists, as records carry them) as base64 PNG; the same
    bytes png_base64 gives for the float32 tensor they came from."""
    import numpy as np

    a = np.clip(np.asarray(pixels, dtype=np.float32), 0, 1)
    a = a[0] if a.shape[0] != 3 else np.transpose(a, (1, 2, 0))
    return base64.b64encode(png_bytes(np.round(a * 255))).decode("ascii")


def encode_probe_images(records: Any) -> Any:
    """The `probes` records with each picture evaluation left as raw pixels (`trigger_pixels`,
    `mask_pixels`, `pattern_pixels`, on a record or one of its `scans`) turned into a base64 PNG under
    the key without `_pixels`. Returns new records; ones already encoded pass through unchanged."""
    def encode(rec: Any) -> Any:
        if not isinstance(rec, dict):
            return rec
        out = {}
        for k, v in rec.items():
            if isinstance(k, str) and k.endswith("_pixels") and isinstance(v, list):
                out[k.removesuffix("_pixels")] = pixels_png_base64(v)
            elif k == "scans" and isinstance(v, list):
                out[k] = [encode(s) for s in v]
            else:
                out[k] = v
        return out

    return [encode(r) for r in records] if isinstance(records, list) else records

