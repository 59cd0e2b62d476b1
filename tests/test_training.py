"""The one training loop (harness.training): resume repeats the uninterrupted run, the schedule is a
function of the position alone, and the config layer translates `train:` into its settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.config import TrainConfig
from harness.training import OptimizerSettings, ScheduleSettings, TrainSettings, learning_rate, make_optimizer, train_epochs


def _data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))


SETTINGS = TrainSettings(epochs=3, batch_size=20, optimizer=OptimizerSettings("sgd", lr=0.1, momentum=0.9, weight_decay=1e-3),
                         schedule=ScheduleSettings("onecycle", pct_start=0.3))


def _step(net):
    return lambda xb, yb, g: F.cross_entropy(net(xb), yb)


def test_a_resumed_run_repeats_the_uninterrupted_one():
    x, y = _data()
    straight = _net()
    train_epochs(straight, x, y, SETTINGS, torch.device("cpu"), _step(straight), seed=7)

    first = _net()
    saved: dict = {}

    def stop_after_one(epoch, loss, lr):  # a checkpoint, then the process dies
        saved.update(weights={k: v.clone() for k, v in first.state_dict().items()}, optimizer=opt_box[0].state_dict())
        return True

    opt_box = [make_optimizer(SETTINGS, first)]
    train_epochs(first, x, y, SETTINGS, torch.device("cpu"), _step(first), seed=7, optimizer=opt_box[0], on_epoch=stop_after_one)
    resumed = _net()
    resumed.load_state_dict(saved["weights"])
    opt = make_optimizer(SETTINGS, resumed)
    opt.load_state_dict(saved["optimizer"])
    train_epochs(resumed, x, y, SETTINGS, torch.device("cpu"), _step(resumed), seed=7, first_epoch=1, optimizer=opt)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    other = _net()
    train_epochs(other, x, y, SETTINGS, torch.device("cpu"), _step(other), seed=8)
    assert not torch.equal(other[0].weight, straight[0].weight)  # the seed does reach the order and dropout


def test_until_stops_early_on_the_full_schedule():
    x, y = _data()
    net, seen = _net(), []
    train_epochs(net, x, y, SETTINGS, torch.device("cpu"), _step(net), seed=0, until=2,
                 on_epoch=lambda epoch, loss, lr: seen.append((epoch, lr)))
    n_batches = math.ceil(len(y) / SETTINGS.batch_size)
    assert [e for e, _ in seen] == [1, 2]
    assert seen[-1][1] == pytest.approx(learning_rate(SETTINGS, 1, (n_batches - 1) / n_batches))
    assert not net.training


@pytest.mark.parametrize("name, epoch, expected", [("none", 2, 0.1), ("cosine", 0, 0.1), ("step", 2, 0.1 * 0.1), ("onecycle", 0, 0.0)])
def test_learning_rate_is_a_function_of_the_position(name, epoch, expected):
    s = TrainSettings(epochs=4, optimizer=OptimizerSettings("adam", lr=0.1), schedule=ScheduleSettings(name))
    assert learning_rate(s, epoch, 0.0) == pytest.approx(expected)


def test_a_diverging_loss_names_its_epoch():
    x, y = _data()
    net = _net()
    with pytest.raises(FloatingPointError, match="epoch 1"):
        train_epochs(net, x, y, SETTINGS, torch.device("cpu"), lambda xb, yb, g: net(xb).sum() * float("nan"), seed=0)


def test_the_config_layer_translates_train():
    cfg = TrainConfig.model_validate({"epochs": 4, "data": {"batch_size": 32}, "optimizer": {"name": "adam", "lr": 0.001},
                                      "schedule": {"name": "step", "milestones": [2, 3]}, "amp": True})
    assert cfg.settings() == TrainSettings(epochs=4, batch_size=32, amp=True, optimizer=OptimizerSettings("adam", 0.001, 0.9, 5e-4),
                                           schedule=ScheduleSettings("step", (2, 3), 0.1, 0.4))
    assert TrainConfig().settings().batch_size == 128
