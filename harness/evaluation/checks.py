"""Evaluation validity checks: can the suite's robustness numbers be trusted?

Each check is a plain function returning one record ``{"name", "status", "detail"}`` with status
``pass``, ``warn``, ``fail`` or ``skipped`` (after AutoAttack's checks and Carlini et al. 2019, "On
evaluating adversarial robustness", https://arxiv.org/abs/1902.06705). The detail states the measured
figure and, for a warn or a fail, what to do about it. A check with nothing to examine (no correctly
classified point, no survivor, no pair of attacks to compare) is ``skipped`` with the reason, never
``pass``: a pass says something was looked at and found sound. A skipped check never fails a run.
The checks are cheap: each looks at a deterministic sample of at most ``sample`` points, never
changes the model's train/eval mode and takes its devices from the tensors it is given. Like the runner, they trust no attack: every
adversarial batch is clipped to the input bounds, checked against its budget and re-scored here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import torch

from harness.attacks import ATTACKS, BOUNDS, ThreatModel

from harness.sources.models import looks_like_probabilities

__all__ = ["record", "randomness", "output_logits", "gradients", "masking", "monotone", "large_epsilon",
           "more_steps", "zero_epsilon", "budget", "finite"]

STATUSES = ("pass", "warn", "fail", "skipped")
# A point whose margin-loss input gradient is this small (L2, in [0, 1] input units) gives an
# attack no direction; an ordinary network's is many orders of magnitude larger (see gradients()).
TINY_GRADIENT = 1e-8


def record(name: str, status: str, detail: str) -> dict[str, str]:
    assert status in STATUSES, f"status must be one of {STATUSES}, got {status!r}"
    return {"name": name, "status": status, "detail": detail}


def _spread(n: int, k: int, device: torch.device) -> torch.Tensor:
    """k indices spread evenly over range(n): deterministic, and not only the first (often class-sorted) rows."""
    k = min(n, k)
    return torch.arange(k, device=device) * n // max(k, 1)


def _correct_sample(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `sample` correctly classified points, found by walking a fixed spread order in chunks
    (so a large dataset costs a few forward passes, not a full clean pass)."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0)).to(x.device)
    keep: list[torch.Tensor] = []
    found = 0
    with torch.no_grad():
        for chunk in order.split(max(1, sample)):
            logits = model(x[chunk])
            ok = (logits.argmax(dim=1) == y[chunk]) & torch.isfinite(logits).all(dim=1)
            keep.append(chunk[ok])
            found += int(ok.sum())
            if found >= sample:
                break
    idx = torch.cat(keep)[:sample] if keep else order[:0]
    return x[idx], y[idx]


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _broken(model: torch.nn.Module, adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
            threat: Optional[ThreatModel]) -> torch.Tensor:
    """Re-scores an attack's output: clipped to the bounds; a non-finite example, or one outside the
    budget (when `threat` is given), is replaced by the clean input. A non-finite output counts as broken."""
    with torch.no_grad():
        adv = adv.detach().to(x.dtype).clamp(*BOUNDS)
        ok = torch.isfinite(adv).flatten(1).all(dim=1)
        if threat is not None:
            ok &= threat.contains(adv, x)
        adv = torch.where(_rows(ok, adv), adv, x)
        logits = model(adv)
        return (logits.argmax(dim=1) != y) | ~torch.isfinite(logits).all(dim=1)


def _pct(k: int, m: int) -> str:
    return f"{k} of {m} ({k / m:.1%})" if m else f"{k} of 0"


def randomness(model: torch.nn.Module, x: torch.Tensor, *, passes: int = 3, sample: int = 64) -> dict[str, str]:
    """"randomized-model": forward passes on the same inputs must agree.

    A model whose predictions change from pass to pass (dropout left on, random input transforms)
    defeats an attack that follows one sampled gradient: it then needs expectation over
    transformation (EOT), and without it the robust accuracy is overstated.
    """
    name = "randomized-model"
    xs = x[_spread(x.shape[0], sample, x.device)]
    if xs.shape[0] == 0:
        return record(name, "skipped", "no input to run forward passes on")
    with torch.no_grad():
        outs = [torch.nan_to_num(model(xs).float()) for _ in range(max(2, passes))]
    first = outs[0]
    flipped = torch.zeros(xs.shape[0], dtype=torch.bool, device=xs.device)
    spread = 0.0
    for out in outs[1:]:
        flipped |= out.argmax(dim=1) != first.argmax(dim=1)
        spread = max(spread, float((out - first).abs().max()))
    # float32 kernels that differ between passes (some GPU algorithms) move logits by ~1e-6 relative.
    tolerance = 1e-4 * max(1.0, float(first.abs().max()))
    m, k = xs.shape[0], int(flipped.sum())
    if k:
        return record(name, "fail", f"predictions changed between {len(outs)} forward passes on {_pct(k, m)} sampled points: "
                      "the model is randomized (dropout or another random layer active at evaluation?). Attacks without EOT "
                      "(expectation over transformation) overstate its robustness: put the model in eval mode, or evaluate "
                      "it with an EOT attack")
    if spread > tolerance:
        return record(name, "warn", f"logits differ by up to {spread:.3g} between {len(outs)} forward passes (tolerance "
                      f"{tolerance:.3g}) while the {m} sampled predictions agree: a random component or nondeterministic "
                      "kernels; check that nothing random is active at evaluation (attacks on a randomized model need EOT)")
    return record(name, "pass", f"{len(outs)} forward passes on {m} points agree (largest logit difference {spread:.3g})")


def output_logits(logits: torch.Tensor) -> dict[str, str]:
    """"output-logits": a softmax head makes gradients vanish where the softmax saturates."""
    if logits.numel() == 0:
        return record("output-logits", "skipped", "no model output to look at")
    if looks_like_probabilities(logits):
        return record("output-logits", "warn", "the model outputs probabilities (rows sum to 1); the harness uses their "
                      "logarithm as logits, but gradients may still vanish where the softmax saturates")
    return record("output-logits", "pass", "the model outputs logits")


def _margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Largest other logit minus the true one: unlike cross-entropy it does not saturate on confident points."""
    own = logits.gather(1, y[:, None]).squeeze(1)
    return logits.scatter(1, y[:, None], -math.inf).amax(dim=1) - own


def gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, sample: int = 64) -> dict[str, str]:
    """"vanishing-gradients": zero, vanishing or non-finite input gradients on correct points.

    Gradients of the margin loss are taken at up to `sample` correctly classified points. A point
    whose gradient is non-finite or below TINY_GRADIENT (L2) gives gradient attacks nothing to
    follow (obfuscated gradients: quantization, saturation, non-differentiable preprocessing).
    Fail when at least 10% of the points are such, warn when any is.
    """
    name = "vanishing-gradients"
    xs, ys = _correct_sample(model, x, y, sample)
    m = xs.shape[0]
    if m == 0:
        return record(name, "skipped", "no correctly classified point to take gradients at")
    xg = xs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = _margin_loss(model(xg), ys)
        (grad,) = torch.autograd.grad(loss.sum(), xg, allow_unused=True)
    if grad is None:  # the output does not depend on the input at all
        grad = torch.zeros_like(xg)
    size = grad.detach().flatten(1).float().norm(dim=1)
    nonfinite = ~torch.isfinite(grad.detach()).flatten(1).all(dim=1)
    tiny = ~nonfinite & (size <= TINY_GRADIENT)
    k_nan, k_tiny = int(nonfinite.sum()), int(tiny.sum())
    k = k_nan + k_tiny
    finite = size[~nonfinite]
    median = f"{float(finite.median()):.3g}" if finite.numel() else "n/a"
    figures = (f"{_pct(k, m)} correctly classified points have a zero, vanishing (L2 <= {TINY_GRADIENT:g}) or non-finite "
               f"input gradient of the margin loss ({k_tiny} zero or vanishing, {k_nan} non-finite; median gradient L2 norm {median})")
    if k == 0:
        return record(name, "pass", figures)
    advice = ("gradient attacks cannot follow them (obfuscated gradients: quantization, a saturated softmax, "
              "non-differentiable preprocessing); their robust accuracy is not trustworthy: attack a differentiable "
              "approximation (BPDA), use black-box attacks such as square, or remove the non-differentiable part")
    return record(name, "fail" if k >= 0.1 * m else "warn", f"{figures}: {advice}")


def masking(parts: Sequence[dict[str, Any]], n: int) -> dict[str, str]:
    """"gradient-masking": black-box or random-noise attacks breaking points white-box attacks could not.

    `parts` lists every attack (or ensemble stage) that ran, in run order, each a dict with
    "attack", "kind" ("white-box" | "black-box" | "noise"), "norm", "epsilon" and (n,) bool
    tensors "attacked" and "broken". Per (norm, epsilon), counted: points broken by a black-box or
    noise part that some white-box part of the same group attacked and did not break. A gradient
    attack should find what a gradient-free search finds; when it does not, its gradients are masked.
    Fail above 1% of n (and at least 2 points), warn on any.
    """
    name = "gradient-masking"
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in parts:
        groups.setdefault((str(p["norm"]), str(p["epsilon"])), []).append(p)
    worst: Optional[tuple[int, str, list[str], list[str]]] = None
    compared, idle = 0, []
    for (norm, eps), group in groups.items():
        white = [p for p in group if p["kind"] == "white-box"]
        other = [p for p in group if p["kind"] in ("black-box", "noise")]
        if not white or not other:
            idle.append(f"{norm}@{eps}")
            continue
        compared += 1
        missed = torch.zeros(n, dtype=torch.bool)
        for p in white:
            missed |= p["attacked"].cpu().bool() & ~p["broken"].cpu().bool()
        by: list[str] = []
        found = torch.zeros(n, dtype=torch.bool)
        for p in other:
            hit = p["attacked"].cpu().bool() & p["broken"].cpu().bool() & missed
            if bool(hit.any()):
                by.append(str(p["attack"]))
            found |= hit
        count = int(found.sum())
        if worst is None or count > worst[0]:
            worst = (count, f"{norm}@{eps}", by, [str(p["attack"]) for p in white])
    if worst is None:
        return record(name, "skipped", "nothing to compare: no (norm, epsilon) ran both a white-box and a black-box or noise "
                      f"attack ({', '.join(idle) or 'no attack ran'})")
    count, group, by, white_names = worst
    skipped = f"; nothing to compare at {', '.join(idle)}" if idle else ""
    if count == 0:
        return record(name, "pass", f"no black-box or noise attack broke a point the white-box attacks failed on "
                      f"({compared} group(s) compared{skipped})")
    status = "fail" if count > 0.01 * n and count >= 2 else "warn"
    return record(name, status, f"at {group}, {_pct(count, n)} points were broken by {', '.join(by)} after "
                  f"{', '.join(white_names)} attacked them and failed: gradient-free search beats the gradient attacks, a sign of "
                  "gradient masking, so white-box robust accuracy overstates robustness. Trust the worst case over all attacks, "
                  f"check vanishing-gradients, and strengthen the white-box attacks (margin loss, more steps, EOT or BPDA){skipped}")


def monotone(curves: dict[str, dict[str, list[tuple[float, float]]]], n: int) -> dict[str, str]:
    """"monotone-epsilon": robust accuracy must not rise with epsilon (a larger ball holds the smaller one).

    `curves` is harness.verdicts.metrics.curves(record). A rise beyond max(0.01, 3/n) means the attack fails
    at larger budgets (too few steps, a step size that does not scale, masked gradients); a smaller
    rise is within the attack's own randomness and only warns.
    """
    name = "monotone-epsilon"
    tolerance = max(0.01, 3 / max(n, 1))
    worst: Optional[tuple[float, str, float, float, float, float]] = None
    lines = 0
    for norm, per_line in curves.items():
        for line, points in per_line.items():
            if len({eps for eps, _ in points}) < 2:
                continue  # one epsilon: no rise to look for
            lines += 1
            low: Optional[tuple[float, float]] = None  # (eps, accuracy) of the lowest accuracy so far
            for eps, acc in sorted(points):
                if low is not None and acc - low[1] > 1e-9 and (worst is None or acc - low[1] > worst[0]):
                    worst = (acc - low[1], f"{line}-{norm}" if line == "worst" else line, low[0], low[1], eps, acc)
                if low is None or acc < low[1]:
                    low = (eps, acc)
    if lines == 0:
        return record(name, "skipped", "no attack (nor worst case) ran at two or more epsilons of one norm: no curve to "
                      "check for a rise")
    if worst is None:
        return record(name, "pass", f"robust accuracy never rises with epsilon ({lines} curve(s) of two or more epsilons)")
    rise, line, e0, a0, e1, a1 = worst
    figures = f"robust accuracy of {line} rises from {a0:.4g} at epsilon {e0:g} to {a1:.4g} at {e1:g} (+{rise:.4g}; tolerance {tolerance:.4g})"
    if rise > tolerance:
        return record(name, "fail", f"{figures}: a larger budget cannot make a model more robust, so the attack is failing at "
                      "the larger epsilon (too few steps, a step size that does not scale with epsilon, masked gradients); "
                      "fix the attack's settings before trusting these numbers")
    return record(name, "warn", f"{figures}: within the attack's randomness; more steps or restarts would smooth the curve")


def large_epsilon(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, generator: Optional[torch.Generator],
                  eps: float = 0.5, steps: int = 20, sample: int = 64) -> dict[str, str]:
    """"large-epsilon": at an enormous L-inf budget, PGD must break (nearly) every point.

    Native PGD (margin loss, from the clean point so that only gradients can move it) at L-inf
    `eps` on up to `sample` correctly classified points. Robust accuracy must reach ~0: pass at or
    below 0.02, warn up to 0.1, fail above: the attack cannot move the model even then, so its
    gradients are masked or the model ignores its input.
    """
    name = "large-epsilon"
    xs, ys = _correct_sample(model, x, y, sample)
    m = xs.shape[0]
    if m == 0:
        return record(name, "skipped", "no correctly classified point to attack")
    threat = ThreatModel("linf", eps)
    attack = ATTACKS.get("pgd")(steps=steps, loss="margin", random_start=False)
    adv = attack(model, xs, ys, threat, generator=generator)
    k = int((~_broken(model, adv, xs, ys, threat)).sum())
    acc = k / m
    figures = f"PGD-{steps} at L-inf epsilon {eps:g} leaves robust accuracy {acc:.3f} ({k} of {m} correctly classified points)"
    if acc <= 0.02:
        return record(name, "pass", figures)
    return record(name, "warn" if acc <= 0.1 else "fail", f"{figures}, where it should reach ~0: the attack cannot move the "
                  "model even with an enormous budget, so its gradients are masked or the model ignores its input; the "
                  "robust accuracies of gradient attacks are not trustworthy (check vanishing-gradients, try black-box attacks)")


# Fractions of surviving points newly broken by twice the steps (with at least this many points);
# chosen from the figures measured in more_steps' docstring.
MORE_STEPS_WARN, MORE_STEPS_WARN_MIN = 0.05, 2
MORE_STEPS_FAIL, MORE_STEPS_FAIL_MIN = 0.15, 3


def _twin(generator: Optional[torch.Generator], device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Two generators in the same state: two runs then draw the same random start."""
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    twin = torch.Generator(device=generator.device)
    twin.set_state(generator.get_state())
    return generator, twin


def more_steps(model: torch.nn.Module, attack: Any, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
               generator: Optional[torch.Generator], sample: int = 64) -> dict[str, str]:
    """"more-steps": twice the iterations must not find many new adversarial examples.

    `attack` is a native attack dataclass with a `steps` field; `x`, `y` the points that survived
    the whole suite at one (norm, epsilon), `threat` their threat model. On up to `sample` of them
    the attack runs twice from the same random start, with its steps and with twice as many: the
    points only the longer run breaks are the ones more steps find. Comparing from the same start
    matters: a fresh random start alone breaks some survivors (restart variance, reported in the
    detail), which says nothing about steps.

    Measured on the builtin digits model (450 test points, 64 sampled survivors, 3-5 seeds):
    after the default suite (FGSM, PGD-20), PGD-40 newly breaks 0 of 64 at L-inf 0.05, 0-1 of
    64 at 0.1 and 0 of 11 at 0.2 (where a fresh start of PGD-20 itself breaks 3-6 of the 11).
    Attacks stopped far too early, on their own survivors at 0.1: PGD with 3 steps of 0.1 eps
    newly breaks 6-9 of 64 (9-14%), 2 steps of 0.2 eps 11-14 of 64 (17-22%), 5 steps of 0.1 eps 12-19
    of 64 (19-30%). (An attack that barely moves, e.g. 1 step of 0.05 eps, is still one doubled,
    and breaks nothing new: this check cannot see it; monotone-epsilon and noise baselines can.)
    So: warn from 5% (and 2 points, above the 1 of 64 a converged PGD-20 shows), fail from 15%
    (and 3 points), where the robust accuracy is overstated by at least that share.
    """
    name = "more-steps"
    if not dataclasses.is_dataclass(attack) or "steps" not in {f.name for f in dataclasses.fields(attack)}:
        return record(name, "skipped", f"not applicable: {type(attack).__name__} has no steps to double")
    idx = _spread(x.shape[0], sample, x.device)
    m = int(idx.numel())
    if m == 0:
        return record(name, "skipped", "no point survived the suite: nothing to attack longer")
    eps = threat.epsilon
    xs, ys, th = x[idx], y[idx], threat.subset(idx.to(eps.device)) if isinstance(eps, torch.Tensor) else threat
    longer = dataclasses.replace(attack, steps=2 * attack.steps)
    g_same, g_long = _twin(generator, xs.device)
    same = _broken(model, attack(model, xs, ys, th, generator=g_same), xs, ys, th)
    more = _broken(model, longer(model, xs, ys, th, generator=g_long), xs, ys, th)
    k, restart = int((more & ~same).sum()), int(same.sum())
    frac = k / m
    figures = (f"{type(attack).__name__} with {longer.steps} steps instead of {attack.steps} newly breaks {_pct(k, m)} points "
               f"that survived the suite (a rerun with {attack.steps} steps from the same random start breaks {restart})")
    if frac >= MORE_STEPS_FAIL and k >= MORE_STEPS_FAIL_MIN:
        status = "fail"
    elif frac >= MORE_STEPS_WARN and k >= MORE_STEPS_WARN_MIN:
        status = "warn"
    else:
        return record(name, "pass", figures)
    return record(name, status, f"{figures}: the attack has not converged, so the robust accuracy is overstated; raise its "
                  "steps (or use apgd-ce, which adapts its step size) until doubling them changes little")


def zero_epsilon(model: torch.nn.Module, attack: Any, x: torch.Tensor, y: torch.Tensor, *,
                 generator: Optional[torch.Generator], sample: int = 64, norm: Optional[str] = None) -> dict[str, str]:
    """"epsilon-zero": an attack with a zero budget must reproduce clean accuracy exactly.

    The attack runs on up to `sample` points, correct or not, at epsilon 0 (in `norm`, by default
    the first the attack supports); its output is clipped to the bounds (not projected) and
    re-scored. Any changed prediction fails: the attack ignores its budget, or the model's output
    depends on something other than its input (randomness, the batch).
    """
    name = "epsilon-zero"
    idx = _spread(x.shape[0], sample, x.device)
    m = int(idx.numel())
    if m == 0:
        return record(name, "skipped", "no input to attack at epsilon 0")
    xs, ys = x[idx], y[idx]
    norm = norm or (tuple(getattr(attack, "norms", ())) or ("linf",))[0]
    threat = ThreatModel(norm, 0.0)
    adv = attack(model, xs, ys, threat, generator=generator)
    with torch.no_grad():
        adv = adv.detach().to(xs.dtype).clamp(*BOUNDS)
        clean = model(xs).argmax(dim=1)
        out = model(torch.nan_to_num(adv))
        pred = out.argmax(dim=1)
        moved = float(threat.distance(torch.nan_to_num(adv), xs).max())
    # a non-finite example or output counts as changed: the runner would count it as broken
    changed = int(((pred != clean) | ~torch.isfinite(adv).flatten(1).all(dim=1) | ~torch.isfinite(out).all(dim=1)).sum())
    acc_clean, acc_zero = int((clean == ys).sum()) / m, int((pred == ys).sum()) / m
    figures = (f"at epsilon 0, accuracy {acc_zero:.4g} against clean accuracy {acc_clean:.4g} on {m} points; "
               f"{changed} prediction(s) changed; largest {norm} perturbation returned {moved:.3g}")
    if changed == 0 and acc_zero == acc_clean:
        return record(name, "pass", figures)
    return record(name, "fail", f"{figures}: with no budget nothing may change, so the attack ignores its budget or the model's "
                  "output is not a function of its input alone (randomness, batch statistics in training mode); no robust "
                  "accuracy from this run can be trusted until it does")


def budget(violations: int, examined: int, tolerance: float) -> dict[str, str]:
    """"budget": the runner's count of adversarial examples outside their budget, out of the `examined`
    points attacked under a finite one (those outside were already counted as not adversarial)."""
    if violations:
        return record("budget", "fail", f"{violations} adversarial example(s) outside their budget (tolerance {tolerance:g}); "
                      "they were counted as not adversarial")
    if examined == 0:
        return record("budget", "skipped", "no attack ran on any point under a finite budget: no example to check")
    return record("budget", "pass", f"every adversarial example of {examined} attacked point(s) is inside its budget "
                  f"(tolerance {tolerance:g}) and the [0, 1] bounds")


def finite(nonfinite: int, n: int) -> dict[str, str]:
    """"finite": NaN or infinite values the runner met in the clean outputs of `n` samples or in any
    adversarial example or its scores (the clean pass always gives it something to look at)."""
    if nonfinite:
        return record("finite", "fail", "NaN or infinite values in model outputs or adversarial examples")
    return record("finite", "pass", f"no NaN or infinite values in the clean outputs of {n} sample(s) or in the adversarial examples")
