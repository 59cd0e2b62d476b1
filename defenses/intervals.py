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
https://arxiv.org/abs/1811.00866): each ReLU between interval pre-activation bounds l < 0 < u is
bounded by lines, and the margins are back-substituted through the affine layers to the input box,
where a linear function's minimum is exact; the margin kept is the larger of CROWN's and IBP's.

Networks of Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm (in
eval mode), Dropout and Identity, in any module structure torch.fx can trace into a chain; anything
else is refused in one line naming the layer. Bounds are computed in float64 on a copy of the
network. Example::

    certificates: [{name: interval-bounds, epsilons: ["1/255", "2/255"]}]
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .registry import CERTIFICATES

__all__ = ["IntervalBounds", "UnsupportedLayer", "check_supported", "interval_bounds", "margin_bounds"]

_AFFINE = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_MONOTONE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
SUPPORTED = ("Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, BatchNorm1d, BatchNorm2d (eval), Dropout, "
             "Identity; and torch.flatten, relu, view/reshape")
_RESHAPE_METHODS = ("view", "reshape", "flatten")


class UnsupportedLayer(ValueError):
    """A network interval bounds cannot follow; the message is one line naming the layer."""


def _refuse(what: str, method: str = "ibp") -> UnsupportedLayer:
    return UnsupportedLayer(f"{what} is not supported by interval bounds{'' if method == 'ibp' else f' (method {method})'} "
                            f"(supported: {SUPPORTED})")


def _steps(net: nn.Module) -> list[tuple[str, Any, tuple, dict]]:
    """The network as a chain of (kind, target, extra args, kwargs): kind "module" (target the
    submodule, named), "relu", "flatten" (start dim), "reshape" (the shape args). UnsupportedLayer
    for anything else, or for a graph that is not a chain."""
    import torch.fx as fx

    try:
        graph = fx.symbolic_trace(net).graph
    except Exception as e:  # noqa: BLE001 (fx raises many kinds for untraceable code)
        raise UnsupportedLayer(f"the network cannot be traced into layers by torch.fx ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:160]}), so interval bounds cannot follow it") from None
    modules = dict(net.named_modules())
    chain: list[tuple[str, Any, tuple, dict]] = []
    current: Optional[Any] = None
    sizes: set = set()  # x.size(0) nodes: the batch size a reshape keeps
    for node in graph.nodes:
        if node.op == "placeholder":
            current = node
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise UnsupportedLayer("the network's output is not the end of one chain of layers, so interval bounds cannot follow it")
            break
        if node.op == "call_method" and node.target == "size" and node.args[0] is current and tuple(node.args[1:]) == (0,):
            sizes.add(node)
            continue  # the batch size, read off the tensor when a reshape needs it
        tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and a not in sizes]
        if len(tensors) != 1 or tensors[0] is not current:
            what = f"`{node.target}`" if node.op != "call_module" else f"layer `{node.target}`"
            raise UnsupportedLayer(f"{what} ({node.op} on {len(tensors)} tensors) makes the network more than one chain of layers; "
                                   f"interval bounds follow chains only (supported: {SUPPORTED})")
        if node.op == "call_module":
            m = modules[node.target]
            if not isinstance(m, _AFFINE + _MONOTONE):
                raise _refuse(f"layer `{node.target}` ({type(m).__name__})")
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and (m.training or m.running_mean is None):
                raise UnsupportedLayer(f"layer `{node.target}` ({type(m).__name__}) is in training mode or keeps no running statistics: "
                                       "interval bounds need BatchNorm in eval mode")
            chain.append(("module", (node.target, m), (), {}))
        elif node.op == "call_function" and node.target in (torch.relu, F.relu):
            chain.append(("relu", None, (), {}))
        elif node.op == "call_function" and node.target is torch.flatten:
            chain.append(("flatten", None, (node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0),), {}))
        elif node.op == "call_method" and node.target == "relu":
            chain.append(("relu", None, (), {}))
        elif node.op == "call_method" and node.target in _RESHAPE_METHODS:
            if node.target == "flatten":
                chain.append(("flatten", None, (node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0),), {}))
            else:
                shape = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else tuple(node.args[1])
                chain.append(("reshape", None, tuple(shape), {}))
        elif node.op == "call_function" and node.target is operator.getitem:
            raise _refuse(f"indexing `{node.name}`")
        else:
            name = getattr(node.target, "__name__", str(node.target))
            raise _refuse(f"`{name}` ({node.op})")
        current = node
    return chain


def check_supported(net: nn.Module) -> None:
    """UnsupportedLayer naming the first layer interval bounds cannot follow; None when it can."""
    _steps(net)


def _shape_of(args: tuple, t: torch.Tensor) -> list[int]:
    """A reshape's target shape; a size read from the tensor (x.size(0)) stands as the batch size."""
    out = []
    for a in args:
        out.append(int(t.shape[0]) if not isinstance(a, int) else a)  # an fx node here is x.size(...), the batch
    return out


def _box(x: torch.Tensor, eps: float, mean: Optional[torch.Tensor], std: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The L-inf box around x, clipped to [0, 1], after normalization (std > 0 keeps the ends in order)."""
    lo, hi = (x.double() - eps).clamp(0.0, 1.0), (x.double() + eps).clamp(0.0, 1.0)
    if mean is not None:
        lo, hi = lo - mean.double().to(x.device), hi - mean.double().to(x.device)
    if std is not None:
        lo, hi = lo / std.double().to(x.device), hi / std.double().to(x.device)
    return lo, hi


def _channel_view(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (t.dim() - 2)))


def _bn_scale(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm in eval mode as the per-channel affine map it is: (scale, shift)."""
    scale = (m.weight if m.weight is not None else torch.ones_like(m.running_var)) / torch.sqrt(m.running_var + m.eps)
    shift = (m.bias if m.bias is not None else torch.zeros_like(m.running_mean)) - m.running_mean * scale
    return scale, shift


def _affine(m: nn.Module, mid: torch.Tensor, rad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An affine layer on a centre and a radius: (W mid + b, |W| rad)."""
    if isinstance(m, nn.Linear):
        return F.linear(mid, m.weight, m.bias), F.linear(rad, m.weight.abs())
    if isinstance(m, nn.Conv2d):
        conv = lambda t, w, b: F.conv2d(t, w, b, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
        return conv(mid, m.weight, m.bias), conv(rad, m.weight.abs(), None)
    scale, shift = _bn_scale(m)
    return mid * _channel_view(scale, mid) + _channel_view(shift, mid), rad * _channel_view(scale.abs(), rad)


def _through(step: tuple, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the chain on the interval [lo, hi]."""
    kind, target, args, _ = step
    if kind == "relu":
        return lo.clamp_min(0), hi.clamp_min(0)
    if kind == "flatten":
        return lo.flatten(args[0]), hi.flatten(args[0])
    if kind == "reshape":
        shape = _shape_of(args, lo)
        return lo.reshape(shape), hi.reshape(shape)
    _, m = target
    if isinstance(m, _AFFINE):
        centre, spread = _affine(m, (hi + lo) / 2, (hi - lo) / 2)
        return centre - spread, centre + spread
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return lo, hi
    return m(lo), m(hi)  # ReLU, pooling and Flatten are monotone in every input


def _prepared(net: nn.Module, device: torch.device) -> nn.Module:
    twin = copy.deepcopy(net).double().to(device)
    twin.eval()
    return twin


def interval_bounds(net: nn.Module, mean: Optional[torch.Tensor], std: Optional[torch.Tensor], lower: torch.Tensor,
                    upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the logits over every input in [lower, upper] (in [0, 1] input space), float64."""
    assert lower.shape == upper.shape and lower.dim() >= 2, (tuple(lower.shape), tuple(upper.shape))
    steps = _steps(net)
    twin = _prepared(net, lower.device)
    modules = dict(twin.named_modules())
    lo, hi = lower.double(), upper.double()
    if mean is not None:
        lo, hi = lo - mean.double().to(lo.device), hi - mean.double().to(lo.device)
    if std is not None:
        lo, hi = lo / std.double().to(lo.device), hi / std.double().to(lo.device)
    with torch.no_grad():
        for kind, target, args, kw in steps:
            step = (kind, (target[0], modules[target[0]]) if target else None, args, kw)
            lo, hi = _through(step, lo, hi)
    return lo, hi


def _elided(m: nn.Linear, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K) lower bounds of logit_y - logit_j from the last Linear layer's rows W_y - W_j."""
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    diff = m.weight[y].unsqueeze(1) - m.weight.unsqueeze(0)  # (B, K, in)
    bias = 0.0 if m.bias is None else m.bias[y].unsqueeze(1) - m.bias.unsqueeze(0)
    return torch.einsum("bki,bi->bk", diff, mid) + bias - torch.einsum("bki,bi->bk", diff.abs(), rad)


def _crown(chain: list, pre: list, lo0: torch.Tensor, hi0: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CROWN's margin lower bounds: the margin spec back-substituted through the chain with linear
    ReLU relaxations from the interval pre-activation bounds `pre` (one (lo, hi) per ReLU), then
    minimised exactly over the normalized input box [lo0, hi0]."""
    b = len(y)
    spec = torch.eye(num_classes, dtype=torch.float64, device=y.device)
    lam = spec[y].unsqueeze(1) - spec.unsqueeze(0)  # (B, K, K): rows e_y - e_j on the logits
    const = torch.zeros(b, num_classes, dtype=torch.float64, device=y.device)
    shapes = [s for s in _shapes_along(chain, lo0)]
    relu_k = len(pre)
    for idx in range(len(chain) - 1, -1, -1):
        kind, target, args, _ = chain[idx]
        in_shape = shapes[idx]
        m = target[1] if target else None
        if kind == "relu" or isinstance(m, nn.ReLU):
            relu_k -= 1
            l, u = pre[relu_k]
            l, u = l.flatten(1), u.flatten(1)
            active, dead = l >= 0, u <= 0
            cross = ~active & ~dead
            slope_up = torch.where(cross, u / (u - l).clamp_min(1e-300), active.double())
            icpt_up = torch.where(cross, -l * slope_up, torch.zeros_like(l))
            slope_lo = torch.where(cross, (u > -l).double(), active.double())  # the adaptive lower line (0 or 1)
            lam_flat = lam.flatten(2)
            pos, neg = lam_flat.clamp_min(0), lam_flat.clamp_max(0)
            const = const + torch.einsum("bki,bi->bk", neg, icpt_up)  # a negative coefficient meets the upper line
            lam = (pos * slope_lo.unsqueeze(1) + neg * slope_up.unsqueeze(1)).view(lam.shape)
        elif kind in ("flatten", "reshape") or isinstance(m, (nn.Flatten, nn.Dropout, nn.Identity)):
            lam = lam.reshape(b, num_classes, *in_shape[1:])
        elif isinstance(m, nn.Linear):
            lam_flat = lam.flatten(2)
            if m.bias is not None:
                const = const + lam_flat @ m.bias
            lam = (lam_flat @ m.weight).view(b, num_classes, *in_shape[1:])
        elif isinstance(m, nn.Conv2d):
            out = lam.flatten(0, 1)
            if m.bias is not None:
                const = const + (lam.sum(dim=(3, 4)) * m.bias.view(1, 1, -1)).sum(dim=2)
            pad = _conv_output_padding(m, in_shape, out.shape)
            back = F.conv_transpose2d(out, m.weight, None, m.stride, m.padding, pad, m.groups, m.dilation)
            lam = back.view(b, num_classes, *in_shape[1:])
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale, shift = _bn_scale(m)
            view = (1, 1, -1) + (1,) * (lam.dim() - 3)
            const = const + (lam * shift.view(view)).flatten(2).sum(dim=2)
            lam = lam * scale.view(view)
        elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            lam = _avgpool_back(m, lam, in_shape)
        else:
            raise _refuse(f"layer `{target[0]}` ({type(m).__name__})", "crown")
    mid, rad = ((hi0 + lo0) / 2).flatten(1), ((hi0 - lo0) / 2).flatten(1)
    lam_flat = lam.flatten(2)
    return torch.einsum("bki,bi->bk", lam_flat, mid) - torch.einsum("bki,bi->bk", lam_flat.abs(), rad) + const


def _shapes_along(chain: list, x: torch.Tensor) -> list[torch.Size]:
    """The input shape of every step of the chain (a forward pass of the centre)."""
    shapes, t = [], x
    for step in chain:
        shapes.append(t.shape)
        t, _ = _through(step, t, t)
    return shapes


def _conv_output_padding(m: nn.Conv2d, in_shape: torch.Size, out_shape: torch.Size) -> tuple[int, int]:
    pads = []
    for d in range(2):
        full = (out_shape[2 + d] - 1) * m.stride[d] - 2 * m.padding[d] + m.dilation[d] * (m.kernel_size[d] - 1) + 1
        pads.append(int(in_shape[2 + d] - full))
    return pads[0], pads[1]


def _avgpool_back(m: nn.Module, lam: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """The transpose of an average pooling (a linear map) applied to every row of `lam`, by autograd."""
    b, k = lam.shape[:2]
    probe = torch.zeros((1, *in_shape[1:]), dtype=lam.dtype, device=lam.device, requires_grad=True)
    with torch.enable_grad():
        out = m(probe)
        (g,) = torch.autograd.grad(out, probe, lam.reshape(b * k, *out.shape), is_grads_batched=True)
    return g.view(b, k, *in_shape[1:])


def margin_bounds(net: nn.Module, mean: Optional[torch.Tensor], std: Optional[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  eps: float, method: str = "ibp") -> torch.Tensor:
    """(B, K) float64 lower bounds of logit_y - logit_j over the box [x - eps, x + eps] clipped to
    [0, 1]; +inf at j = y. `method` "ibp" (elided last layer) or "crown" (never looser than ibp)."""
    assert x.dim() >= 2 and y.shape == (len(x),), (tuple(x.shape), tuple(y.shape))
    steps = _steps(net)
    twin = _prepared(net, x.device)
    modules = dict(twin.named_modules())
    chain = [(k, (t[0], modules[t[0]]) if t else None, a, kw) for k, t, a, kw in steps]
    lo0, hi0 = _box(x, float(eps), mean, std)
    last = chain[-1][1][1] if chain and chain[-1][0] == "module" else None
    body = chain[:-1] if isinstance(last, nn.Linear) else chain
    lo, hi, pre = lo0, hi0, []
    with torch.no_grad():
        for step in body:
            if step[0] == "relu" or (step[1] is not None and isinstance(step[1][1], nn.ReLU)):
                pre.append((lo, hi))
            lo, hi = _through(step, lo, hi)
        if isinstance(last, nn.Linear):
            margins = _elided(last, lo, hi, y)
        else:
            margins = lo.gather(1, y.unsqueeze(1)) - hi
        if method == "crown":
            if any(s[1] is not None and isinstance(s[1][1], nn.MaxPool2d) for s in chain):
                name = next(s[1][0] for s in chain if s[1] is not None and isinstance(s[1][1], nn.MaxPool2d))
                raise UnsupportedLayer(f"layer `{name}` (MaxPool2d) has no linear relaxation in method crown; use method: ibp")
            k = int(margins.shape[1])
            margins = torch.maximum(margins, _crown(chain, pre, lo0, hi0, y, k))
    margins = margins.clone()
    margins[torch.arange(len(y)), y] = math.inf
    return margins


@CERTIFICATES.register("interval-bounds")
@dataclass(frozen=True)
class IntervalBounds:
    """Interval bound propagation (Gowal et al. 2018), or CROWN's linear relaxation (Zhang et al. 2018)
    with `method: crown`: a proof per point that no input in the L-inf ball changes the class.

    Norm: L-inf. The soundness check runs PGD with `attack_steps` steps and `attack_restarts`
    restarts at every epsilon. Example::

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
        check_supported(net)
        if self.method == "crown":
            for name, m in net.named_modules():
                if isinstance(m, nn.MaxPool2d):
                    raise UnsupportedLayer(f"layer `{name}` (MaxPool2d) has no linear relaxation in method crown; use method: ibp")

    def margins(self, net, mean, std, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        return margin_bounds(net, mean, std, x, y, eps, self.method)

    def verified(self, net, mean, std, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        if len(y) == 0:
            return torch.zeros(0, dtype=torch.bool, device=x.device)
        return (self.margins(net, mean, std, x, y, eps) > 0).all(dim=1)
