"""`timm:NAME` model sources: built with pretrained=False from timm's registry, weights from a local
file, the model's own mean and std as the preprocessing unless the config gives one (a small model
timm ships for its own tests, saved here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import harness
from harness.core.errors import BadInput
from harness.sources.models import load_model

timm = pytest.importorskip("timm", reason="pip install -e '.[dev]' (timm is a dev dependency)")

NAME = "test_resnet"  # ~0.37M parameters, 3x160x160 inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(NAME, pretrained=False, num_classes=4).eval()
    path = tmp_path_factory.mktemp("timm") / "net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net


def test_the_models_own_normalization_and_the_weights_give_its_logits(saved):
    path, net = saved
    model, info = load_model(f"timm:{NAME}", str(path), num_classes=4)
    mean, std = (torch.tensor(net.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = torch.rand(3, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - mean) / std), atol=1e-5)
    assert info["preprocessing"] == {"mean": list(net.pretrained_cfg["mean"]), "std": list(net.pretrained_cfg["std"]),
                                     "from": "the timm model's own configuration"}
    own, _ = load_model(f"timm:{NAME}", str(path), num_classes=4, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    with torch.no_grad():
        assert torch.allclose(own(x), net(x), atol=1e-5)  # the config's preprocessing wins


def test_a_timm_model_runs_a_suite_with_known_clean_accuracy(saved, tmp_path):
    """Labels are the model's own predictions under its normalization: clean accuracy is exactly 1."""
    path, net = saved
    mean, std = (torch.tensor(net.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = torch.rand(6, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net((x - mean) / std).argmax(dim=1)
    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    cfg = {"name": "timm", "device": "cpu", "model": {"source": f"timm:{NAME}", "weights": str(path), "num_classes": 4},
           "data": {"source": f"npz:{tmp_path / 'data.npz'}", "batch_size": 3},
           "attacks": [{"name": "fgsm", "norm": "linf", "epsilons": ["1/255"]}], "gates": [{"metric": "clean_accuracy", "min": 0.5}]}
    (tmp_path / "timm.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    card = harness.run(str(tmp_path / "timm.yaml"), out=tmp_path / "out", show_progress=False)
    assert card.metrics["clean_accuracy"] == 1.0
    record = json.loads((tmp_path / "out" / "scorecard.json").read_text())
    assert record["provenance"]["preprocessing"]["mean"] == list(net.pretrained_cfg["mean"])
    assert record["provenance"]["weights_sha256"] and record["provenance"]["model_source"] == f"timm:{NAME}"


@pytest.mark.parametrize("source, kwargs, weights, where, words", [
    ("timm:not_a_model_at_all", {}, True, "model.source", "unknown timm model 'not_a_model_at_all'"),
    (f"timm:{NAME}", {"pretrained": True}, True, "model.kwargs.pretrained", "pretrained=False"),
    (f"timm:{NAME}", {}, False, "model.weights", "timm models need a local weights file"),
    (f"timm:{NAME}", {"no_such_knob": 3}, True, "model.kwargs", "does not take these kwargs"),
])
def test_bad_timm_sources_name_the_key(saved, source, kwargs, weights, where, words):
    with pytest.raises(BadInput) as e:
        load_model(source, str(saved[0]) if weights else None, num_classes=4, kwargs=kwargs)
    assert e.value.where == where and words in str(e.value)


def test_without_timm_the_source_names_the_extra(saved, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real(name, *args, **kwargs)

    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(BadInput, match=r"pip install 'robustgate\[timm\]'"):
        load_model(f"timm:{NAME}", str(saved[0]), num_classes=4)
