"""Interval bounds (harness.defenses.intervals) against closed-form answers: one Linear layer exactly,
the [0, 1] clip, the normalization folded into the first layer, a two-layer ReLU network worked by
hand (IBP and CROWN), soundness on random networks of every supported layer against sampling and a
PGD search, the tightness ordering (elided >= naive, crown >= ibp), eps = 0, refusals, and the
caller's network left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from harness.defenses.intervals import IntervalBounds, UnsupportedLayer, check_supported, interval_bounds, margin_bounds

D = torch.float64


def _linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def _true_margins(net: nn.Module, mean, std, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logit_y - logit_j at the points z, in float64 (+inf at j = y)."""
    twin = copy.deepcopy(net).double().eval()
    zz = z.double()
    if mean is not None:
        zz = (zz - mean.double()) / std.double()
    with torch.no_grad():
        out = twin(zz)
    m = out.gather(1, y.view(-1, 1)) - out
    m[torch.arange(len(y)), y] = float("inf")
    return m


# ---- closed forms --------------------------------------------------------------------------------

def test_one_linear_layer_is_exactly_wx_plus_b_plus_minus_eps_times_row_l1_norm():
    lin = _linear(6, 4, seed=0)
    x = 0.3 + 0.4 * torch.rand(5, 6, generator=torch.Generator().manual_seed(1), dtype=D)  # interior: nothing is clipped
    eps = 0.1
    lo, hi = interval_bounds(lin, None, None, x - eps, x + eps)
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    centre = x.double() @ w.T + b
    spread = eps * w.abs().sum(dim=1)
    assert lo.dtype == hi.dtype == D
    torch.testing.assert_close(lo, centre - spread, atol=1e-12, rtol=0)
    torch.testing.assert_close(hi, centre + spread, atol=1e-12, rtol=0)


def test_clipping_at_the_box_edge_gives_the_exact_extremes_over_the_clipped_box():
    lin = _linear(6, 4, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 6, generator=g, dtype=D)
    x[:, :2] = torch.tensor([0.02, 0.97], dtype=D)  # within eps of the edges
    eps = 0.1
    y = torch.randint(0, 4, (8,), generator=g)
    blo, bhi = (x - eps).clamp(0, 1).double(), (x + eps).clamp(0, 1).double()
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    # a linear function's extremes over a box: each coordinate at whichever end its weight prefers
    exact_lo = torch.minimum(blo[:, None, :] * w, bhi[:, None, :] * w).sum(2) + b
    exact_hi = torch.maximum(blo[:, None, :] * w, bhi[:, None, :] * w).sum(2) + b
    lo, hi = interval_bounds(lin, None, None, blo, bhi)
    torch.testing.assert_close(lo, exact_lo, atol=1e-12, rtol=0)
    torch.testing.assert_close(hi, exact_hi, atol=1e-12, rtol=0)
    # the margins of one layer, elided, are the exact minima of (W_y - W_j) z + (b_y - b_j) over that box
    diff = w[y][:, None, :] - w[None, :, :]
    exact_margin = torch.minimum(blo[:, None, :] * diff, bhi[:, None, :] * diff).sum(2) + (b[y][:, None] - b[None, :])
    m = margin_bounds(lin, None, None, x, y, eps)
    off = torch.ones_like(m, dtype=torch.bool)
    off[torch.arange(8), y] = False
    torch.testing.assert_close(m[off], exact_margin[off], atol=1e-12, rtol=0)
    assert torch.isinf(m[~off]).all() and (m[~off] > 0).all()


def test_normalization_equals_folding_it_into_the_first_layer():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    folded = copy.deepcopy(net).double()
    conv = folded[0]
    with torch.no_grad():  # W ((z - m) / s) + b = (W / s) z + (b - sum W m / s): exact without padding
        w = conv.weight.clone()
        conv.weight.copy_(w / std.double().view(1, 3, 1, 1))
        conv.bias.copy_(conv.bias - (w * (mean / std).double().view(1, 3, 1, 1)).sum(dim=(1, 2, 3)))
    x = torch.rand(6, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    y = torch.arange(6) % 5
    eps = 0.03
    lo0, hi0 = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    lo_a, hi_a = interval_bounds(net, mean, std, lo0, hi0)
    lo_b, hi_b = interval_bounds(folded, None, None, lo0, hi0)
    torch.testing.assert_close(lo_a, lo_b, atol=1e-10, rtol=0)
    torch.testing.assert_close(hi_a, hi_b, atol=1e-10, rtol=0)
    torch.testing.assert_close(margin_bounds(net, mean, std, x, y, eps), margin_bounds(folded, None, None, x, y, eps),
                               atol=1e-10, rtol=0)
    # and the normalization matters: without it the bounds differ
    assert (interval_bounds(net, None, None, lo0, hi0)[0] - lo_a).abs().max() > 0.1


def _hand_net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -0.5]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
        net[2].bias.copy_(torch.tensor([0.125, -0.25]))  # exact in float32, so the hand figures are exact
    return net


def test_relu_network_worked_by_hand():
    """x = (0.5, 0.5), eps = 0.25: the box is [0.25, 0.75]^2.
    h1 = x1 - x2 in [-0.5, 0.5], h2 = x1 + x2 - 0.5 in [0, 1]; ReLU: r1 in [0, 0.5], r2 in [0, 1].
    logit0 = r1 - r2 + 0.125: centre -0.125, radius 0.75 -> [-0.875, 0.625];
    logit1 = 2 r1 + r2 - 0.25: centre 0.75, radius 1.0 -> [-0.25, 1.75].
    Elided margin 1 - 0 = r1 + 2 r2 - 0.375: centre 0.875, radius 1.25 -> -0.375 (naive: -0.25 - 0.625 = -0.875).
    Elided margin 0 - 1 = -r1 - 2 r2 + 0.375: centre -0.875, radius 1.25 -> -2.125.
    CROWN, margin 0 - 1: h1 crosses zero, so r1 <= 0.5 h1 + 0.25 (the chord), h2 is active (r2 = h2);
    -r1 - 2 r2 + 0.375 >= -2.5 x1 - 1.5 x2 + 1.125, whose minimum on the box (x = 0.75, 0.75) is -1.875.
    CROWN, margin 1 - 0: r1 >= 0 (u = -l: the lower line of slope 0), so >= 2 x1 + 2 x2 - 1.375 -> -0.375.
    The true minimum of margin 0 - 1 is -1.625 (at x = (0.75, 0.75))."""
    net = _hand_net()
    x = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    lo, hi = interval_bounds(net, None, None, x - 0.25, x + 0.25)
    torch.testing.assert_close(lo[0], torch.tensor([-0.875, -0.25], dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(hi[0], torch.tensor([0.625, 1.75], dtype=D), atol=1e-12, rtol=0)
    y = torch.tensor([1, 0])
    ibp = margin_bounds(net, None, None, x, y, 0.25)
    assert ibp[0, 0].item() == pytest.approx(-0.375, abs=1e-12) and ibp[1, 1].item() == pytest.approx(-2.125, abs=1e-12)
    assert (lo[0, 1] - hi[0, 0]).item() == pytest.approx(-0.875, abs=1e-12)
    crown = margin_bounds(net, None, None, x, y, 0.25, method="crown")
    assert crown[1, 1].item() == pytest.approx(-1.875, abs=1e-12)
    assert crown[0, 0].item() == pytest.approx(-0.375, abs=1e-12)
    grid = torch.stack(torch.meshgrid(torch.linspace(0.25, 0.75, 51), torch.linspace(0.25, 0.75, 51), indexing="ij"), -1).view(-1, 2)
    true = _true_margins(net, None, None, grid, torch.zeros(len(grid), dtype=torch.long))[:, 1]
    assert true.min().item() == pytest.approx(-1.625, abs=1e-12) and true.min() >= crown[1, 1]


def test_crown_keeps_the_ibp_margin_where_its_relaxation_is_looser():
    """h = 2x - 0.5 on x in [0, 0.75] is in [-0.5, 1]; the margin is relu(h) - 0. CROWN's lower line
    (slope 1, since u > -l) gives relu(h) >= h >= -0.5; IBP gives relu(h) >= 0, the true minimum.
    The margin kept is the larger: 0, not -0.5."""
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.fill_(2.0)
        net[0].bias.fill_(-0.5)
        net[2].weight.copy_(torch.tensor([[1.0], [0.0]]))
        net[2].bias.zero_()
    x, y = torch.tensor([[0.375]]), torch.tensor([0])
    assert margin_bounds(net, None, None, x, y, 0.375)[0, 1].item() == 0.0
    assert margin_bounds(net, None, None, x, y, 0.375, method="crown")[0, 1].item() == 0.0


class Reshaped(nn.Module):
    """The same network four ways of flattening: x.view(x.size(0), -1), x.reshape(x.shape[0], -1),
    torch.flatten(x, 1) and x.flatten(1)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.relu(self.conv(x))
        if self.form == "view":
            h = h.view(h.size(0), -1)
        elif self.form == "shape":
            h = h.reshape(h.shape[0], -1)
        elif self.form == "torch":
            h = torch.flatten(h, 1)
        else:
            h = h.flatten(1)
        return self.fc(h)


def test_every_form_of_flattening_gives_the_bounds_of_nn_flatten():
    torch.manual_seed(9)
    base = Reshaped("view")
    seq = nn.Sequential(base.conv, nn.ReLU(), nn.Flatten(), base.fc)
    x, y = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(9)), torch.tensor([0, 1, 2, 0, 1])
    want = margin_bounds(seq, None, None, x, y, 0.04, method="crown")
    for form in ("view", "shape", "torch", "method"):
        net = Reshaped(form)
        net.load_state_dict(base.state_dict())
        for method in ("ibp", "crown"):
            got = margin_bounds(net, None, None, x, y, 0.04, method=method)
            assert torch.equal(got, want if method == "crown" else margin_bounds(seq, None, None, x, y, 0.04)), (form, method)


# ---- soundness on random networks ----------------------------------------------------------------

def _randomize_bn(bn: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.3)
        bn.weight.copy_(torch.randn(bn.num_features, generator=g))  # negative scales too: |scale| on the radius
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)


class Viewed(nn.Module):
    """A custom forward: adaptive pooling and x.view(x.size(0), -1) instead of nn.Flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(h.view(h.size(0), -1))


def _random_net(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "viewed":
        net = Viewed()
    else:
        pool = nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), pool,
                            nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8),
                            nn.ReLU(), nn.Dropout(0.5), nn.Identity(), nn.Linear(8, 3))
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            _randomize_bn(m, g)
    return net.eval()


def _pgd_min_margin(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 40) -> torch.Tensor:
    """The smallest margin (B, K) a signed-gradient search finds in the clipped box, per target class."""
    twin = copy.deepcopy(net).double().eval()
    lo, hi = (x - eps).clamp(0, 1).double(), (x + eps).clamp(0, 1).double()
    k = int(twin(x.double()[:1]).shape[1])
    best = torch.full((len(y), k), float("inf"), dtype=D)
    for j in range(k):
        z = (lo + (hi - lo) * torch.rand(lo.shape, generator=torch.Generator().manual_seed(j), dtype=D)).requires_grad_(True)
        for _ in range(steps):
            out = twin(z)
            margin = out.gather(1, y.view(-1, 1)).squeeze(1) - out[:, j]
            best[:, j] = torch.minimum(best[:, j], margin.detach())
            (grad,) = torch.autograd.grad(margin.sum(), z)
            z = torch.max(torch.min(z.detach() - eps / 8 * grad.sign(), hi), lo).requires_grad_(True)
    best[torch.arange(len(y)), y] = float("inf")
    return best


@pytest.mark.parametrize("kind,seed", [("max", 0), ("avg", 1), ("viewed", 2), ("max", 3)])
def test_bounds_hold_for_sampled_points_and_a_pgd_search_on_random_networks(kind, seed):
    net = _random_net(kind, seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(4, 2, 8, 8, generator=g)
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.01])  # points at and near the clip
    y = torch.tensor([0, 1, 2, 0])
    eps = 0.05
    lo_box, hi_box = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    lo, hi = interval_bounds(net, None, None, lo_box, hi_box)
    methods = ["ibp"] + ([] if kind == "max" else ["crown"])
    bounds = {m: margin_bounds(net, None, None, x, y, eps, method=m) for m in methods}
    n = 256
    for i in range(len(x)):
        u = torch.rand((n, *x.shape[1:]), generator=g)
        u[: n // 2] = u[: n // 2].round()  # half the samples at corners of the box
        z = lo_box[i] + (hi_box[i] - lo_box[i]) * u
        out = copy.deepcopy(net).double()(z.double()).detach()
        assert (out >= lo[i] - 1e-9).all() and (out <= hi[i] + 1e-9).all()
        true = _true_margins(net, None, None, z, y[i].repeat(n)).min(dim=0).values
        for m, b in bounds.items():
            assert (b[i] <= true + 1e-9).all(), (m, b[i], true)
    searched = _pgd_min_margin(net, x, y, eps)
    for m, b in bounds.items():
        assert (b <= searched + 1e-9).all(), (m, b, searched)
    # sound, not vacuous: at a tiny eps every bound is within 1e-4 of the point's own margin
    tiny = margin_bounds(net, None, None, x, y, 1e-7)
    exact = _true_margins(net, None, None, x, y)
    off = torch.isfinite(exact)
    assert ((exact - tiny)[off] >= -1e-12).all() and ((exact - tiny)[off] < 1e-4).all()


# ---- tightness -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,seed", [("avg", 5), ("viewed", 6)])
def test_elided_margins_are_never_looser_than_naive_and_crown_never_looser_than_ibp(kind, seed):
    net = _random_net(kind, seed)
    x = torch.rand(8, 2, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=D)  # float64: the same box both ways
    y = torch.arange(8) % 3
    eps = 0.02
    lo, hi = interval_bounds(net, None, None, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    naive = lo.gather(1, y.view(-1, 1)) - hi
    off = torch.ones_like(naive, dtype=torch.bool)
    off[torch.arange(8), y] = False
    ibp = margin_bounds(net, None, None, x, y, eps)
    crown = margin_bounds(net, None, None, x, y, eps, method="crown")
    assert (ibp[off] >= naive[off] - 1e-12).all() and (ibp[off] > naive[off] + 1e-6).any()
    assert (crown[off] >= ibp[off]).all() and (crown[off] > ibp[off] + 1e-6).any()


# ---- eps = 0 ---------------------------------------------------------------------------------------

def test_at_eps_zero_verified_is_the_prediction_and_margins_are_the_logit_gaps():
    net = _random_net("max", 7)
    x = torch.rand(32, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(8))
    cert = IntervalBounds()
    proven = cert.verified(net, None, None, x, y, 0.0)
    exact = _true_margins(net, None, None, x, y)
    off = torch.isfinite(exact)
    torch.testing.assert_close(cert.margins(net, None, None, x, y, 0.0)[off], exact[off], atol=1e-10, rtol=0)
    with torch.no_grad():
        right = copy.deepcopy(net).double()(x.double()).argmax(1) == y
    clear = exact.masked_fill(~off, float("inf")).abs().min(dim=1).values > 1e-9
    assert 0 < int(right.sum()) < 32 and bool(clear.all())
    assert torch.equal(proven[clear], right[clear])
    assert cert.verified(net, None, None, x[:0], y[:0], 0.1).shape == (0,)


# ---- refusals ------------------------------------------------------------------------------------

class Squashed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Sigmoid()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc(x)))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)) + x)


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return -x


def _refusal(net: nn.Module, method: str = "ibp") -> str:
    with pytest.raises(UnsupportedLayer) as info:
        IntervalBounds(method=method).check(net)
    with pytest.raises(UnsupportedLayer):
        margin_bounds(net, None, None, torch.rand(2, 4), torch.tensor([0, 1]), 0.1, method=method)
    msg = str(info.value)
    assert "\n" not in msg and isinstance(info.value, ValueError)
    return msg


def test_unsupported_networks_are_refused_in_one_line_naming_the_layer():
    msg = _refusal(Squashed())
    assert msg.startswith("layer `act` (Sigmoid) is not supported by interval bounds") and "supported: Linear, Conv2d" in msg
    msg = _refusal(Residual())
    assert "`add` (operator.add)" in msg and "joins 2 tensors" in msg
    assert "cannot be traced" in _refusal(Branchy())
    train_bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))  # left in training mode
    msg = _refusal(train_bn)
    assert "layer `1` (BatchNorm1d)" in msg and "training mode" in msg
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2))
    assert _refusal(nested).startswith("layer `0.1` (Tanh)")
    check_supported(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))  # a supported one passes


def test_crown_refuses_max_pooling_and_names_the_way_out():
    net = _random_net("max", 0)
    with pytest.raises(UnsupportedLayer, match=r"layer `3` \(MaxPool2d\).*use method: ibp"):
        IntervalBounds(method="crown").check(net)
    with pytest.raises(UnsupportedLayer, match="MaxPool2d"):
        margin_bounds(net, None, None, torch.rand(1, 2, 8, 8), torch.tensor([0]), 0.01, method="crown")
    IntervalBounds().check(net)  # ibp follows it


def test_knobs_are_validated():
    for bad in ({"method": "lp"}, {"attack_steps": 0}, {"attack_restarts": True}, {"attack_steps": 2.5}):
        with pytest.raises(ValueError):
            IntervalBounds(**bad)
    assert (IntervalBounds.kind, IntervalBounds.norm, IntervalBounds.default_id) == ("certificate", "linf", "ibp")


# ---- the caller's network ------------------------------------------------------------------------

def test_the_callers_network_is_left_as_it_was():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * 6 * 6, 4))
    net.train()  # Dropout in training mode: the bounds use an eval copy, the caller keeps its mode
    net[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    first = margin_bounds(net, None, None, x, y, 0.05)
    IntervalBounds(method="crown").verified(net, None, None, x, y, 0.05)
    interval_bounds(net, None, None, x, x + 0.01)
    assert all(p.dtype == torch.float32 for p in net.parameters()) and x.dtype == torch.float32
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert net.training and all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == [False, True, True, True]
    torch.testing.assert_close(margin_bounds(net, None, None, x, y, 0.05), first, atol=0, rtol=0)  # dropout never fired
