"""Detection as a defense: flag adversarial inputs by how unusual the model's logits look.

A detector is fitted on clean data and scores inputs, higher meaning more suspicious::

    det = MahalanobisDetector().fit(model, x_fit, y_fit)
    scores = det.score(model, x)                        # (n,)
    evaluate_detector(det, model, x_fit, y_fit, x_clean, x_adv, fpr=0.05, x_calib=x_calib)

``evaluate_detector`` sets the threshold on clean calibration scores at a fixed false-positive
rate and reports, on other clean points, the false-positive rate reached, and the detection rate
of adversarial examples there, and the AUROC, each with a 95% interval. ``DetectorAware`` is the
attack that knows the detector (the classifier's margin plus the detector's score, Carlini &
Wagner 2017). ``mahalanobis`` needs no extra library; ``alibi`` runs an alibi-detect outlier
detector (its PyTorch backend) on the logits and needs the optional ``[alibi]`` extra --
alibi-detect is under the Business Source License, not an open-source one: check it fits your
use. Its scores are computed in NumPy, so it has no gradient for the detector-aware attack.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch
from torch import nn

from .registry import DEFENSES

__all__ = ["Detector", "MahalanobisDetector", "AlibiDetector", "evaluate_detector", "auroc", "threshold_at_fpr",
           "ALIBI_METHODS", "ALIBI_INSTALL", "DetectorAware"]

ALIBI_INSTALL = "pip install 'robustgate[alibi]'"
# alibi-detect's outlier detectors with a PyTorch backend (0.12+); the older Mahalanobis, OutlierAE
# and friends need TensorFlow.
ALIBI_METHODS = ("KNN", "LOF", "Mahalanobis", "GMM", "PCA", "SVM")
_ALIBI_DEFAULTS: dict[str, dict[str, Any]] = {"KNN": {"k": 5}, "LOF": {"k": 10}, "PCA": {"n_components": 2}}


class Detector(Protocol):
    """What the harness needs of a detector. One that also has ``differentiable_score(model, x)`` (its
    score with the autograd graph kept) is attacked through it by DetectorAware; one without is attacked
    through a Mahalanobis surrogate fitted on the same points (harness.evaluation.variants)."""

    kind: ClassVar[str]  # "detector"

    def fit(self, model: nn.Module, x_clean: torch.Tensor, y_clean: Optional[torch.Tensor] = None) -> "Detector": ...

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor: ...


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    assert x.dim() >= 2, f"expected a batch (n, ...), got shape {tuple(x.shape)}"
    with torch.no_grad():
        out = [model(chunk) for chunk in x.split(max(1, batch_size))]
    return torch.cat(out) if out else model(x[:0]).detach()


@DEFENSES.register("mahalanobis")
@dataclass(eq=False)
class MahalanobisDetector:
    """Class-conditional Gaussians with one shared covariance on the model's logits (after Lee et
    al. 2018, https://arxiv.org/abs/1807.03888, which uses penultimate features). The score is the
    smallest Mahalanobis distance to a class mean. The covariance is shrunk towards a multiple of
    the identity by ``shrinkage`` (in [0, 1]) so that it stays invertible on few points.

    Classes come from ``y_clean`` when given, else from the model's own predictions.
    """

    shrinkage: float = 0.01
    batch_size: int = 512
    kind: ClassVar[str] = "detector"

    def __post_init__(self) -> None:
        if not 0 <= self.shrinkage <= 1:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        self.means: Optional[torch.Tensor] = None  # (classes, d), fitted state, not knobs
        self.precision: Optional[torch.Tensor] = None  # (d, d)

    def fit(self, model: nn.Module, x_clean: torch.Tensor, y_clean: Optional[torch.Tensor] = None) -> "MahalanobisDetector":
        z = _logits(model, x_clean, self.batch_size).double()
        y = (z.argmax(dim=1) if y_clean is None else y_clean.to(z.device).long()).contiguous()
        assert y.shape == (z.shape[0],), f"expected {z.shape[0]} labels, got shape {tuple(y.shape)}"
        present = torch.unique(y)
        if z.shape[0] < 2 or present.numel() == 0:
            raise ValueError(f"a Mahalanobis detector needs at least 2 clean points, got {z.shape[0]}")
        means = torch.stack([z[y == c].mean(dim=0) for c in present.tolist()])
        centred = z - means[torch.searchsorted(present, y)]
        cov = centred.T @ centred / z.shape[0]
        d = cov.shape[0]
        scale = torch.trace(cov) / d
        cov = (1 - self.shrinkage) * cov + self.shrinkage * scale * torch.eye(d, dtype=cov.dtype, device=cov.device)
        self.means, self.precision = means, torch.linalg.pinv(cov, hermitian=True)
        return self

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.means is None or self.precision is None:
            raise RuntimeError("fit the detector on clean data before scoring")
        z = _logits(model, x, self.batch_size).double()
        means, precision = self.means.to(z.device), self.precision.to(z.device)
        return self._distance(z, means, precision).float()

    def differentiable_score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The score with its graph kept, for an attack that knows the detector (see DetectorAware)."""
        if self.means is None or self.precision is None:
            raise RuntimeError("fit the detector on clean data before scoring")
        z = model(x).double()
        return self._distance(z, self.means.to(z.device), self.precision.to(z.device)).float()

    @staticmethod
    def _distance(z: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
        diff = z[:, None, :] - means[None, :, :]  # (n, classes, d)
        squared = torch.einsum("ncd,de,nce->nc", diff, precision, diff).clamp_min(1e-12)  # sqrt'(0) is infinite
        return squared.amin(dim=1).sqrt()


def _alibi_present() -> bool:
    if "alibi_detect" in sys.modules:
        return sys.modules["alibi_detect"] is not None
    return importlib.util.find_spec("alibi_detect") is not None


def _alibi_class(method: str) -> type:
    """The alibi-detect class for `method` with a PyTorch backend (the new API), wherever this
    version exports it: `alibi_detect.od.X` may still be an older TensorFlow detector."""
    candidates = []
    for module in (f"alibi_detect.od._{method.lower()}", "alibi_detect.od"):
        try:
            candidates.append(getattr(importlib.import_module(module), method))
        except (ImportError, AttributeError):
            continue
    for cls in candidates:
        if "backend" in inspect.signature(cls).parameters:
            return cls
    from harness.core.errors import BadInput

    raise BadInput("defense 'alibi'", f"the installed alibi-detect has no {method} detector with a PyTorch backend "
                   f"(alibi-detect >= 0.12 has {', '.join(ALIBI_METHODS)})")


@DEFENSES.register("alibi")
@dataclass(eq=False)
class AlibiDetector:
    """An alibi-detect outlier detector, PyTorch backend, on the model's logits.

    ``method`` is one of ALIBI_METHODS (``KNN``: distance to the k-th nearest clean logit vector);
    ``options`` go to its constructor (e.g. ``{"k": 5}``). Needs ``pip install 'robustgate[alibi]'``;
    alibi-detect is under the Business Source License.
    """

    method: str = "KNN"
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 512
    kind: ClassVar[str] = "detector"

    def __post_init__(self) -> None:
        if self.method not in ALIBI_METHODS:
            raise ValueError(f"method must be one of {', '.join(ALIBI_METHODS)}, got {self.method!r}")
        if not _alibi_present():
            from harness.attacks.adapters import MissingDependency

            raise MissingDependency("defense 'alibi'", f"this needs the optional package 'alibi-detect': {ALIBI_INSTALL}")
        self.detector: Any = None  # fitted state, not a knob

    def fit(self, model: nn.Module, x_clean: torch.Tensor, y_clean: Optional[torch.Tensor] = None) -> "AlibiDetector":
        z = _logits(model, x_clean, self.batch_size)
        cls = _alibi_class(self.method)
        try:
            self.detector = cls(**{**_ALIBI_DEFAULTS.get(self.method, {}), **self.options}, backend="pytorch", device=z.device)
        except (TypeError, ValueError) as e:
            from harness.core.errors import BadInput

            raise BadInput("defense 'alibi'", f"alibi-detect's {self.method} refused options {self.options}: {e}") from None
        self.detector.fit(z.float().cpu().numpy())
        return self

    def score(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.detector is None:
            raise RuntimeError("fit the detector on clean data before scoring")
        z = _logits(model, x, self.batch_size)
        scores = self.detector.score(z.float().cpu().numpy())
        return torch.as_tensor(scores, dtype=torch.float32).reshape(-1).to(x.device)


def threshold_at_fpr(clean_scores: torch.Tensor, fpr: float) -> float:
    """The smallest threshold t such that at most a fraction `fpr` of the clean scores exceed it
    (a score is flagged when it is strictly above t); ties can make the actual rate lower."""
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    s = clean_scores.detach().double().flatten().sort(descending=True).values
    if s.numel() == 0:
        raise ValueError("no clean scores to set a threshold on")
    allowed = int(fpr * s.numel() + 1e-9)
    return float(s[allowed]) if allowed < s.numel() else float(s[-1]) - 1.0


def auroc(clean_scores: torch.Tensor, adv_scores: torch.Tensor) -> float:
    """P(adversarial score > clean score) + P(equal) / 2: the Mann-Whitney U statistic over n*m,
    from the ranks of all scores, tied scores sharing their average rank."""
    a, b = clean_scores.detach().double().flatten().cpu(), adv_scores.detach().double().flatten().cpu()
    n, m = a.numel(), b.numel()
    if n == 0 or m == 0:
        raise ValueError("AUROC needs clean and adversarial scores")
    values, inverse, counts = torch.unique(torch.cat([a, b]), return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct value's first occurrence
    ranks = (first + (counts + 1) / 2.0)[inverse]  # 1-based average ranks
    u = float(ranks[n:].sum()) - m * (m + 1) / 2.0
    return u / (n * m)


def evaluate_detector(detector: Any, model: nn.Module, x_fit: Optional[torch.Tensor], y_fit: Optional[torch.Tensor],
                      x_clean: torch.Tensor, x_adv: torch.Tensor, fpr: float = 0.05,
                      x_calib: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Fits `detector` on (x_fit, y_fit) -- skipped when x_fit is None, for a detector already
    fitted -- sets its threshold on the clean inputs `x_calib` at `fpr`, and judges it on other
    clean inputs `x_clean` and on adversarial ones `x_adv`.

    A false-positive rate measured on the points its threshold was set on is the target rate by
    construction, not a measurement: without `x_calib`, x_clean's even positions set the threshold
    and its odd ones are judged. None of them may overlap x_fit. Returns plain numbers: threshold,
    the target fpr, the clean_fpr reached on the judged clean points (n_false_positives of
    n_clean), detection_rate (n_detected of n_adv), auroc (judged clean against adversarial), their
    95% intervals (`*_ci95`: Wilson; the AUROC's a Hanley-McNeil score interval), n_calib and
    n_nonfinite (scores that were not finite numbers, counted as most suspicious; threshold None if
    it is one).
    """
    from harness.core.stats import auroc_interval, wilson_interval

    if x_calib is None:
        x_calib, x_clean = x_clean[0::2], x_clean[1::2]
    if x_calib.shape[0] == 0 or x_clean.shape[0] == 0:
        raise ValueError(f"a detector needs clean points to set its threshold on and others to judge it on, "
                         f"got {x_calib.shape[0]} and {x_clean.shape[0]}")
    if x_fit is not None:
        detector.fit(model, x_fit, y_fit)
    scores = [detector.score(model, x).detach().flatten().double() for x in (x_calib, x_clean, x_adv)]
    assert [s.numel() for s in scores] == [x_calib.shape[0], x_clean.shape[0], x_adv.shape[0]], "a detector returns one score per input"
    # A score that is not a number (a diverged fit, an overflowing input) counts as most suspicious;
    # n_nonfinite says how many there were, so a broken detector shows instead of ranking at random.
    nonfinite = sum(int((~torch.isfinite(s)).sum()) for s in scores)
    calib, clean, adv = (torch.where(torch.isfinite(s), s, math.inf) for s in scores)
    t = threshold_at_fpr(calib, fpr)
    false_pos, detected = int((clean > t).sum()), int((adv > t).sum())
    n_clean, n_adv = int(clean.numel()), int(adv.numel())
    auc = auroc(clean, adv) if n_adv else float("nan")
    return {
        "threshold": t if math.isfinite(t) else None,
        "fpr": float(fpr),
        "clean_fpr": false_pos / n_clean,
        "clean_fpr_ci95": list(wilson_interval(false_pos, n_clean)),
        "detection_rate": detected / n_adv if n_adv else float("nan"),
        "detection_rate_ci95": list(wilson_interval(detected, n_adv)),
        "auroc": auc,
        "auroc_ci95": list(auroc_interval(auc, n_adv, n_clean)) if n_adv else [0.0, 1.0],
        "n_calib": int(calib.numel()),
        "n_clean": n_clean,
        "n_false_positives": false_pos,
        "n_adv": n_adv,
        "n_detected": detected,
        "n_nonfinite": nonfinite,
    }


@dataclass(frozen=True, eq=False)
class DetectorAware:
    """PGD against a classifier guarded by a detector, after Carlini & Wagner 2017 ("Adversarial
    Examples Are Not Easily Detected", https://arxiv.org/abs/1705.07263): per sample it descends

        max(z_y - max_{j != y} z_j, -kappa) + lam * score(x) / scale

    so the example must both cross the decision boundary (by a margin kappa, past which the first
    term is flat) and look clean. C&W search their constant per sample; here each lam of `lambdas`
    runs in turn (0 first: plain margin PGD, so nothing breakable is lost) and each sample keeps
    the misclassified iterate with the lowest score seen, else its lowest-margin one. `score` is
    the detector's differentiable score, `scale` a typical clean score that puts lam on a fixed
    footing. Step size 2.5 * epsilon / steps (Madry's schedule), from a random start.
    """

    score: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    scale: float = 1.0
    steps: int = 40
    lambdas: tuple[float, ...] = (0.0, 0.3, 1.0, 3.0, 10.0)
    kappa: float = 1.0
    access: ClassVar[str] = "white-box"

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.lambdas or min(self.lambdas) < 0 or self.kappa < 0 or not self.scale > 0:
            raise ValueError("steps >= 1, lambdas non-empty and >= 0, kappa >= 0 and scale > 0 are required")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Any, *,
                 generator: Optional[torch.Generator] = None, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x.detach()
        best, best_score = x.clone(), torch.full((x.shape[0],), math.inf, device=x.device)
        best_margin = torch.full_like(best_score, math.inf)
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        step = (threat.per_sample(x) * 2.5 / self.steps).view(-1, *([1] * (x.dim() - 1)))
        with torch.enable_grad():  # callers may hold no_grad; the attack still needs input gradients
            for lam in self.lambdas:
                x_adv = threat.random_start(x, generator)
                for t in range(self.steps + 1):
                    x_adv.requires_grad_(True)
                    logits = model(x_adv)
                    own = logits.gather(1, y[:, None]).squeeze(1)
                    margin = own - logits.scatter(1, y[:, None], -math.inf).amax(dim=1)
                    s = self.score(model, x_adv)
                    now = margin < 0
                    better = torch.where(fooled, now & (s < best_score), now | (margin < best_margin))
                    best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv.detach(), best)
                    best_score = torch.where(better, s.detach(), best_score)
                    best_margin = torch.where(better, margin.detach(), best_margin)
                    fooled = fooled | now
                    if t == self.steps:
                        break
                    objective = margin.clamp_min(-self.kappa) + lam * s / self.scale
                    (grad,) = torch.autograd.grad(objective.sum(), x_adv)
                    x_adv = threat.project(x_adv.detach() - step * threat.normalize_grad(grad), x)
        return best
