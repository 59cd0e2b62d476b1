"""Interval bound propagation (and CROWN) against answers known in closed form: one Linear layer's
bounds exactly, the [0, 1] box's clipping, normalization, a ReLU network worked by hand; soundness
on random networks of every supported layer; tightness order; refusal of other layers in one line;
the caller's network untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from harness.defenses.intervals import IntervalBounds, UnsupportedLayer, check_supported, interval_bounds, margin_bounds


def _linear(seed: int = 0, n_in: int = 16, n_out: int = 5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_out))


def test_one_linear_layer_has_the_bounds_wx_plus_b_plus_or_minus_eps_times_the_l1_norm_of_each_row():
    net = _linear()
    x = (0.25 + 0.5 * torch.rand(7, 1, 4, 4)).double()
    eps = 0.1  # x in [0.25, 0.75]: the box stays inside [0, 1]
    lo, hi = interval_bounds(net, None, None, x - eps, x + eps)
    w, b = net[1].weight.double().detach(), net[1].bias.double().detach()
    centre = x.flatten(1) @ w.T + b
    spread = eps * w.abs().sum(dim=1)
    assert torch.allclose(lo, centre - spread, atol=1e-12, rtol=0) and torch.allclose(hi, centre + spread, atol=1e-12, rtol=0)
    assert lo.dtype == torch.float64


def test_the_box_is_clipped_to_the_unit_cube_exactly():
    """Near an edge the box is [max(x - eps, 0), min(x + eps, 1)]: the minimum of a linear function
    over it takes each coordinate's lower end where its weight is positive, the upper end otherwise."""
    net = _linear(1)
    x = torch.rand(5, 1, 4, 4)
    x[:, :, 0] = 0.02  # a row of pixels within eps of 0
    eps = 0.1
    y = torch.zeros(5, dtype=torch.long)
    m = margin_bounds(net, None, None, x, y, eps)
    w, b = net[1].weight.double().detach(), net[1].bias.double().detach()
    lo, hi = (x.double() - eps).clamp(0, 1).flatten(1), (x.double() + eps).clamp(0, 1).flatten(1)
    for j in range(1, 5):
        d = w[0] - w[j]
        want = torch.where(d > 0, lo, hi) @ d + (b[0] - b[j])
        assert torch.allclose(m[:, j], want, atol=1e-12, rtol=0)
    assert torch.isinf(m[:, 0]).all()


def test_normalization_is_the_same_as_folding_it_into_the_first_layer():
    net = _linear(2, 48, 4)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    folded = copy.deepcopy(net)
    with torch.no_grad():
        scale = (1 / std).expand(1, 3, 4, 4).flatten()
        shift = (-mean / std).expand(1, 3, 4, 4).flatten()
        folded[1].bias += folded[1].weight @ shift
        folded[1].weight *= scale
    x = torch.rand(6, 3, 4, 4)
    y = torch.randint(0, 4, (6,))
    a = margin_bounds(net, mean, std, x, y, 0.03)
    b = margin_bounds(folded, None, None, x, y, 0.03)
    assert torch.allclose(a, b, atol=1e-5)


def test_a_relu_network_worked_by_hand():
    """x in [0.4, 0.6] (x = 0.5, eps = 0.1). Layer 1: h1 = 2x - 1 in [-0.2, 0.2], h2 = -x + 1 in [0.4, 0.6];
    ReLU: [0, 0.2] and [0.4, 0.6]. Layer 2: z0 = h1 + h2 in [0.4, 0.8], z1 = h1 - h2 + 0.5 in [-0.1, 0.3].
    Elided margin z0 - z1 = 2 h2 - 0.5 in [0.3, 0.7]: lower bound 0.3 (the naive l0 - u1 gives 0.1)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[2.0], [-1.0]]))
        net[1].bias.copy_(torch.tensor([-1.0, 1.0]))
        net[3].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        net[3].bias.copy_(torch.tensor([0.0, 0.5]))
    x = torch.full((1, 1, 1, 1), 0.5)
    lo, hi = interval_bounds(net, None, None, x - 0.1, x + 0.1)
    assert lo.flatten().tolist() == pytest.approx([0.4, -0.1], abs=1e-7) and hi.flatten().tolist() == pytest.approx([0.8, 0.3], abs=1e-7)
    m = margin_bounds(net, None, None, x, torch.tensor([0]), 0.1)
    assert m[0, 1].item() == pytest.approx(0.3, abs=1e-7)
    assert IntervalBounds().verified(net, None, None, x, torch.tensor([0]), 0.1).tolist() == [True]
    assert IntervalBounds().verified(net, None, None, x, torch.tensor([1]), 0.1).tolist() == [False]


def _random_net(seed: int, pool: str) -> nn.Module:
    torch.manual_seed(seed)
    pooling = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "adaptive": nn.AdaptiveAvgPool2d(4)}[pool]
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), pooling, nn.Conv2d(6, 8, 3, stride=1, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(128, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Identity(),
                        nn.Linear(24, 10))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.3, 2.0)
                m.weight.uniform_(-1.5, 1.5)  # negative scales too: |scale| on the radius
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("pool", ["max", "avg", "adaptive"])
def test_the_bounds_hold_on_random_networks_of_every_supported_layer(pool):
    """Outputs of 300 random points in each box lie inside the logit bounds; no sampled point's margin
    is below its lower bound; a signed-gradient search toward the bound does not cross it either."""
    net = _random_net(3, pool)
    x = torch.rand(8, 1, 8, 8)
    y = net(x).argmax(dim=1)
    for eps in (0.005, 0.03):
        lo, hi = interval_bounds(net, None, None, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
        samples = (x.unsqueeze(0) + eps * (2 * torch.rand(300, *x.shape) - 1)).clamp(0, 1)
        corners = (x.unsqueeze(0) + eps * torch.sign(torch.randn(100, *x.shape))).clamp(0, 1)
        pts = torch.cat([samples, corners])
        with torch.no_grad():
            out = net.double()(pts.flatten(0, 1).double()).view(len(pts), len(x), -1)
        net.float()
        assert bool((out >= lo - 1e-9).all() and (out <= hi + 1e-9).all())
        methods = ["ibp"] + (["crown"] if pool != "max" else [])
        for method in methods:
            m = margin_bounds(net, None, None, x, y, eps, method)
            true = out.gather(2, y.view(1, -1, 1).expand(len(pts), -1, 1)) - out
            finite = torch.isfinite(m)
            assert bool((true.min(dim=0).values[finite] >= m[finite] - 1e-9).all()), method
        # a margin-descent search over the box stays above the lower bound
        m = margin_bounds(net, None, None, x, y, eps)
        z = x.clone().requires_grad_(True)
        for _ in range(30):
            logits = net(z)
            worst = (logits.gather(1, y.unsqueeze(1)) - logits + torch.nn.functional.one_hot(y, 10) * 1e9).min(dim=1).values
            (g,) = torch.autograd.grad(worst.sum(), z)
            z = (torch.min(torch.max(z.detach() - eps / 10 * g.sign(), x - eps), x + eps)).clamp(0, 1).requires_grad_(True)
        with torch.no_grad():
            logits = net(z).double()
            found = (logits.gather(1, y.unsqueeze(1)) - logits + torch.nn.functional.one_hot(y, 10) * 1e9).min(dim=1).values
        assert bool((found >= m.min(dim=1).values - 1e-6).all())


def test_the_elided_margins_and_crown_are_never_looser_and_often_tighter():
    net = _random_net(4, "avg")
    x = torch.rand(16, 1, 8, 8)
    y = net(x).argmax(dim=1)
    eps = 0.01
    lo, hi = interval_bounds(net, None, None, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    naive = lo.gather(1, y.unsqueeze(1)) - hi
    ibp = margin_bounds(net, None, None, x, y, eps)
    crown = margin_bounds(net, None, None, x, y, eps, "crown")
    finite = torch.isfinite(ibp)
    assert bool((ibp[finite] >= naive[finite] - 1e-12).all()) and bool((ibp[finite] > naive[finite] + 1e-6).any())
    assert bool((crown[finite] >= ibp[finite] - 1e-12).all()) and bool((crown[finite] > ibp[finite] + 1e-6).any())
    v_ibp = IntervalBounds().verified(net, None, None, x, y, eps)
    v_crown = IntervalBounds(method="crown").verified(net, None, None, x, y, eps)
    assert bool((v_crown >= v_ibp).all())


def test_at_epsilon_zero_verified_is_the_prediction():
    net = _random_net(5, "max")
    x = torch.rand(30, 1, 8, 8)
    y = torch.randint(0, 10, (30,))
    with torch.no_grad():
        right = net(x).argmax(dim=1) == y
    assert torch.equal(IntervalBounds().verified(net, None, None, x, y, 0.0), right)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        return self.out(h + torch.relu(self.fc(h)))


class Viewed(nn.Module):
    """A custom forward with x.view(x.size(0), -1) and F.relu: traced, supported."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("net, words", [
    (nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Sigmoid(), nn.Linear(4, 2)), ["layer `2`", "Sigmoid"]),
    (Residual(), ["more than one chain"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4).train()), ["layer `2`", "training mode"]),
])
def test_another_layer_is_refused_in_one_line_naming_it(net, words):
    with pytest.raises(UnsupportedLayer) as e:
        check_supported(net)
    text = str(e.value)
    assert "\n" not in text and all(w in text for w in words), text


def test_crown_refuses_max_pooling_and_a_custom_forward_is_followed():
    with pytest.raises(UnsupportedLayer, match="MaxPool2d.*use method: ibp"):
        IntervalBounds(method="crown").check(_random_net(0, "max"))
    torch.manual_seed(0)
    net = Viewed().eval()
    x = torch.rand(4, 1, 4, 4)
    y = net(x).argmax(dim=1)
    check_supported(net)
    assert bool(IntervalBounds().verified(net, None, None, x, y, 0.0).all())
    lo, hi = interval_bounds(net, None, None, x, x)
    assert torch.allclose(lo.float(), net(x), atol=1e-5) and torch.allclose(hi.float(), net(x), atol=1e-5)


def test_the_callers_network_is_left_as_it_was():
    net = _random_net(6, "avg").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UnsupportedLayer):  # BatchNorm in training mode: refused, and nothing changed
        margin_bounds(net, None, None, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.01)
    net.eval()
    margin_bounds(net, None, None, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 0.01, "crown")
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert not net.training and next(net.parameters()).dtype == torch.float32


@pytest.mark.parametrize("knobs", [{"method": "lp"}, {"attack_steps": 0}, {"attack_restarts": 1.5}])
def test_a_bad_knob_is_refused(knobs):
    with pytest.raises(ValueError, match=list(knobs)[0]):
        IntervalBounds(**knobs)
