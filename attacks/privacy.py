"""Privacy probes: does a model leak who was in its training data, can its answers copy it, and does
its endpoint limit how fast anyone can ask?

Three probes, frozen values holding their knobs like the attacks and the poisoning probes:

- `membership-inference`: the loss-threshold attack of Yeom et al. (2018) and LiRA, the likelihood
  ratio attack of Carlini et al. (2022, "Membership Inference Attacks From First Principles").
  Shadow models train on random halves of a pool (`keep_masks`: every example is IN for exactly
  half of them, as in the paper's code); LiRA fits a Gaussian to an example's logit-scaled
  confidence (`confidence`) over the models that trained on it (IN) and over those that did not
  (OUT), and scores the target model's confidence by their likelihood ratio (`online`) or by a
  one-sided test against OUT alone (`offline`). `per-example` variances, or one `fixed` variance per
  side over all examples (the paper's choice with few shadow models).
- `extraction`: a KnockoffNets / CopyCat-style thief (Orekondy et al. 2019; Correia-Silva et al.
  2018) sends a query set (`query_set`: in-distribution images, uniform noise, or crops of the two
  photographs scikit-learn bundles) to the victim, gets back what an API would answer
  (`answer`: probabilities, labels, or probabilities rounded to K decimals), and trains a model on
  the answers (`train_thief`, soft-label cross-entropy). Output defenses (`OutputDefense`) change
  the answers: labels only, the top k probabilities, or rounding.
- `rate-limit`: query-rate limiting, the API-side defense against model stealing: a bounded burst of
  requests sent as fast as they are answered (or at `rate` per second), stopped at the first
  throttle (HTTP 429 or 503) or refusal (the connection refused, reset or timed out), at `burst`
  requests or after `within` seconds (`send_burst`). Only an HTTP endpoint model can be probed.

The functions here are the algorithms on tensors; harness.evaluation.privacy runs them as units of
a run (each shadow model, each query budget) and turns scores into metrics with intervals.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.registry import Registry

from .poisoning import _deterministic_cudnn, _net, _reinitialize, fit

__all__ = ["PRIVACY", "MembershipInference", "Extraction", "OutputDefense", "keep_masks", "confidence", "observe",
           "train_shadow", "lira_scores", "balanced", "loss_scores", "query_set", "sample_patches", "answer", "soft_targets",
           "train_thief", "predict", "derived_seed", "RateLimit", "send_burst"]

PRIVACY: Registry[type] = Registry("privacy probe")

QUERY_SETS = ("holdout", "uniform-noise", "patches")
ANSWERS = ("probabilities", "labels", "rounded")


def derived_seed(seed: int, *keys: Any) -> int:
    """A seed for one draw of a probe (a shadow model, a query set), from the run's seed and names."""
    h = hashlib.sha256(repr((int(seed), *keys)).encode()).digest()
    return int.from_bytes(h[:7], "big")


# --- membership inference ---------------------------------------------------------------------

@PRIVACY.register("membership-inference")
@dataclass(frozen=True)
class MembershipInference:
    """Membership inference: how well an attacker tells training members from non-members (loss threshold or LiRA).

    `shadow_models` train with the config's recipe on random halves of the pool. `target: shadows`
    makes each shadow model in turn the target (trials pooled over models); `target: model` audits
    the config's own model (members: its training data; non-members: the evaluated data).
    """

    method: Literal["lira", "loss"] = "lira"
    variant: Literal["online", "offline"] = "online"
    variance: Literal["per-example", "fixed"] = "fixed"
    shadow_models: int = 16
    target: Literal["shadows", "model"] = "shadows"
    fprs: tuple[float, ...] = (0.01, 0.001)
    calibration: float = 0.5
    epochs: Optional[int] = None

    kind: ClassVar[str] = "privacy"
    name: ClassVar[str] = "membership-inference"

    def __post_init__(self) -> None:
        least = self.least_shadow_models()
        if self.shadow_models < least:
            why = ("each example is IN for half the models, and a LiRA fit needs two values per side"
                   + (" besides the target's" if self.target == "shadows" else "")
                   if self.method == "lira" else "each shadow model in turn is the target, and with one model no example is a member")
            raise ValueError(f"shadow_models must be at least {least} here ({why}), got {self.shadow_models}")
        if not self.fprs or any(not 0 < f < 1 for f in self.fprs):
            raise ValueError(f"fprs must be false-positive rates in (0, 1), got {list(self.fprs)}")
        if len(set(self.fprs)) != len(self.fprs):
            raise ValueError(f"fprs lists a rate twice: {list(self.fprs)}")
        if not 0 < self.calibration < 1:
            raise ValueError(f"calibration is the share of trials that choose thresholds, in (0, 1), got {self.calibration}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")

    def least_shadow_models(self) -> int:
        """Each example is IN for half the models; a LiRA fit needs two values per side and example
        (a variance to estimate), after leaving the target out when it is one of them and evening
        the sides (`balanced`)."""
        if self.method == "loss":
            return 0 if self.target == "model" else 2
        return 6 if self.target == "shadows" else 4

    def uses_shadows(self) -> bool:
        return self.shadow_models > 0 and not (self.method == "loss" and self.target == "model")


def keep_masks(models: int, n: int, seed: int) -> torch.Tensor:
    """(models, n) bool: which examples each shadow model trains on. Every example is IN for exactly
    `models // 2` of the models (chosen at random), so each model trains on about half the pool and
    every example has IN and OUT models to fit."""
    g = torch.Generator().manual_seed(int(seed))
    order = torch.rand(models, n, generator=g).argsort(dim=0)
    return order < models // 2


def confidence(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LiRA's logit-scaled confidence log(p_y / (1 - p_y)), computed stably from the logits as
    z_y - logsumexp_{y' != y} z_y' (float64, so a confident model's score does not saturate)."""
    z = logits.double()
    true = z.gather(1, y.view(-1, 1)).squeeze(1)
    rest = z.scatter(1, y.view(-1, 1), float("-inf")).logsumexp(dim=1)
    return true - rest


def observe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: Union[str, torch.device],
            batch: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's (logit-scaled confidence, cross-entropy loss, correct) on each example, on the CPU."""
    device = torch.device(device)
    conf, loss, right = [], [], []
    with torch.no_grad():
        for xb, yb in zip(x.split(batch), y.split(batch)):
            out = model(xb.to(device)).double().cpu()
            conf.append(confidence(out, yb))
            loss.append(F.cross_entropy(out, yb, reduction="none"))
            right.append(out.argmax(1) == yb)
    cat = lambda parts, dtype: torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)  # noqa: E731
    return cat(conf, torch.float64), cat(loss, torch.float64), cat(right, torch.bool)


def train_shadow(make_model: Any, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, plan: Any,
                 device: Union[str, torch.device], seed: int, epochs: Optional[int] = None) -> nn.Module:
    """A model trained from a fresh initialisation (from `seed`) on the pool's examples where `keep`
    holds, with the recipe `plan` (harness.training.TrainSettings)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(make_model())
    _reinitialize(_net(model), seed)
    idx = keep.nonzero().flatten()
    return fit(model, x[idx], y[idx], plan, device, seed, epochs)


def _predictive(values: torch.Tensor, mask: torch.Tensor, fixed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example (column), the predictive distribution of one more model's value from a Gaussian fit
    to `values` over the rows where `mask` holds: Student's t with n - 1 degrees of freedom, centred on
    the mean, scale s * sqrt(1 + 1/n) (s the sample standard deviation). `fixed`: one variance pooled
    over every example (n - 1 degrees of freedom each), as LiRA does with few shadow models. With a
    handful of models per side the plug-in N(mean, s) would take a noisy s at face value; the
    predictive density is the exact one for Gaussian values. Returns (mean, scale, degrees of freedom)."""
    m = mask.double()
    count = m.sum(0)
    mean = (values * m).sum(0) / count
    square = (((values - mean) * m) ** 2).sum(0)
    if fixed:
        df = (count - 1).clamp(min=0).sum()
        var = torch.full_like(mean, float(square.sum() / df.clamp(min=1)))
        df = torch.full_like(mean, float(df))
    else:
        df = count - 1
        var = square / df.clamp(min=1)
    scale = (var.clamp(min=1e-12) * (1 + 1 / count)).sqrt()
    return mean, scale, df


def _log_t(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, df: torch.Tensor) -> torch.Tensor:
    z = (x - mean) / scale
    return (torch.lgamma((df + 1) / 2) - torch.lgamma(df / 2) - 0.5 * torch.log(df * math.pi) - scale.log()
            - (df + 1) / 2 * torch.log1p(z * z / df))


def lira_scores(target: torch.Tensor, shadows: torch.Tensor, keep: torch.Tensor, variant: str = "online",
                variance: str = "per-example") -> torch.Tensor:
    """LiRA's membership score of each example for the target model: larger means more likely a member.

    `target`: (n,) the target model's confidences; `shadows`: (m, n) the shadow models' (not the
    target's); `keep`: (m, n) which examples each shadow trained on. Online: the log likelihood ratio
    of the target's confidence under the IN fit and the OUT fit (each the Gaussian fit's predictive
    density, `_predictive`). Offline: log P(C <= c) under the OUT fit alone, the one-sided test.
    Every example needs two values on each side it uses (ValueError otherwise)."""
    from scipy.stats import t as student_t

    fixed = variance == "fixed"
    sides = [~keep] if variant == "offline" else list(balanced(keep))
    for side in sides:
        few = int((side.sum(0) < 2).sum())
        if few:
            raise ValueError(f"{few} example(s) have fewer than 2 shadow models on one side of the LiRA fit: "
                             "train more shadow models")
    c = target.double()
    if variant == "offline":
        mu_out, s_out, df_out = _predictive(shadows.double(), ~keep, fixed)
        z = ((c - mu_out) / s_out).numpy()
        return torch.from_numpy(student_t.logcdf(z, df_out.numpy())).double()
    inside, outside = balanced(keep)
    mu_in, s_in, df_in = _predictive(shadows.double(), inside, fixed)
    mu_out, s_out, df_out = _predictive(shadows.double(), outside, fixed)
    return _log_t(c, mu_in, s_in, df_in) - _log_t(c, mu_out, s_out, df_out)


def balanced(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(IN, OUT) masks with as many models on each side of every example: the first k of each, k the
    smaller side's count. With the target left out of its own fits, the side it belongs to has one
    model fewer; a fit from fewer values is wider, so its likelihood is lower on average, and the
    ratio would lean against whichever side the target is on (members scored low: AUROC 0.36 on
    6 shadow models and no signal at all). Equal counts make IN and OUT exchangeable under no signal.
    Models are in random order with respect to an example (keep_masks), so the first k are a random k."""
    inside, outside = keep, ~keep
    k = torch.minimum(inside.sum(0), outside.sum(0))
    return inside & (inside.cumsum(0) <= k), outside & (outside.cumsum(0) <= k)


def loss_scores(loss: torch.Tensor) -> torch.Tensor:
    """Yeom et al.'s attack: a member has a low loss, so the score is the negated loss."""
    return -loss.double()


# --- model extraction -------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputDefense:
    """What an API answers instead of its full probabilities: `labels-only`, `top-k` (the k largest
    probabilities, the rest zero) or `rounding` (probabilities rounded to `decimals`)."""

    name: Literal["labels-only", "top-k", "rounding"]
    k: int = 1
    decimals: int = 1

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"top-k keeps at least one probability, got k={self.k}")
        if not 0 <= self.decimals <= 8:
            raise ValueError(f"rounding keeps 0 to 8 decimals, got {self.decimals}")

    @property
    def label(self) -> str:
        """The name in metric ids: labels-only, top-<k>, rounding-<decimals>."""
        return {"labels-only": "labels-only", "top-k": f"top-{self.k}", "rounding": f"rounding-{self.decimals}"}[self.name]

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        if self.name == "labels-only":
            return answer(probs, "labels")
        if self.name == "rounding":
            return answer(probs, "rounded", self.decimals)
        k = min(self.k, probs.shape[1])
        top = probs.topk(k, dim=1).indices
        return torch.zeros_like(probs).scatter(1, top, probs.gather(1, top))


def _defense(raw: Any) -> OutputDefense:
    if isinstance(raw, OutputDefense):
        return raw
    if isinstance(raw, str):
        return OutputDefense(raw)  # type: ignore[arg-type]
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"name", "k", "decimals"})
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} of an output defense (valid: name, k, decimals)")
        return OutputDefense(**raw)
    raise ValueError(f"an output defense is a name (labels-only, top-k, rounding) or a mapping, got {raw!r}")


@PRIVACY.register("extraction")
@dataclass(frozen=True)
class Extraction:
    """Model extraction: a thief trains a copy of the model from its answers to a query set, at each query budget.

    `queries`: holdout (unlabeled training-split images), uniform-noise or patches (crops of
    scikit-learn's sample photographs). `answers`: probabilities, labels, or rounded (to `decimals`).
    `thief`: a model source (default: the config's architecture, freshly initialised). `defenses`:
    output defenses, each measured side by side with the undefended answers.
    """

    budgets: tuple[int, ...] = (100, 1000)
    queries: Literal["holdout", "uniform-noise", "patches"] = "holdout"
    answers: Union[Literal["probabilities", "labels", "rounded"], dict[str, int]] = "probabilities"
    decimals: int = 2
    thief: Optional[str] = None
    epochs: Optional[int] = None
    min_steps: int = 500
    defenses: tuple[Union[str, dict[str, Any]], ...] = ()

    kind: ClassVar[str] = "privacy"
    name: ClassVar[str] = "extraction"

    def __post_init__(self) -> None:
        if isinstance(self.answers, dict):  # {rounded: K}
            if set(self.answers) != {"rounded"}:
                raise ValueError(f"answers is probabilities, labels, rounded or {{rounded: K}}, got {self.answers!r}")
            object.__setattr__(self, "decimals", int(self.answers["rounded"]))
            object.__setattr__(self, "answers", "rounded")
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be positive query counts, got {list(self.budgets)}")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets lists a count twice: {list(self.budgets)}")
        if not 0 <= self.decimals <= 8:
            raise ValueError(f"decimals must be 0 to 8, got {self.decimals}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {self.min_steps}")
        labels = [d.label for d in self.output_defenses()]
        if len(set(labels)) != len(labels):
            raise ValueError(f"an output defense is listed twice: {', '.join(labels)}")

    def output_defenses(self) -> list[OutputDefense]:
        return [_defense(d) for d in self.defenses]

    def black_box_refusal(self) -> Optional[tuple[str, str]]:
        """Why it cannot run against a model without torch modules ((key, problem)), or None: a black box
        cannot be re-initialised into a fresh copy, so the thief must be a model source of its own."""
        if self.thief is None:
            return "thief", ("extraction trains a fresh copy of the model's architecture unless `thief` names a model source "
                             "for it: give a thief (e.g. builtin:digits-cnn)")
        return None

    def answer_kind(self) -> str:
        return f"rounded:{self.decimals}" if self.answers == "rounded" else str(self.answers)


def sample_patches(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """n crops of scikit-learn's two bundled photographs (a temple, a flower), each a random square of
    1/16 to 1/2 of the shorter side at a random place, flipped at random, resized (antialiased) to
    (C, H, W); grey (ITU-R 601 luma) for one channel. Natural images from outside the data set, no download."""
    from sklearn.datasets import load_sample_images

    c, h, w = shape
    photos = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255.0 for im in load_sample_images().images]
    g = torch.Generator().manual_seed(int(seed))
    out = torch.empty(n, c, h, w)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    for i in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=g))]
        side = min(photo.shape[1:])
        size = int(torch.randint(max(2, side // 16), side // 2 + 1, (1,), generator=g))
        top = int(torch.randint(photo.shape[1] - size + 1, (1,), generator=g))
        left = int(torch.randint(photo.shape[2] - size + 1, (1,), generator=g))
        crop = photo[:, top:top + size, left:left + size]
        if bool(torch.rand(1, generator=g) < 0.5):
            crop = crop.flip(2)
        crop = F.interpolate(crop.unsqueeze(0), size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
        if c == 1:
            crop = (crop * luma).sum(0, keepdim=True)
        elif c != 3:
            crop = crop.mean(0, keepdim=True).expand(c, h, w)
        out[i] = crop.clamp(0, 1)
    return out


def query_set(kind: str, n: int, shape: tuple[int, ...], seed: int, holdout: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The thief's n queries, (n, C, H, W) in [0, 1]; a smaller budget takes the first of them, so the
    budgets nest as an attacker's growing query log would. `holdout` (images, for kind holdout) are
    drawn without replacement."""
    g = torch.Generator().manual_seed(int(seed))
    if kind == "uniform-noise":
        return torch.rand(n, *shape, generator=g)
    if kind == "patches":
        return sample_patches(n, tuple(shape), seed)
    if kind != "holdout":
        raise ValueError(f"unknown query set {kind!r} (valid: {', '.join(QUERY_SETS)})")
    if holdout is None or len(holdout) < n:
        have = 0 if holdout is None else len(holdout)
        raise ValueError(f"the holdout query set has {have} images, fewer than the budget {n}")
    return holdout[torch.randperm(len(holdout), generator=g)[:n]]


def answer(probs: torch.Tensor, kind: str, decimals: int = 2) -> torch.Tensor:
    """What the API returns for these probabilities: them, one-hot labels, or them rounded."""
    if kind == "probabilities":
        return probs
    if kind == "labels":
        return F.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
    if kind in ("rounded", "rounding") or kind.startswith("rounded:"):
        d = int(kind.partition(":")[2]) if kind.startswith("rounded:") else decimals
        return torch.round(probs * 10 ** d) / 10 ** d
    raise ValueError(f"unknown answer kind {kind!r} (valid: {', '.join(ANSWERS)})")


def soft_targets(answers: torch.Tensor) -> torch.Tensor:
    """Answers as the distributions a thief fits: each row scaled to sum 1 (top-k and rounded answers
    do not); a row with nothing left (every probability rounded to 0) becomes uniform."""
    a = answers.double().clamp(min=0)
    total = a.sum(1, keepdim=True)
    uniform = torch.full_like(a, 1.0 / a.shape[1])
    return torch.where(total > 0, a / total.clamp(min=1e-300), uniform).float()


def predict(model: nn.Module, x: torch.Tensor, device: Union[str, torch.device], batch: int = 512) -> torch.Tensor:
    """The model's probabilities on x (float32, on the CPU)."""
    device = torch.device(device)
    with torch.no_grad():
        parts = [model(xb.to(device)).float().softmax(1).cpu() for xb in x.split(batch)]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def train_thief(make_model: Any, x: torch.Tensor, answers: torch.Tensor, plan: Any, device: Union[str, torch.device],
                seed: int, epochs: Optional[int] = None, min_steps: int = 0) -> nn.Module:
    """A model from a fresh initialisation (from `seed`) trained on the queries `x` and the victim's
    `answers` by cross-entropy against `soft_targets(answers)` (for label answers, the usual
    cross-entropy). The recipe `plan`'s optimizer, schedule and batch size; its epochs (or `epochs`),
    raised so that at least `min_steps` optimizer steps run: a budget limits the queries, not the
    thief's compute. Returned in eval mode, parameters frozen."""
    from dataclasses import replace

    from harness.training.loop import make_scaler, train_epochs

    device = torch.device(device)
    torch.manual_seed(seed)
    model = copy.deepcopy(make_model())
    net = _net(model)
    _reinitialize(net, seed)
    per_epoch = max(1, math.ceil(len(x) / plan.batch_size))
    wanted = max(epochs or plan.epochs, math.ceil(min_steps / per_epoch))
    settings = replace(plan, epochs=wanted)
    model.to(device)
    for p in net.parameters():
        p.requires_grad_(p.is_floating_point())
    targets = soft_targets(answers)

    def step(xb: torch.Tensor, tb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return -(tb * F.log_softmax(model(xb).float(), dim=1)).sum(1).mean()

    with _deterministic_cudnn(device.type == "cuda"):
        train_epochs(net, x, targets, settings, device, step, seed=seed, scaler=make_scaler(settings, device))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return model



# --- query-rate limiting of an endpoint ---------------------------------------------------------

MAX_BURST = 100_000
MAX_WITHIN = 600.0
DEFAULT_BURST = 1000


@PRIVACY.register("rate-limit")
@dataclass(frozen=True)
class RateLimit:
    """Query-rate limiting of an HTTP endpoint: when does it throttle a client that queries it fast (as a model thief must).

    A burst of at most `burst` requests of
    `images` images each (the first of the evaluated data), sent one after another as soon as each is
    answered, or at `rate` requests per second, for at most `within` seconds; the model's own client
    side `rate` and retries do not apply. Stopped at the first throttle or refusal.

    `throttled_after:<id>` is the number of requests answered before it: a gate such as `max: 1000`
    asks that the endpoint stop a client within 1000 requests. A burst that ends unthrottled only
    shows the limit lies above what it sent: the metric is that count, with the interval [count, inf].
    `burst` left out is one more than the largest `max` of a gate on this probe (so an endpoint that
    never throttles fails it), else DEFAULT_BURST (harness.config.schema.rate_limit_burst).
    """

    burst: Optional[int] = None
    images: int = 1
    within: float = 60.0
    rate: Optional[float] = None

    kind: ClassVar[str] = "privacy"
    name: ClassVar[str] = "rate-limit"

    def __post_init__(self) -> None:
        if self.burst is not None and (not isinstance(self.burst, int) or not 1 <= self.burst <= MAX_BURST):
            raise ValueError(f"burst must be 1 to {MAX_BURST} requests, got {self.burst!r}")
        if not isinstance(self.images, int) or not 1 <= self.images <= 1024:
            raise ValueError(f"images must be 1 to 1024 per request, got {self.images!r}")
        if not isinstance(self.within, (int, float)) or not 0 < self.within <= MAX_WITHIN:
            raise ValueError(f"within must be more than 0 and at most {MAX_WITHIN:g} seconds, got {self.within!r}")
        if self.rate is not None and (not isinstance(self.rate, (int, float)) or self.rate <= 0):
            raise ValueError(f"rate must be a positive number of requests per second, got {self.rate!r}")

    def black_box_refusal(self) -> Optional[tuple[str, str]]:
        """None: it only sends requests (it runs against an endpoint, and only there)."""
        return None


def send_burst(send: Callable[[], dict[str, Any]], probe: RateLimit, burst: int, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Requests through `send()` (one request, no retry: {"outcome": "answered" | "throttled" |
    "refused", "status", "retry_after", "detail"}) until the first that is not answered, `burst` of
    them, or `probe.within` seconds. Returns what happened: requests sent and answered, why it
    stopped ("throttled", "refused", "burst", "time"), the first throttle (request number, status,
    Retry-After, seconds into the burst) and the answered requests per second."""
    start = clock()
    sent = answered = 0
    first: Optional[dict[str, Any]] = None
    stopped = "burst"
    gap = None if probe.rate is None else 1.0 / probe.rate
    while sent < burst:
        now = clock() - start
        if now >= probe.within:
            stopped = "time"
            break
        if gap is not None and sent * gap > now:  # the burst's own pace: request k leaves at k / rate
            sleep(min(sent * gap - now, probe.within - now))
            continue
        result = send()
        sent += 1
        if result.get("outcome") != "answered":
            stopped = "throttled" if result.get("outcome") == "throttled" else "refused"
            first = {"request": sent, "status": result.get("status"), "retry_after": result.get("retry_after"),
                     "detail": result.get("detail"), "seconds": round(clock() - start, 4)}
            break
        answered += 1
    seconds = clock() - start
    return {"requests_sent": sent, "answered": answered, "stopped": stopped, "throttled": first is not None,
            "first_throttle": first, "seconds": round(seconds, 4),
            "answered_per_second": round(answered / seconds, 3) if seconds > 0 else None}
