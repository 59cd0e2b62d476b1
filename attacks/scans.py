"""Poisoning scans: of a training set (activation clustering, spectral signatures) and of a model
(Neural Cleanse).

The training-set scans look at the model's penultimate features (the input of its last
``nn.Linear``), one class at a time, and return a bool mask over the samples plus a record per
class. Both assume the poison is a minority of its class: a backdoor that makes up half of its
target class splits it into two halves of equal size, which neither rule can tell apart.

- activation clustering (Chen et al. 2018, https://arxiv.org/abs/1811.03728): reduce a class's
  features to ``reduce`` dimensions, split them with 2-means, and flag the smaller cluster when it
  holds less than ``max_size`` of the class (the paper's relative-size rule) and the two clusters
  stand apart (silhouette score at least ``min_silhouette``, the paper's second rule);
- spectral signatures (Tran et al. 2018, https://arxiv.org/abs/1811.00636): centre a class's
  features, score each sample by its squared projection on the top singular vector and flag the
  ``factor * eps`` highest-scoring fraction of the class (``eps`` bounds the poisoned fraction).

Neural Cleanse (Wang et al. 2019, https://people.cs.uchicago.edu/~ravenben/publications/pdf/backdoor-sp19.pdf)
reverse-engineers, for every class, the smallest trigger (mask and pattern) that sends clean
inputs there; a class whose trigger is far smaller than the others' (MAD anomaly index above 2)
is the target of a backdoor.

    feats = penultimate(model, x_train)
    flagged, per_class = spectral_signatures(feats, y_train, eps=0.05)
    scan_report(flagged, poisoned_ids)            # {"n_flagged": ..., "precision": ..., "recall": ...}
    neural_cleanse(model, x_test, y_test, num_classes=10)["anomaly_index"]
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import nn

__all__ = ["SCANS", "check_probe_name", "Scan", "ANOMALY_THRESHOLD", "penultimate", "activation_clustering", "spectral_signatures", "scan_report",
           "write_flagged", "anomaly_index", "neural_cleanse"]

# The scans a `probes:` entry can name on its own or under `scans:` (the poisoning probes are harness.attacks.poisoning.PROBES)
SCANS = ("activation-clustering", "spectral-signatures", "neural-cleanse")


def check_probe_name(name: str) -> None:
    """BadInput unless `name` is a registered poisoning probe or a scan."""
    from harness.core.errors import BadInput

    from .poisoning import PROBES

    if name not in PROBES and name not in SCANS:
        raise BadInput("probes", f"unknown probe {name!r} (valid: {', '.join(PROBES.names() + list(SCANS))})")

ANOMALY_THRESHOLD = 2.0  # Wang et al.: an index above 2 is an outlier with > 95% probability
MAD_TO_SIGMA = 1.4826  # the MAD of a normal distribution times this is its standard deviation


class Scan(NamedTuple):
    """A training-set scan's result: ``flagged`` (n,) bool and one record per class scanned."""

    flagged: torch.Tensor
    per_class: list[dict[str, Any]]


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return fallback


def penultimate(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The (n, d) input of the model's last ``nn.Linear``, on the CPU, computed on the model's device
    (in the mode the model is in: a BoundedModel is always in eval mode).

    "Last" is in execution order: the last module with parameters that runs in the forward pass must
    be an ``nn.Linear`` with a 2-D input (trailing parameter-free modules such as a softmax are
    allowed); any other model raises ValueError.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError("penultimate features need forward hooks, which TorchScript models do not support")
    assert x.dim() >= 2, f"expected x (n, ...), got {tuple(x.shape)}"
    leaves = [m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters(recurse=False))]
    if not any(isinstance(m, nn.Linear) for m in leaves):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: penultimate features are the input of the last one")
    last: dict[str, Any] = {}

    def remember(module: nn.Module, inputs: tuple) -> None:
        last["module"], last["input"] = module, inputs[0] if inputs else None

    handles = [m.register_forward_pre_hook(remember) for m in leaves]
    device = _device_of(model, x.device)
    out = []
    try:
        with torch.no_grad():
            for batch in x.split(batch_size):
                last.clear()
                model(batch.to(device))
                module, inp = last.get("module"), last.get("input")
                if not isinstance(module, nn.Linear):
                    raise ValueError(f"the last layer of {type(model).__name__} is {type(module).__name__}, not nn.Linear: "
                                     "penultimate features are the input of a final linear layer")
                if inp.dim() != 2:
                    raise ValueError(f"the last nn.Linear of {type(model).__name__} takes a {tuple(inp.shape)} input, not (n, d)")
                out.append(inp.detach().float().cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)


def _classes(labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    labels = labels.cpu()
    return [(int(c), (labels == c).nonzero().flatten()) for c in labels.unique()]


def _check(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    assert features.dim() == 2 and labels.dim() == 1 and features.shape[0] == labels.shape[0], (
        f"expected features (n, d) and labels (n,), got {tuple(features.shape)} and {tuple(labels.shape)}"
    )
    return features.detach().cpu().double()  # a few thousand rows per class: exact and deterministic on the CPU


def _reduce(z: torch.Tensor, dims: int, whiten: bool) -> torch.Tensor:
    """The top principal components of z, whitened (unit variance each) when asked."""
    z = z - z.mean(0)
    u, s, _ = torch.linalg.svd(z, full_matrices=False)
    dims = min(dims, int((s > s[0] * 1e-9).sum()) if s.numel() and s[0] > 0 else 0)
    if dims == 0:
        return z.new_zeros(z.shape[0], 1)
    return u[:, :dims] * (math.sqrt(z.shape[0]) if whiten else s[:dims])


def _two_means(z: torch.Tensor, generator: torch.Generator, restarts: int = 10, iters: int = 100) -> torch.Tensor:
    """Lloyd's 2-means, best of `restarts` k-means++ starts; the (n,) assignment in {0, 1}."""
    n = z.shape[0]
    best, best_inertia = torch.zeros(n, dtype=torch.long), math.inf
    for _ in range(restarts):
        first = z[torch.randint(n, (1,), generator=generator)]
        d2 = (z - first).pow(2).sum(1)
        if float(d2.sum()) == 0:
            return best  # every point the same: one cluster
        second = z[torch.multinomial(d2 / d2.sum(), 1, generator=generator)]
        centres = torch.cat([first, second])
        for _ in range(iters):
            assign = torch.cdist(z, centres).argmin(1)
            new = torch.stack([z[assign == j].mean(0) if bool((assign == j).any()) else centres[j] for j in range(2)])
            if torch.equal(new, centres):
                break
            centres = new
        inertia = float(torch.cdist(z, centres).min(1).values.pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def _silhouette(z: torch.Tensor, assign: torch.Tensor) -> float:
    """Mean silhouette score of a two-cluster split (0 when one cluster is empty or a singleton)."""
    sizes = torch.bincount(assign, minlength=2)
    if int(sizes.min()) < 2:
        return 0.0
    dist = torch.cdist(z, z)
    same = assign[:, None] == assign[None, :]
    own = (dist * same).sum(1) / (sizes[assign] - 1)
    other = (dist * ~same).sum(1) / sizes[1 - assign]
    return float(((other - own) / torch.maximum(own, other).clamp_min(1e-12)).mean())


def activation_clustering(features: torch.Tensor, labels: torch.Tensor, *, clusters: int = 2, reduce: int = 10,
                          method: str = "pca", max_size: float = 0.35, min_silhouette: float = 0.25,
                          seed: int = 0) -> Scan:
    """Chen et al.'s activation clustering over (n, d) penultimate features.

    Per class: the features are reduced to their top ``reduce`` principal components and split by
    2-means (best of ten k-means++ starts, seeded by ``seed``). The smaller cluster is flagged when
    it holds less than ``max_size`` of the class and the split's silhouette score is at least
    ``min_silhouette``: a class whose 2-means split cuts through one blob scores low.

    ``method="pca"`` keeps each component's variance (ART's default). ``"ica"`` is the paper's
    FastICA: whitening followed by a rotation, and k-means distances do not see rotations, so it
    clusters the whitened components (the same split, without the search for the rotation).
    Whitening gives a direction that carries the poison the variance of every other one. Measured on
    the digits: with poison at 9% of its class, "ica" found 60-70% of it where "pca" found none; at
    16-33%, "pca" found 75-100% and "ica" 35-75%.
    A class with natural sub-styles (the digits' 1 and 9) splits cleanly too and is flagged: 4% of
    the clean digits training set, 55 samples, are.
    """
    if clusters != 2:
        raise ValueError(f"activation clustering splits each class in two (Chen et al.); clusters={clusters} is not supported")
    if method not in ("ica", "pca"):
        raise ValueError(f"method must be 'ica' or 'pca', not {method!r}")
    feats = _check(features, labels)
    g = torch.Generator().manual_seed(seed)
    flagged = torch.zeros(feats.shape[0], dtype=torch.bool)
    per_class = []
    for c, idx in _classes(labels):
        record: dict[str, Any] = {"class": c, "n": int(idx.numel()), "sizes": [int(idx.numel()), 0], "relative_size": 0.0,
                                  "silhouette": 0.0, "flagged": False, "n_flagged": 0}
        if idx.numel() >= 4:
            z = _reduce(feats[idx], min(reduce, idx.numel() - 1), whiten=method == "ica")
            assign = _two_means(z, g)
            sizes = torch.bincount(assign, minlength=2)
            small = int(sizes.argmin())
            record["sizes"] = sorted(sizes.tolist(), reverse=True)
            record["relative_size"] = round(float(sizes[small]) / idx.numel(), 4)
            record["silhouette"] = round(_silhouette(z, assign), 4)
            if record["relative_size"] < max_size and record["silhouette"] >= min_silhouette and int(sizes[small]) > 0:
                record["flagged"], record["n_flagged"] = True, int(sizes[small])
                flagged[idx[assign == small]] = True
        per_class.append(record)
    return Scan(flagged, per_class)


def spectral_signatures(features: torch.Tensor, labels: torch.Tensor, *, eps: float = 0.05, factor: float = 1.5) -> Scan:
    """Tran et al.'s spectral signatures over (n, d) penultimate features.

    Per class: the centred features' top right singular vector v, the score ``((r - mean) . v)^2`` of
    every sample, and the ``round(factor * eps * n_class)`` highest scores flagged. ``eps`` is the
    expected (upper bound of the) poisoned fraction of a class, not of the whole set: a backdoor in
    2% of the digits training set, all relabelled to one class, is 16% of that class. Every class
    gives up its share, so a clean set has ``factor * eps`` of it flagged too. (ART's detector
    projects the raw features instead, ``|r . v|``, a one-sided score; on that 2% backdoor it found
    all of the poison where the paper's score found 88%.)
    """
    if not (0 < eps <= 1 and factor > 0):
        raise ValueError(f"need 0 < eps <= 1 and factor > 0, got eps={eps}, factor={factor}")
    feats = _check(features, labels)
    flagged = torch.zeros(feats.shape[0], dtype=torch.bool)
    per_class = []
    for c, idx in _classes(labels):
        r = feats[idx] - feats[idx].mean(0)
        k = min(int(round(factor * eps * idx.numel())), idx.numel())
        record: dict[str, Any] = {"class": c, "n": int(idx.numel()), "n_flagged": 0, "top_singular_value": 0.0, "score_cutoff": None}
        if idx.numel() >= 2 and k > 0:
            _, s, vh = torch.linalg.svd(r, full_matrices=False)
            scores = (r @ vh[0]).pow(2)
            top = scores.topk(k).indices
            flagged[idx[top]] = True
            record.update(n_flagged=k, top_singular_value=round(float(s[0]), 6), score_cutoff=float(scores[top].min()))
        per_class.append(record)
    return Scan(flagged, per_class)


def scan_report(flagged: torch.Tensor, poisoned_ids: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """What a scan found: ``n``, ``n_flagged`` and ``flagged_ids`` (positions in the scanned set);
    with the truth (``poisoned_ids``, positions too) also ``n_poisoned``, ``true_positives``,
    ``precision`` (None when nothing is flagged) and ``recall`` (None when nothing is poisoned)."""
    assert flagged.dim() == 1 and flagged.dtype == torch.bool, f"expected a (n,) bool mask, got {flagged.dtype} {tuple(flagged.shape)}"
    flagged = flagged.cpu()
    ids = flagged.nonzero().flatten().tolist()
    report: dict[str, Any] = {"n": int(flagged.numel()), "n_flagged": len(ids), "flagged_ids": ids}
    if poisoned_ids is not None:
        truth = torch.as_tensor(list(poisoned_ids), dtype=torch.long).unique()
        if truth.numel() and (int(truth.min()) < 0 or int(truth.max()) >= flagged.numel()):
            raise ValueError(f"poisoned ids must be positions in the scanned set (0..{flagged.numel() - 1})")
        hits = int(flagged[truth].sum())
        report.update(n_poisoned=int(truth.numel()), true_positives=hits,
                      precision=hits / len(ids) if ids else None,
                      recall=hits / truth.numel() if truth.numel() else None)
    return report


def write_flagged(path: Path | str, ids: Sequence[int] | torch.Tensor, scan: Optional[str] = None) -> Path:
    """Writes ``{"scan": scan, "n_flagged": k, "flagged_ids": [...]}`` to `path` as JSON, atomically
    (``scan`` only when given)."""
    from harness.core.files import write_text_atomic

    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool:
            raise TypeError("write_flagged takes sample ids, not a mask (scan_report(mask)['flagged_ids'] gives them)")
        ids = ids.flatten().tolist()
    ids = [int(i) for i in ids]
    record = ({"scan": scan} if scan is not None else {}) | {"n_flagged": len(ids), "flagged_ids": ids}
    path = Path(path)
    write_text_atomic(path, json.dumps(record) + "\n")
    return path


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """Per class ``|norm - median| / (1.4826 * MAD)``. A MAD of zero is floored at 1e-6 of the
    median, so a class apart from identical others gets a large finite index, not infinity."""
    norms = norms.double()
    median = norms.quantile(0.5)
    mad = (norms - median).abs().quantile(0.5)
    floor = 1e-6 * float(median.abs()) if float(median.abs()) > 0 else 1e-12
    return (norms - median).abs() / (MAD_TO_SIGMA * mad.clamp_min(floor))


def neural_cleanse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, steps: int = 300,
                   lr: float = 0.1, lambda_init: float = 1e-2, patience: int = 10, success: float = 0.99,
                   samples: int = 100, max_batch: int = 8192, seed: int = 0) -> dict[str, Any]:
    """Wang et al.'s Neural Cleanse: the smallest trigger per class, and the anomaly index of the smallest.

    For every target class t at once, Adam optimises a mask ``m = sigmoid(a)`` in [0, 1]^(H, W) and
    a pattern ``p = sigmoid(b)`` in [0, 1]^(C, H, W) so that ``(1 - m) * x + m * p`` is classified
    as t: loss ``CE(f(x'), t) + lambda_t * |m|_1`` over up to ``samples`` inputs of ``x`` (a seeded
    subset; samples already of class t are left out of its loss). The paper's schedule adjusts
    ``lambda_t`` every ``patience`` steps: times 1.5 when every step of the window reached the
    ``success`` rate, divided by 1.5^1.5 otherwise. A class's norm is the smallest ``|m|_1`` among
    the steps that reached the success rate (its last ``|m|_1`` if none did: ``reached`` says).

    Returns ``norms`` (per class), ``anomaly_index`` (of the smallest norm), ``flagged_classes``
    (index > 2 and norm below the median), ``flagged``, ``target`` (the class with the smallest
    norm; the flagged one when there is one) with its ``mask`` (H, W) and ``pattern`` (C, H, W)
    as CPU tensors, ``success_rate`` and ``reached`` per class, and ``seconds``. ``model`` maps
    [0, 1] inputs to logits in eval mode (a BoundedModel does both); it runs on the model's device,
    and ``max_batch`` bounds the images of one forward pass (classes are taken in chunks).

    The index compares a class with the others, so it needs triggers that are small against what a
    class naturally takes. On the 8x8 digits (measured): the clean classes need 7-17 pixels; a 3x3
    patch planted in 5% or 10% of the training set comes back as 4-6 (index 2.7-8 on five of six
    models, 1.9-2.3 on the sixth); planted in 2%, the model needs the whole patch and it hides among
    the others. Of three clean models, one reached 2-2.8 in some settings: a flag is a lead to check.
    """
    assert x.dim() == 4 and y.dim() == 1 and x.shape[0] == y.shape[0], (
        f"expected x (n, C, H, W) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}"
    )
    if num_classes < 2:
        raise ValueError(f"Neural Cleanse compares classes: num_classes must be at least 2, got {num_classes}")
    t0 = time.perf_counter()
    device = _device_of(model, x.device)
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(x.shape[0], generator=g)[:samples].sort().values
    xs, ys = x[keep.to(x.device)].to(device).float(), y[keep.to(y.device)].to(device)
    n, (c, h, w) = xs.shape[0], xs.shape[1:]
    per_chunk = max(1, min(num_classes, max_batch // n))
    norms, rates, reached, masks, patterns = [], [], [], [], []
    for first in range(0, num_classes, per_chunk):
        targets = torch.arange(first, min(first + per_chunk, num_classes), device=device)
        res = _reverse_triggers(model, xs, ys, targets, (c, h, w), g, steps, lr, lambda_init, patience, success)
        for acc, item in zip((norms, rates, reached, masks, patterns), res):
            acc.append(item)
    norm_t = torch.cat(norms)
    index = anomaly_index(norm_t)
    median = norm_t.double().quantile(0.5)
    flagged_classes = [k for k in range(num_classes) if float(index[k]) > ANOMALY_THRESHOLD and float(norm_t[k]) < float(median)]
    target = int(norm_t.argmin())
    return {"norms": [round(float(v), 4) for v in norm_t], "anomaly_index": round(float(index[target]), 4),
            "flagged": bool(flagged_classes), "flagged_classes": flagged_classes, "target": target,
            "mask": torch.cat(masks)[target].cpu(), "pattern": torch.cat(patterns)[target].cpu(),
            "success_rate": [round(float(v), 4) for v in torch.cat(rates)], "reached": torch.cat(reached).tolist(),
            "n": n, "steps": steps, "seconds": round(time.perf_counter() - t0, 3)}


def _reverse_triggers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor, shape: tuple[int, int, int],
                      g: torch.Generator, steps: int, lr: float, lambda_init: float, patience: int,
                      success: float) -> tuple[torch.Tensor, ...]:
    """Optimises one mask and pattern per class of `targets` together; see neural_cleanse."""
    k, n, (c, h, w) = targets.numel(), x.shape[0], shape
    device = x.device
    # a half-open mask and a random pattern, as the paper's code starts
    a = torch.zeros(k, 1, 1, h, w, device=device, requires_grad=True)
    b = (torch.rand(k, 1, c, h, w, generator=g) * 4 - 2).to(device).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=lr, betas=(0.5, 0.9))
    lam = torch.full((k,), float(lambda_init), device=device)
    weight = (y[None, :] != targets[:, None]).float()  # (k, n): a sample already of class t teaches nothing
    counted = weight.sum(1).clamp_min(1)
    labels = targets[:, None].expand(k, n).reshape(-1)
    best = torch.full((k,), math.inf, device=device)
    best_mask, best_pattern = torch.sigmoid(a.detach()[:, 0, 0]), torch.sigmoid(b.detach()[:, 0])
    last_rate = torch.zeros(k, device=device)
    window_ok = torch.ones(k, dtype=torch.bool, device=device)
    for step in range(steps):
        m, p = torch.sigmoid(a), torch.sigmoid(b)
        xt = ((1 - m) * x[None] + m * p).reshape(k * n, c, h, w)
        logits = model(xt)
        ce = nn.functional.cross_entropy(logits, labels, reduction="none").view(k, n)
        l1 = m.flatten(1).sum(1)
        loss = ((ce * weight).sum(1) / counted + lam * l1).sum()
        ga, gb = torch.autograd.grad(loss, [a, b])  # never into the model's parameters
        with torch.no_grad():
            rate = ((logits.argmax(1).view(k, n) == targets[:, None]).float() * weight).sum(1) / counted
            ok = rate >= success
            better = ok & (l1 < best)
            best = torch.where(better, l1, best)
            best_mask[better], best_pattern[better] = m[better, 0, 0], p[better, 0]
            last_rate = rate
            window_ok &= ok
            if (step + 1) % patience == 0:
                lam = torch.where(window_ok, lam * 1.5, lam / 1.5 ** 1.5)
                window_ok = torch.ones_like(window_ok)
        a.grad, b.grad = ga, gb
        opt.step()
        opt.zero_grad(set_to_none=True)
    reached = torch.isfinite(best)
    with torch.no_grad():
        final = torch.sigmoid(a)[:, 0, 0]
    norms = torch.where(reached, best, final.flatten(1).sum(1))
    best_mask[~reached], best_pattern[~reached] = final[~reached], torch.sigmoid(b.detach()[~reached, 0])
    return norms.cpu(), last_rate.cpu(), reached.cpu(), best_mask.cpu(), best_pattern.cpu()
