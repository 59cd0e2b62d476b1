"""Interval bound propagation: a proof that no input in an L-inf box changes a network's class.

The box [x - eps, x + eps] (clipped to [0, 1]) goes through the model's normalization and then
through the network layer by layer as a centre and a radius: an affine layer maps the centre and
takes |W| of the radius, a monotone layer (ReLU, pooling) maps both ends (Gowal et al. 2018, "On the
Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models",
https://arxiv.org/abs/1810.12715). The last Linear layer is folded into the margins it decides, the
bound of logit_y - logit_j taken from the rows W_y - W_j (the paper's elision), which is never looser
than subtracting the logits' bounds. A point is verified when every margin's lower bound is positive.

`method: crown` tightens the bounds with CROWN's linear relaxation (Zhang et al. 2018, "Efficient
Neural Network Robustness Certification with General Activation Functions",
https://arxiv.org/abs/1811.00866), with interval pre-activation bounds as in CROWN-IBP (Zhang et al.
2020): each ReLU between l < 0 < u is bounded by lines, the margins are back-substituted through the
affine layers to the input box, where a linear function's minimum is exact, and the margin kept is
the larger of CROWN's and IBP's. MaxPool2d has no linear relaxation here: crown refuses it.

Networks of Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm (in
eval mode), Dropout and Identity, in any module structure torch.fx traces into one chain; anything
else is refused in one line naming the layer. Bounds are computed in float64 on a copy of the
network. Example::

    certificates: [{name: interval-bounds, epsilons: ["1/255", "2/255"]}]
"""

from __future__ import annotations

import builtins
import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .registry import CERTIFICATES

__all__ = ["IntervalBounds", "UnsupportedLayer", "check_supported", "interval_bounds", "margin_bounds"]

_AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_MONOTONE = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_PASS = (nn.Dropout, nn.Identity)  # in eval mode both are the identity
SUPPORTED = ("Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm1d, BatchNorm2d (eval), Dropout, "
             "Identity; and torch.flatten, relu, view/reshape")
_RESHAPES = ("view", "reshape")
_MAX_ELIDED = 1 << 24  # float64 entries of (W_y - W_j) held at once: 128 MiB


class UnsupportedLayer(ValueError):
    """A network interval bounds cannot follow; the message is one line naming the layer."""


class _Step(NamedTuple):
    """One op of the chain. kind: "affine", "relu", "monotone", "pass", "flatten" (args: start, end
    dims) or "reshape" (args: ints, or ("size", position, dim) read off the tensor after
    `position` steps at run time). name: the module's path or the fx node's name."""

    kind: str
    name: str
    module: Optional[nn.Module]
    args: tuple = ()


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _target_name(node: Any) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    module = getattr(t, "__module__", None) or ""
    module = "operator" if module in ("_operator", "operator") else module
    name = getattr(t, "__name__", str(t))
    return f"{module}.{name}" if module else name


def _refuse(what: str, method: str = "ibp", why: str = "") -> UnsupportedLayer:
    tail = f" ({why}; supported: {SUPPORTED})" if why else f" (supported: {SUPPORTED})"
    return UnsupportedLayer(f"{what} is not supported by interval bounds{'' if method == 'ibp' else f' (method {method})'}{tail}")


def _shape_arg(a: Any, shape_refs: dict) -> tuple:
    """A reshape argument as ints and ("size", position, dim) references; None when it is neither."""
    import torch.fx as fx

    if isinstance(a, int) and not isinstance(a, bool):
        return (a,)
    if isinstance(a, fx.Node) and a in shape_refs:
        return (("size",) + shape_refs[a],)
    if isinstance(a, (tuple, list)):
        parts = [_shape_arg(b, shape_refs) for b in a]
        return None if any(p is None for p in parts) else tuple(q for p in parts for q in p)
    return None


def _steps(net: nn.Module) -> list[_Step]:
    """The network as a chain of steps; UnsupportedLayer for any other op, or a graph not one chain."""
    import torch.fx as fx

    if fx.Tracer().is_leaf_module(net, ""):  # a bare layer: fx would trace into its functional form
        steps = _steps(nn.Sequential(net)) if isinstance(net, _AFFINE + _MONOTONE + _PASS + (nn.ReLU, nn.Flatten)) else None
        if steps is None:
            raise _refuse(f"the network ({type(net).__name__})")
        return [s._replace(name="") if s.module is not None else s for s in steps]
    try:
        graph = fx.symbolic_trace(net).graph
    except Exception as e:  # noqa: BLE001 (fx raises many kinds for code it cannot trace)
        raise UnsupportedLayer(f"the network cannot be traced into layers by torch.fx ({type(e).__name__}: {_one_line(str(e))}), "
                               f"so interval bounds cannot follow it (supported: {SUPPORTED})") from None
    modules = dict(net.named_modules())
    chain: list[_Step] = []
    position: dict[fx.Node, int] = {}  # a chain tensor -> how many steps made it
    shape_refs: dict[fx.Node, tuple] = {}  # x.size(d), x.shape, x.shape[d] -> (position, dim or slice or None)
    current: Optional[fx.Node] = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise UnsupportedLayer(f"the network takes more than one input (`{node.name}`); interval bounds follow one input")
            current, position[node] = node, 0
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise UnsupportedLayer("the network's output is not the end of one chain of layers (a tuple, a dict or a branch), "
                                       "so interval bounds cannot follow it")
            break
        a = node.args
        if node.op == "call_method" and node.target == "size" and a[0] in position:
            dim = a[1] if len(a) > 1 else node.kwargs.get("dim")
            shape_refs[node] = (position[a[0]], dim)
            continue  # a shape, read off the tensor when a reshape uses it
        if node.op == "call_function" and node.target is builtins.getattr and a[0] in position and a[1] == "shape":
            shape_refs[node] = (position[a[0]], None)
            continue
        if (node.op == "call_function" and node.target is operator.getitem and a[0] in shape_refs
                and shape_refs[a[0]][1] is None and isinstance(a[1], (int, slice))):
            shape_refs[node] = (shape_refs[a[0]][0], a[1])
            continue
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: inputs.append(n) if n not in shape_refs else None)
        step = _classify(node, modules, shape_refs, len(inputs))
        if inputs != [current]:
            raise UnsupportedLayer(f"`{node.name}` ({step.name if step.module is not None else _target_name(node)}) does not "
                                   f"continue the chain of layers (it takes {len(inputs)} tensors or an earlier one); interval "
                                   f"bounds follow one chain (supported: {SUPPORTED})")
        chain.append(step)
        current, position[node] = node, len(chain)
    return chain


def _classify(node: Any, modules: dict, shape_refs: dict, n_inputs: int) -> _Step:
    """The step a traced node is; UnsupportedLayer naming it when it is none."""
    if node.op == "get_attr":
        raise _refuse(f"`{node.name}` (the tensor attribute `{node.target}` used in forward)")
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and (m.training or m.running_mean is None):
            raise UnsupportedLayer(f"layer `{node.target}` ({type(m).__name__}) is BatchNorm in training mode or keeps no running "
                                   "statistics: interval bounds need BatchNorm in eval mode (call net.eval())")
        if isinstance(m, _AFFINE):
            return _Step("affine", node.target, m)
        if isinstance(m, nn.ReLU):
            return _Step("relu", node.target, m)
        if isinstance(m, nn.Flatten):
            return _Step("flatten", node.target, m, (m.start_dim, m.end_dim))
        if isinstance(m, _MONOTONE) and not getattr(m, "return_indices", False):
            return _Step("monotone", node.target, m)
        if isinstance(m, _PASS):
            return _Step("pass", node.target, m)
        raise _refuse(f"layer `{node.target}` ({type(m).__name__})")
    a, kw = node.args, node.kwargs
    if node.op == "call_function" and node.target in (torch.relu, F.relu) or node.op == "call_method" and node.target == "relu":
        return _Step("relu", node.name, None)
    if node.op == "call_function" and node.target is torch.flatten or node.op == "call_method" and node.target == "flatten":
        start = a[1] if len(a) > 1 else kw.get("start_dim", 0)
        end = a[2] if len(a) > 2 else kw.get("end_dim", -1)
        return _Step("flatten", node.name, None, (start, end))
    if node.op == "call_method" and node.target in _RESHAPES and not kw:
        shape = _shape_arg(list(a[1:]), shape_refs)
        if shape is not None:
            return _Step("reshape", node.name, None, shape)
        raise _refuse(f"`{node.name}` ({_target_name(node)} to a shape computed in forward)")
    why = f"it joins {n_inputs} tensors, as a residual or a branch does" if n_inputs > 1 else ""
    raise _refuse(f"`{node.name}` ({_target_name(node)})", why=why)


def _crown_blocker(steps: list[_Step]) -> Optional[UnsupportedLayer]:
    for s in steps:
        if s.kind == "monotone" and isinstance(s.module, nn.MaxPool2d):
            return UnsupportedLayer(f"layer `{s.name}` (MaxPool2d) has no linear relaxation in interval bounds' method crown; "
                                    "use method: ibp")
    return None


def check_supported(net: nn.Module) -> None:
    """UnsupportedLayer naming the first layer interval bounds cannot follow; None when they can."""
    _steps(net)


def _normalized(lo: torch.Tensor, hi: torch.Tensor, mean: Optional[torch.Tensor],
                std: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] through (. - mean) / std, exactly: std > 0 keeps the ends in order."""
    lo, hi = lo.double(), hi.double()
    if mean is not None:
        m = mean.detach().double().to(lo.device)
        lo, hi = lo - m, hi - m
    if std is not None:
        s = std.detach().double().to(lo.device)
        assert bool((s > 0).all()), "std must be positive"
        lo, hi = lo / s, hi / s
    return lo, hi


def _bn_scale(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm in eval mode as the per-channel affine map it is: (scale, shift)."""
    scale = (m.weight if m.weight is not None else torch.ones_like(m.running_var)) / torch.sqrt(m.running_var + m.eps)
    shift = (m.bias if m.bias is not None else torch.zeros_like(m.running_mean)) - m.running_mean * scale
    return scale, shift


def _channel_view(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (t.dim() - 2)))


def _affine(m: nn.Module, mid: torch.Tensor, rad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An affine layer on a centre and a radius: (W mid + b, |W| rad)."""
    if isinstance(m, nn.Linear):
        return F.linear(mid, m.weight, m.bias), F.linear(rad, m.weight.abs())
    if isinstance(m, nn.Conv2d):  # _conv_forward pads as the layer does (zeros, reflect, circular): copies keep radii
        return m._conv_forward(mid, m.weight, m.bias), m._conv_forward(rad, m.weight.abs(), None)
    scale, shift = _bn_scale(m)
    return mid * _channel_view(scale, mid) + _channel_view(shift, mid), rad * _channel_view(scale.abs(), rad)


def _resolve(args: tuple, shapes: list[torch.Size]) -> list[int]:
    out: list[int] = []
    for a in args:
        if isinstance(a, int):
            out.append(a)
            continue
        _, pos, dim = a
        size = shapes[pos]
        out.extend(size if dim is None else size[dim] if isinstance(dim, slice) else [size[dim]])
    return out


def _through(step: _Step, lo: torch.Tensor, hi: torch.Tensor, shapes: list[torch.Size]) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the chain on the interval [lo, hi]; `shapes` holds the shape after each earlier step."""
    if step.kind == "relu":
        return lo.clamp_min(0), hi.clamp_min(0)  # never the module itself: an inplace ReLU would overwrite lo
    if step.kind == "flatten":
        return lo.flatten(*step.args), hi.flatten(*step.args)
    if step.kind == "reshape":
        shape = _resolve(step.args, shapes)
        return lo.reshape(shape), hi.reshape(shape)
    if step.kind == "affine":
        centre, spread = _affine(step.module, (hi + lo) / 2, (hi - lo) / 2)
        return centre - spread, centre + spread
    if step.kind == "monotone":
        return step.module(lo), step.module(hi)  # max and average pooling are monotone in every input
    return lo, hi


def _bound(net: nn.Module, device: torch.device) -> tuple[list[_Step], nn.Module]:
    """The chain over a float64 eval-mode copy of `net` on `device`; the caller's module is untouched."""
    steps = _steps(net)
    twin = copy.deepcopy(net).to(device=device, dtype=torch.float64)
    twin.eval()
    modules = dict(twin.named_modules())
    return [s._replace(module=modules[s.name]) if s.module is not None else s for s in steps], twin


def _propagate(steps: list[_Step], lo: torch.Tensor, hi: torch.Tensor, pre: Optional[list] = None):
    """IBP through `steps`: the output interval and the shape after every step (shapes[0]: the input).
    `pre` collects each ReLU's input interval, for CROWN."""
    shapes = [lo.shape]
    for step in steps:
        if pre is not None and step.kind == "relu":
            pre.append((lo, hi))
        lo, hi = _through(step, lo, hi, shapes)
        shapes.append(lo.shape)
    return lo, hi, shapes


def interval_bounds(net: nn.Module, mean: Optional[torch.Tensor], std: Optional[torch.Tensor], lower: torch.Tensor,
                    upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds (float64) of the logits over every input in [lower, upper] ([0, 1] input space, before
    the normalization), by interval bound propagation, on lower's device."""
    assert lower.shape == upper.shape and lower.dim() >= 2, (tuple(lower.shape), tuple(upper.shape))
    assert bool((lower <= upper).all()), "lower must not exceed upper"
    steps, _ = _bound(net, lower.device)
    with torch.no_grad():
        lo, hi, _ = _propagate(steps, *_normalized(lower, upper, mean, std))
    return lo, hi


def _elided(m: nn.Linear, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K) lower bounds of logit_y - logit_j from the last Linear layer's rows W_y - W_j."""
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    k, d = m.weight.shape
    chunk = max(1, _MAX_ELIDED // max(1, k * d))  # (chunk, K, in) at a time: a wide last layer stays in memory
    out = []
    for s in range(0, len(y), chunk):
        yy = y[s:s + chunk]
        diff = m.weight[yy].unsqueeze(1) - m.weight.unsqueeze(0)  # (b, K, in)
        bias = 0.0 if m.bias is None else m.bias[yy].unsqueeze(1) - m.bias.unsqueeze(0)
        out.append(torch.einsum("bki,bi->bk", diff, mid[s:s + chunk]) + bias
                   - torch.einsum("bki,bi->bk", diff.abs(), rad[s:s + chunk]))
    return torch.cat(out)


def _transposed(fn, lam: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """Each row of `lam` (B, K, *out) through the transpose of the per-sample linear map `fn`, by one
    backward pass over a zero batch of B*K inputs."""
    b, k = lam.shape[:2]
    probe = torch.zeros((b * k, *in_shape[1:]), dtype=lam.dtype, device=lam.device, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(probe), probe, lam.reshape(b * k, *lam.shape[2:]))
    return g.view(b, k, *in_shape[1:])


def _crown(steps: list[_Step], pre: list, shapes: list, lo0: torch.Tensor, hi0: torch.Tensor, y: torch.Tensor,
           num_classes: int) -> torch.Tensor:
    """CROWN's margin lower bounds: the margins e_y - e_j back-substituted through the chain with
    linear ReLU relaxations from the interval pre-activation bounds `pre`, then minimised exactly
    over the normalized input box [lo0, hi0]."""
    b = len(y)
    eye = torch.eye(num_classes, dtype=torch.float64, device=y.device)
    lam = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, *shape): the margins as linear functions of the current tensor
    const = torch.zeros(b, num_classes, dtype=torch.float64, device=y.device)
    relus = len(pre)
    for idx in range(len(steps) - 1, -1, -1):
        step, in_shape, m = steps[idx], shapes[idx], steps[idx].module
        if step.kind == "relu":
            relus -= 1
            l, u = (t.flatten(1) for t in pre[relus])
            active, dead = l >= 0, u <= 0
            cross = ~active & ~dead
            slope_up = torch.where(cross, u / (u - l).clamp_min(1e-300), active.double())
            icpt_up = torch.where(cross, -l * slope_up, torch.zeros_like(l))
            slope_lo = torch.where(cross, (u > -l).double(), active.double())  # the adaptive lower line, 0 or 1
            flat = lam.flatten(2)
            pos, neg = flat.clamp_min(0), flat.clamp_max(0)
            const = const + torch.einsum("bki,bi->bk", neg, icpt_up)  # a negative coefficient meets the upper line
            lam = (pos * slope_lo.unsqueeze(1) + neg * slope_up.unsqueeze(1)).view(lam.shape)
        elif step.kind in ("flatten", "reshape", "pass"):
            lam = lam.reshape(b, num_classes, *in_shape[1:])
        elif isinstance(m, nn.Linear):
            flat = lam.flatten(2)
            if m.bias is not None:
                const = const + flat @ m.bias
            lam = (flat @ m.weight).view(b, num_classes, *in_shape[1:])
        elif isinstance(m, nn.Conv2d):
            if m.bias is not None:
                const = const + (lam.flatten(3).sum(dim=3) * m.bias).sum(dim=2)
            lam = _transposed(lambda t: m._conv_forward(t, m.weight, None), lam, in_shape)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale, shift = _bn_scale(m)
            view = (1, 1, -1) + (1,) * (lam.dim() - 3)
            const = const + (lam * shift.view(view)).flatten(2).sum(dim=2)
            lam = lam * scale.view(view)
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            lam = _transposed(m, lam, in_shape)  # average pooling is linear (a zero pad is a constant 0)
        else:
            raise _refuse(f"layer `{step.name}` ({type(m).__name__})", "crown", "use method: ibp")
    mid, rad = ((hi0 + lo0) / 2).flatten(1), ((hi0 - lo0) / 2).flatten(1)
    flat = lam.flatten(2)
    return torch.einsum("bki,bi->bk", flat, mid) - torch.einsum("bki,bi->bk", flat.abs(), rad) + const


def margin_bounds(net: nn.Module, mean: Optional[torch.Tensor], std: Optional[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  eps: float, method: str = "ibp") -> torch.Tensor:
    """(B, K) float64 lower bounds of logit_y - logit_j over the box [x - eps, x + eps] clipped to
    [0, 1]; +inf at j = y. `method` "ibp" (elided last layer) or "crown" (never looser than ibp)."""
    assert x.dim() >= 2 and y.shape == (len(x),), (tuple(x.shape), tuple(y.shape))
    assert method in ("ibp", "crown"), method
    eps = float(eps)
    assert eps >= 0 and math.isfinite(eps), eps
    steps, _ = _bound(net, x.device)
    if method == "crown" and (blocker := _crown_blocker(steps)) is not None:
        raise blocker
    y = y.to(x.device).long()
    xd = x.detach().double()
    lo0, hi0 = _normalized((xd - eps).clamp(0.0, 1.0), (xd + eps).clamp(0.0, 1.0), mean, std)
    last = steps[-1].module if steps else None
    elide = isinstance(last, nn.Linear)
    pre: list = []
    with torch.no_grad():
        lo, hi, shapes = _propagate(steps[:-1] if elide else steps, lo0, hi0, pre)
        assert lo.dim() == 2, f"the network's {'last Linear layer input' if elide else 'output'} is not (batch, features): {tuple(lo.shape)}"
        margins = _elided(last, lo, hi, y) if elide else lo.gather(1, y.unsqueeze(1)) - hi
        if method == "crown":  # shapes[i] is the input of steps[i]; the elided layer's is the body's output
            margins = torch.maximum(margins, _crown(steps, pre, shapes, lo0, hi0, y, int(margins.shape[1])))
    margins = margins.clone()
    margins[torch.arange(len(y), device=margins.device), y] = math.inf
    return margins


@CERTIFICATES.register("interval-bounds")
@dataclass(frozen=True)
class IntervalBounds:
    """Interval bound propagation (Gowal et al. 2018), or CROWN's linear relaxation (Zhang et al. 2018)
    with `method: crown`: a proof per point that no input in the L-inf ball changes the class.

    Norm: L-inf, after the model's normalization, for chains of Linear, Conv2d, ReLU, Flatten, pooling
    (crown: no MaxPool2d), BatchNorm in eval mode, Dropout and Identity. The soundness check runs PGD
    with `attack_steps` steps and `attack_restarts` restarts at every epsilon. Example::

        certificates: [{name: interval-bounds, epsilons: ["1/255"], method: crown}]
    """

    method: str = "ibp"
    attack_steps: int = 50
    attack_restarts: int = 1

    kind: ClassVar[str] = "certificate"
    norm: ClassVar[str] = "linf"
    default_id: ClassVar[str] = "ibp"

    def __post_init__(self) -> None:
        if self.method not in ("ibp", "crown"):
            raise ValueError(f"method must be one of ibp, crown, got {self.method!r}")
        for name in ("attack_steps", "attack_restarts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    def check(self, net: nn.Module) -> None:
        """UnsupportedLayer, in one line naming the layer, for a network this method cannot follow."""
        steps = _steps(net)
        if self.method == "crown" and (blocker := _crown_blocker(steps)) is not None:
            raise blocker

    def margins(self, net: nn.Module, mean: Optional[torch.Tensor], std: Optional[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                eps: float) -> torch.Tensor:
        return margin_bounds(net, mean, std, x, y, eps, self.method)

    def verified(self, net: nn.Module, mean: Optional[torch.Tensor], std: Optional[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 eps: float) -> torch.Tensor:
        if len(y) == 0:
            return torch.zeros(0, dtype=torch.bool, device=x.device)
        return (self.margins(net, mean, std, x, y, eps) > 0).all(dim=1)
