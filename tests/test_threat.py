"""ThreatModel: the norm math every attack relies on, checked against direct computations."""

import pytest
import torch

from harness.attacks import ThreatModel


@pytest.fixture
def x():
    return torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_project_lands_inside_ball_and_box(norm, x):
    threat = ThreatModel(norm, 0.3)
    far = x + 5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    p = threat.project(far, x)
    assert bool(threat.contains(p, x).all())
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert float(threat.distance(p, x).max()) <= 0.3 + 1e-6


def test_linf_projection_is_elementwise_clamp(x):
    threat = ThreatModel("linf", 0.1)
    delta = torch.full_like(x, 0.25)
    p = threat.project(x + delta, x)
    expected = torch.minimum(x + 0.1, torch.ones_like(x))
    assert torch.allclose(p, expected)


def test_l2_projection_scales_onto_sphere():
    x = torch.full((1, 1, 2, 2), 0.5)
    delta = torch.tensor([0.3, 0.4, 0.0, 0.0]).view(1, 1, 2, 2)  # norm 0.5
    p = ThreatModel("l2", 0.25).project(x + delta, x)
    assert torch.allclose(p - x, delta / 2, atol=1e-6)


def test_point_inside_is_unchanged(x):
    threat = ThreatModel("l2", 1.0)
    inside = (x + 0.01).clamp(0, 1)
    assert torch.allclose(threat.project(inside, x), inside)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_inside_and_uses_the_budget(norm, x):
    eps = torch.linspace(0.05, 0.5, x.shape[0])
    threat = ThreatModel(norm, eps)
    g = torch.Generator().manual_seed(0)
    s = threat.random_start(x, g)
    assert bool(threat.contains(s, x).all())
    d = threat.distance(s, x)
    assert float((d / eps).mean()) > 0.3  # not collapsed onto x
    s2 = threat.random_start(x, torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)


def test_normalize_grad():
    g = torch.tensor([[3.0, -4.0, 0.0]])
    assert torch.equal(ThreatModel("linf", 1.0).normalize_grad(g), torch.tensor([[1.0, -1.0, 0.0]]))
    assert torch.allclose(ThreatModel("l2", 1.0).normalize_grad(g), torch.tensor([[0.6, -0.8, 0.0]]))


def test_contains_uses_tolerance_and_bounds():
    x = torch.full((3, 4), 0.5)
    threat = ThreatModel("linf", 0.1)
    adv = x.clone()
    adv[0, 0] += 0.1 + 5e-7  # within tolerance
    adv[1, 0] += 0.1 + 1e-4  # outside the budget
    adv[2, 0] = 1.05  # outside the bounds and the budget
    assert threat.contains(adv, x).tolist() == [True, False, False]


def test_per_sample_epsilon_and_subset(x):
    eps = torch.arange(x.shape[0], dtype=torch.float32) / 100
    threat = ThreatModel("linf", eps)
    sub = threat.subset(torch.tensor([3, 5]))
    assert sub.per_sample(x[:2]).tolist() == pytest.approx([0.03, 0.05])
    with pytest.raises(ValueError):
        ThreatModel("linf", -0.1)
    with pytest.raises(ValueError):
        ThreatModel("l1", 0.1)
