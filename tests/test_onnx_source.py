"""`onnx:PATH` model sources on the builtin digits CNN exported here with torch.onnx: onnxruntime runs
it, onnx2torch's conversion gives the same logits and gradients as torch, and a graph that does not
convert runs as a black box that only black-box attacks may query."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import harness
from harness.core.errors import BadInput
from harness.sources.models import load_model

pytest.importorskip("onnxruntime", reason="pip install -e '.[dev]' (onnx, onnxruntime and onnx2torch are dev dependencies)")
pytest.importorskip("onnx2torch", reason="pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits_model) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    with warnings.catch_warnings():  # the TorchScript-based exporter needs no onnxscript; its deprecation notice is expected
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(digits_model.eval(), (torch.rand(2, 1, 8, 8),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _suite(tmp_path: Path, source: str, attacks: list, **extra) -> Path:
    cfg = {"name": "onnx", "device": "cpu", "model": {"source": source, **extra.pop("model", {})},
           "data": {"source": "builtin:digits", "split": "test", "limit": 120}, "attacks": attacks, **extra}
    path = tmp_path / f"{abs(hash(json.dumps(cfg, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_the_converted_graph_gives_torchs_logits_and_gradients(exported, digits_model):
    model, info = load_model(f"onnx:{exported}")
    assert info["onnx"]["gradients"] == "converted by onnx2torch" and info["onnx"]["max_abs_diff"] < 1e-4
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.arange(16) % 10
    ours = torch.nn.functional.cross_entropy(model(x), y)
    (g_ours,) = torch.autograd.grad(ours, x)
    x2 = x.detach().clone().requires_grad_(True)
    theirs = torch.nn.functional.cross_entropy(digits_model(x2), y)
    (g_torch,) = torch.autograd.grad(theirs, x2)
    assert torch.allclose(model(x), digits_model(x), atol=1e-5) and torch.allclose(g_ours, g_torch, atol=1e-5)


def test_an_onnx_model_scores_as_the_torch_model_it_was_exported_from(exported, tmp_path):
    attacks = [{"name": "pgd", "norm": "linf", "epsilons": [0.1], "steps": 10}]
    onnx_card = harness.run(str(_suite(tmp_path, f"onnx:{exported}", attacks)), show_progress=False)
    torch_card = harness.run(str(_suite(tmp_path, "builtin:digits-cnn", attacks)), show_progress=False)
    assert onnx_card.metrics["clean_accuracy"] == torch_card.metrics["clean_accuracy"] > 0.95
    # the same gradients up to float rounding: PGD breaks the same points but for at most one
    assert abs(onnx_card.metrics["robust_accuracy:pgd-linf@0.1"] - torch_card.metrics["robust_accuracy:pgd-linf@0.1"]) <= 1 / 120 + 1e-9
    prov = onnx_card.provenance
    assert prov["model_source"] == f"onnx:{exported}" and [a["role"] for a in prov["artifacts"]][:1] == ["model"]


@pytest.fixture
def unconverted(monkeypatch):
    """onnx2torch failing on the graph, as it does on operators it lacks."""
    import harness.sources.onnx as onnx_source

    monkeypatch.setattr(onnx_source, "_converted", lambda *a: (None, "onnx2torch cannot convert the graph (NotImplementedError: "
                                                                     "Converter is not implemented)", None))


def test_a_graph_that_does_not_convert_runs_black_box_attacks_through_onnxruntime(exported, tmp_path, unconverted):
    model, info = load_model(f"onnx:{exported}")
    assert info["onnx"] == {"gradients": None, "black_box": "onnx2torch cannot convert the graph (NotImplementedError: "
                                                            "Converter is not implemented)"}
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    assert not model(x).requires_grad  # a black box: no gradient reaches the input
    square = [{"name": "square", "norm": "linf", "epsilons": [0.1], "queries": 60}]
    black = harness.run(str(_suite(tmp_path, f"onnx:{exported}", square)), show_progress=False)
    white = harness.run(str(_suite(tmp_path, "builtin:digits-cnn", square)), show_progress=False)
    assert black.metrics["clean_accuracy"] == white.metrics["clean_accuracy"]
    # the same queries on the same logits (up to onnxruntime's rounding): Square finds the same points
    assert abs(black.metrics["robust_accuracy:square-linf@0.1"] - white.metrics["robust_accuracy:square-linf@0.1"]) <= 2 / 120 + 1e-9
    assert black.metrics["robust_accuracy:square-linf@0.1"] < black.metrics["clean_accuracy"]


def test_white_box_attacks_on_a_black_box_model_are_refused_naming_what_can_run(exported, tmp_path, unconverted, cli):
    cfg = _suite(tmp_path, f"onnx:{exported}", [{"name": "square", "norm": "linf", "epsilons": [0.1]},
                                                 {"name": "pgd", "norm": "linf", "epsilons": [0.1]}])
    result = cli("run", str(cfg), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "attacks[1]: pgd-linf needs gradients" in result.output and "runs as a black box" in result.output
    assert "attacks that can run:" in result.output and "square" in result.output and "corruptions" in result.output
    assert not (tmp_path / "out" / "scorecard.json").exists()


@pytest.mark.parametrize("case, where, words", [
    ("missing", "missing.onnx", "ONNX file not found"),
    ("not_onnx", "garbage.onnx", "not a loadable ONNX model"),
    ("weights", "model.weights", "holds its own weights"),
    ("classes", "model.num_classes", "expected (batch, 7)"),
    ("kwargs", "model.kwargs.width", "only `input_shape`"),
])
def test_bad_onnx_sources_are_one_line_naming_the_file_or_key(exported, tmp_path, case, where, words):
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf at all")
    source = {"missing": tmp_path / "missing.onnx", "not_onnx": tmp_path / "garbage.onnx"}.get(case, exported)
    kwargs = {"weights": str(exported) if case == "weights" else None, "num_classes": 7 if case == "classes" else None,
              "kwargs": {"width": 3} if case == "kwargs" else None}
    with pytest.raises(BadInput) as e:
        load_model(f"onnx:{source}", **kwargs)
    assert where in e.value.where and words in str(e.value)
