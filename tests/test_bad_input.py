"""Bad input of every kind ends in exit 2 and one line on stderr that names the file or key path.

Each case builds its files under tmp_path and returns the command line and a regex the one error
line must match (`says(...)` builds one from literal pieces). Every case goes through the real
`harness run`: exit 2, one line, no traceback, no warning, no scorecard. A case that is wrong in
the config alone (the CONFIG_ERRORS rows, `config=True` cases) must also be refused by
`harness validate` with the same line. Adding a row here is all a new kind of bad input needs.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from tests.conftest import LinearNet, tiny_linear

HERE = "tests.test_bad_input"  # python:HERE:factory names a model defined below
DATA = {"source": "builtin:digits", "limit": 32}


class Case(NamedTuple):
    make: Callable[[Path], tuple[list[str], str]]
    config: bool  # bad in the config alone: `validate` refuses it too, before any model or data loads
    marks: tuple


CASES: dict[str, Case] = {}


def case(fn=None, *, config: bool = False, xfail: str = ""):
    """Registers `case_<name>`; `xfail` names the change outside this file's reach that would fix it."""

    def register(fn):
        marks = (pytest.mark.xfail(strict=True, reason=xfail),) if xfail else ()
        CASES[fn.__name__.removeprefix("case_")] = Case(fn, config, marks)
        return fn

    return register(fn) if fn is not None else register


def says(*pieces: str) -> str:
    """A regex matching a line that contains every piece, literally, in any order."""
    return "".join(f"(?=.*{re.escape(p)})" for p in pieces)


def write_config(tmp: Path, **sections: Any) -> Path:
    """A small valid suite (digits, 32 samples, CPU, no attacks), with the given top-level keys replaced."""
    raw = {"name": "bad-input", "device": "cpu", "model": {"source": "builtin:digits-cnn"}, "data": dict(DATA),
           "attacks": [], **sections}
    path = tmp / "suite.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def run_args(cfg: Path, tmp: Path, *extra: str) -> list[str]:
    return ["run", str(cfg), "--out", str(tmp / "out"), *extra]


def suite(tmp: Path, **sections: Any) -> list[str]:
    return run_args(write_config(tmp, **sections), tmp)


def pgd(**knobs: Any) -> dict[str, Any]:
    return {"name": "pgd", "norm": "linf", "epsilons": ["8/255"], "steps": 1, **knobs}


def npz_run(tmp: Path, model: str = "builtin:digits-cnn", **arrays: np.ndarray) -> list[str]:
    np.savez(tmp / "data.npz", **arrays)
    return suite(tmp, model={"source": model}, data={"source": "npz:data.npz"})


def digits_npz(tmp: Path, n: int = 4, **override: np.ndarray) -> list[str]:
    """An npz of n blank 8x8 digits, with arrays replaced or added by `override`."""
    arrays = {"x": np.zeros((n, 1, 8, 8), np.float32), "y": np.zeros(n, np.int64), **override}
    return npz_run(tmp, **arrays)


def weights_run(tmp: Path, weights: Path, source: str = "python:tests.conftest:tiny_linear") -> list[str]:
    return suite(tmp, model={"source": source, "weights": weights.name})


def model_run(tmp: Path, factory: str, **model: Any) -> list[str]:
    return suite(tmp, model={"source": f"python:{HERE}:{factory}", **model})


def image_folder(root: Path, images: dict[str, bytes | None]) -> Path:
    """Writes root/<class>/<file> for each 'class/file' key: real 8x8 PNGs for None, else the given bytes."""
    from PIL import Image

    for rel, content in images.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            Image.new("L", (8, 8), color=128).save(path)
        else:
            path.write_bytes(content)
    return root


# --- tiny models for python: sources (built per case; nothing here trains) --------------------

class _Returns(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(self.fc(x.flatten(1)))


def flat_scores():
    return _Returns(lambda z: z.sum(dim=1))  # (N,)


def image_scores():
    return _Returns(lambda z: z.view(-1, 1, 2, 5))  # (N, C, H, W)


def tuple_scores():
    return _Returns(lambda z: (z, z))


def nan_scores():
    return _Returns(lambda z: torch.full_like(z, float("nan")))


def picky_model():
    def refuse(z):
        raise ValueError("expected 3 channels of 32x32")

    return _Returns(refuse)


def raising_factory():
    raise RuntimeError("no GPU weights here")


def not_a_module():
    return {"fc.weight": torch.zeros(10, 64)}


def takes_width(width: int):
    return LinearNet(width, 10)


not_callable = 42


# --- wrong in the config alone: found by validation, before any model or data loads ----------

# name: (top-level keys replaced in the small suite, regex the error line must match)
CONFIG_ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    # top level
    "unknown_top_level_key": ({"nmae": "typo"}, r"suite\.yaml: nmae: unknown key 'nmae' \(valid: name, seed, device,"),
    "name_not_a_string": ({"name": ["a", "b"]}, says("suite.yaml: name:", "string")),
    "seed_not_an_integer": ({"seed": "zero"}, says("suite.yaml: seed:", "integer")),
    "seed_fractional": ({"seed": 1.5}, says("suite.yaml: seed:", "integer", "fractional")),
    "device_not_a_string": ({"device": 7}, says("suite.yaml: device", "string")),
    "device_tpu": ({"device": "tpu"}, says("suite.yaml: device:", "'tpu'", "cuda:N")),
    "engine_unknown": ({"engine": "spark"}, says("suite.yaml: engine.name", "'local' or 'ray'", "'spark'")),
    "engine_ray_key_on_local": ({"engine": {"workers": 2}}, says("suite.yaml: engine", "workers applies to the ray engine only")),
    "engine_workers_zero": ({"engine": {"name": "ray", "workers": 0}}, says("suite.yaml: engine.workers", "greater than or equal to 1")),
    "tracking_unknown_key": ({"tracking": {"mlflow": "sqlite:///m.db", "uri": "x"}}, says("suite.yaml: tracking.uri", "unknown key 'uri'", "valid: mlflow, experiment, run_name")),
    "tracking_empty_experiment": ({"tracking": {"experiment": " "}}, says("suite.yaml: tracking.experiment", "non-empty name")),
    "train_epochs_zero": ({"train": {"epochs": 0}}, says("suite.yaml: train.epochs", "greater than or equal to 1")),
    "train_unknown_defense_knob": ({"train": {"defense": {"pgd-at": {"epsilonn": 0.1}}}}, says("suite.yaml: train.defense", "epsilonn")),
    "probe_unknown": ({"probes": [{"name": "badnet", "fractions": [0.1]}]}, says("suite.yaml: probes[0]", "unknown probe 'badnet'", "badnets")),
    "probe_fraction_one": ({"probes": [{"name": "badnets", "fractions": [1.0]}]}, says("suite.yaml: probes[0]", "fractions must be in [0, 1)")),
    "certificate_unknown": ({"certificates": [{"name": "smoothing", "radii": [0.5]}]},
        says("suite.yaml: certificates[0]", "unknown certificate 'smoothing'", "randomized-smoothing", "interval-bounds")),
    "certificate_without_radii": ({"certificates": [{"name": "randomized-smoothing"}]},
        says("suite.yaml: certificates[0]", "needs `radii`")),
    "defense_unknown": ({"defenses": [{"name": "jpg"}]},
        says("suite.yaml: defenses[0]", "unknown defense 'jpg'", "jpeg")),
    "on_inconclusive_unknown": ({"on_inconclusive": "maybe"},
        says("suite.yaml: on_inconclusive", "'fail' or 'pass'", "'maybe'")),
    # model
    "unknown_model_key": ({"model": {"source": "builtin:digits-cnn", "foo": 1}}, says("suite.yaml: model.foo", "weights")),
    "unknown_model_source": ({"model": {"source": "hub:some/model"}},
        says("model.source", "'hub:some/model'", "builtin:digits-cnn", "python:MODULE:FACTORY")),
    "unknown_builtin_model": ({"model": {"source": "builtin:resnet"}},
        says("model.source", "'builtin:resnet'", "builtin:digits-cnn")),
    "num_classes_below_two": ({"model": {"source": "builtin:digits-cnn", "num_classes": 1}},
        says("model.num_classes", "greater than or equal to 2")),
    "python_source_without_factory": ({"model": {"source": f"python:{HERE}"}},
        says("model.source", "python:MODULE:FACTORY")),
    # data
    "unknown_data_key": ({"data": {**DATA, "bar": 1}}, says("suite.yaml: data.bar", "batch_size")),
    "unknown_data_source": ({"data": {"source": "s3:bucket/x"}},
        says("data.source", "'s3:bucket/x'", "builtin:digits", "npz:PATH", "imagefolder:PATH")),
    "bad_split": ({"data": {**DATA, "split": "validation"}}, says("data.split", "'train' or 'test'", "'validation'")),
    "limit_zero": ({"data": {**DATA, "limit": 0}}, says("data.limit", "greater than or equal to 1")),
    "limit_negative": ({"data": {**DATA, "limit": -5}}, says("data.limit", "greater than or equal to 1")),
    "batch_size_zero": ({"data": {**DATA, "batch_size": 0}}, says("data.batch_size", "greater than or equal to 1")),
    "image_size_not_a_size": ({"data": {**DATA, "image_size": "large"}}, says("data.image_size") + r".*\bint"),
    "image_size_three_numbers": ({"data": {**DATA, "image_size": [8, 8, 8]}},
        says("data.image_size", "[height, width]", "[8, 8, 8]")),
    "image_size_zero": ({"data": {**DATA, "image_size": 0}}, says("data.image_size", "positive")),
    # attacks
    "attacks_not_a_list": ({"attacks": {"name": "pgd"}}, says("suite.yaml: attacks", "valid list")),
    "attack_without_name": ({"attacks": [{"norm": "linf", "epsilons": [0.1]}]}, says("attacks[0].name", "required")),
    "unknown_attack": ({"attacks": [{"name": "deepfoo", "norm": "linf", "epsilons": [0.1]}]},
        says("attacks[0]", "'deepfoo'", "fgsm", "pgd")),
    "unknown_attack_parameter": ({"attacks": [pgd(stepz=3)]}, says("attacks[0]", "'stepz'", "steps")),
    "attack_parameter_wrong_type": ({"attacks": [pgd(steps="many")]}, says("attacks[0]", "'steps'", "integer")),
    "attack_parameter_out_of_range": ({"attacks": [pgd(steps=0)]}, says("attacks[0]", "steps must be at least 1", "got 0")),
    "unknown_norm": ({"attacks": [pgd(norm="l7")]}, says("attacks[0].norm", "'l7'", "linf", "l2")),
    "norm_the_attack_lacks": ({"attacks": [{"name": "cw", "norm": "linf", "epsilons": [0.1]}]},
        says("attacks[0]", "'cw'", "does not support norm 'linf'", "valid: l2")),
    "epsilon_does_not_parse": ({"attacks": [pgd(epsilons=["8/x"])]}, says("attacks[0].epsilons[0]", "'8/x'", "8/255")),
    "epsilon_is_a_word": ({"attacks": [pgd(epsilons=["abc"])]}, says("attacks[0].epsilons[0]", "'abc'", "8/255")),
    "epsilon_not_a_list": ({"attacks": [pgd(epsilons="8/255")]}, says("attacks[0].epsilons", "valid list")),
    "negative_epsilon": ({"attacks": [pgd(epsilons=["1/255", -0.1])]}, says("attacks[0].epsilons[1]", "negative")),
    "infinite_epsilon": ({"attacks": [pgd(epsilons=[float("inf")])]}, says("attacks[0].epsilons[0]", "not finite")),
    "zero_denominator": ({"attacks": [pgd(epsilons=["8/0"])]}, says("attacks[0].epsilons[0]", "'8/0'")),
    "empty_epsilons": ({"attacks": [pgd(epsilons=[])]}, says("attacks[0]", "needs `epsilons`")),
    "targeted_attack_that_cannot": ({"attacks": [{"name": "deepfool", "norm": "l2", "targeted": True}]},
        says("attacks[0]", "'deepfool'", "no targeted mode")),
    "unknown_target_rule": ({"attacks": [pgd(targeted=True, target="farthest")]},
        says("attacks[0].target", "'random' or 'least-likely'")),
    "unknown_backend": ({"attacks": [pgd(backend="cleverhans")]},
        says("attacks[0].backend", "'native', 'foolbox' or 'art'")),
    "duplicate_attack_id": ({"attacks": [pgd(), pgd(steps=2)]}, says("suite.yaml", "'pgd-linf' is used twice", "id:")),
    "corruption_severity_out_of_range": ({"attacks": [{"name": "corruptions", "severities": [6]}]},
        says("attacks[0].severities[0]", "less than or equal to 5")),
    "foolbox_class_that_does_not_exist": ({"attacks": [{**pgd(backend="foolbox"), "name": "LinfPGDAttak"}]},
        says("attacks[0]", "unknown foolbox attack 'LinfPGDAttak'", "LinfPGD")),
    "art_class_that_does_not_exist": ({"attacks": [{"name": "HopSkipJmp", "norm": "linf", "epsilons": [0.1], "backend": "art"}]},
        says("attacks[0]", "unknown art attack 'HopSkipJmp'", "HopSkipJump")),
    # gates
    "gate_unknown_metric": ({"attacks": [pgd()], "gates": [{"metric": "robust_accuracy:pgd-linf@9/255", "min": 0.5}]},
        says("gates[0].metric", "robust_accuracy:pgd-linf@8/255", "clean_accuracy")),
    "gate_on_inconclusive_unknown": ({"gates": [{"metric": "clean_accuracy", "min": 0.5, "on_inconclusive": "ignore"}]},
        says("gates[0].on_inconclusive", "'fail' or 'pass'", "'ignore'")),
    "gate_metric_of_a_missing_attack": ({"gates": [{"metric": "robust_accuracy:worst-linf@8/255", "min": 0.3}]},
        says("gates[0].metric", "'robust_accuracy:worst-linf@8/255'", "valid: clean_accuracy")),
    "gate_with_min_and_max": ({"gates": [{"metric": "clean_accuracy", "min": 0.5, "max": 0.9}]},
        says("gates[0]", "exactly one of min, max, max_drop", "got min, max")),
    "gate_without_a_bound": ({"gates": [{"metric": "clean_accuracy"}]},
        says("gates[0]", "exactly one of min, max, max_drop", "got none")),
    "gate_max_drop_negative": ({"gates": [{"metric": "clean_accuracy", "max_drop": -0.01}]},
        says("gates[0].max_drop", "greater than or equal to 0")),
    "gate_threshold_not_a_number": ({"gates": [{"metric": "clean_accuracy", "min": "high"}]},
        says("gates[0].min", "number")),
    "gate_unknown_key": ({"gates": [{"metric": "clean_accuracy", "minimum": 0.9}]},
        says("gates[0].minimum", "unknown key", "min, max, max_drop")),
}

for _name, (_sections, _pattern) in CONFIG_ERRORS.items():
    CASES[_name] = Case(lambda tmp, s=_sections, p=_pattern: (suite(tmp, **s), p), True, ())


# --- the config file itself -------------------------------------------------------------------

@case(config=True)
def case_missing_config(tmp):
    return run_args(tmp / "nowhere.yaml", tmp), says("nowhere.yaml", "not found")


@case(config=True)
def case_config_is_a_directory(tmp):
    (tmp / "adir.yaml").mkdir()
    return run_args(tmp / "adir.yaml", tmp), says("adir.yaml", "cannot read")


@case(config=True)
def case_config_not_utf8(tmp):
    path = tmp / "binary.yaml"
    path.write_bytes(b"name: \xff\xfe\x00\x81 binary\n")
    return run_args(path, tmp), says("binary.yaml", "YAML")


@case(config=True)
def case_invalid_yaml_syntax(tmp):
    path = tmp / "broken.yaml"
    path.write_text("name: x\nmodel: {source: [unclosed\n", encoding="utf-8")
    return run_args(path, tmp), says("broken.yaml", "not valid YAML", "line")


@case(config=True)
def case_config_is_a_list(tmp):
    path = tmp / "list.yaml"
    path.write_text("- name: x\n- seed: 1\n", encoding="utf-8")
    return run_args(path, tmp), says("list.yaml", "mapping", "got list")


@case
def case_device_cuda_without_cuda(tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return suite(tmp, device="cuda"), says("device", "no CUDA")


@case
def case_device_argument_bogus(tmp):
    return run_args(write_config(tmp), tmp, "--device", "bogus"), says("device", "'bogus'", "cuda:N")


# --- model section ----------------------------------------------------------------------------

@case
def case_num_classes_builtin_mismatch(tmp):
    return suite(tmp, model={"source": "builtin:digits-cnn", "num_classes": 5}), says("model.num_classes", "10 classes", "not 5")


@case
def case_num_classes_model_mismatch(tmp):
    return suite(tmp, model={"source": "python:tests.conftest:tiny_linear", "num_classes": 3}), says(
        "model.num_classes", "says 3 classes", "returns 10 scores")


@case
def case_preprocessing_mean_wrong_length(tmp):
    model = {"source": "builtin:digits-cnn", "preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.5]}}
    return suite(tmp, model=model), says("model.preprocessing", "one value per channel", "the data has 1")


@case
def case_preprocessing_std_wrong_length(tmp):
    model = {"source": "builtin:digits-cnn", "preprocessing": {"std": [0.2, 0.2]}}
    return suite(tmp, model=model), says("model.preprocessing", "one value per channel", "the data has 1")


@case(config=True)
def case_preprocessing_zero_std(tmp):
    model = {"source": "builtin:digits-cnn", "preprocessing": {"mean": [0.5], "std": [0.0]}}
    return suite(tmp, model=model), says("model.preprocessing.std", "positive")


@case(config=True)
def case_preprocessing_not_numbers(tmp):
    model = {"source": "builtin:digits-cnn", "preprocessing": {"mean": ["half"]}}
    return suite(tmp, model=model), says("model.preprocessing.mean[0]", "number")


@case
def case_python_module_missing(tmp):
    return suite(tmp, model={"source": "python:no_such_module_xyz:build"}), says(
        "model.source", "cannot import module 'no_such_module_xyz'", "ModuleNotFoundError")


@case
def case_python_module_fails_on_import(tmp):
    (tmp / "explodes_on_import.py").write_text("raise RuntimeError('configured for another machine')\n")
    return suite(tmp, model={"source": "python:explodes_on_import:build"}), says(
        "model.source", "cannot import module 'explodes_on_import'", "configured for another machine")


@case
def case_python_factory_missing(tmp):
    return model_run(tmp, "no_such_factory"), says("model.source", f"'{HERE}'", "no callable 'no_such_factory'")


@case
def case_python_factory_not_callable(tmp):
    return model_run(tmp, "not_callable"), says("model.source", "no callable 'not_callable'")


@case
def case_python_factory_raising(tmp):
    return model_run(tmp, "raising_factory"), says("model.source", "raising_factory failed", "RuntimeError", "no GPU weights here")


@case
def case_python_factory_returns_non_module(tmp):
    return model_run(tmp, "not_a_module"), says("model.source", "not_a_module returned dict", "torch.nn.Module")


@case
def case_python_factory_bad_kwargs(tmp):
    return model_run(tmp, "takes_width", kwargs={"widht": 64}), says("model.source", "takes_width failed", "'widht'")


@case
def case_torchvision_model_without_weights(tmp):
    return suite(tmp, model={"source": "torchvision:resnet18"}), says("model.weights", "local weights file")


@case
def case_torchscript_missing(tmp):
    return suite(tmp, model={"source": "torchscript:gone.pt"}), says("gone.pt", "TorchScript file not found")


@case
def case_torchscript_not_an_archive(tmp):
    (tmp / "plain.pt").write_bytes(b"not a zip archive at all")
    return suite(tmp, model={"source": "torchscript:plain.pt"}), says("plain.pt", "not a loadable TorchScript archive")


# --- weights files ----------------------------------------------------------------------------

@case
def case_missing_weights(tmp):
    return weights_run(tmp, tmp / "gone.safetensors"), says("gone.safetensors", "not found")


@case
def case_weights_is_a_directory(tmp):
    (tmp / "ckpt.pt").mkdir()
    return weights_run(tmp, tmp / "ckpt.pt"), says("ckpt.pt", "is a directory")


@case
def case_empty_pt_weights(tmp):
    (tmp / "empty.pt").write_bytes(b"")
    return weights_run(tmp, tmp / "empty.pt"), says("empty.pt", "empty")


@case
def case_empty_safetensors(tmp):
    (tmp / "empty.safetensors").write_bytes(b"")
    return weights_run(tmp, tmp / "empty.safetensors"), says("empty.safetensors", "empty")


@case
def case_corrupt_pt_weights(tmp):
    path = tmp / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return weights_run(tmp, path), says("noise.pt", "corrupt")


@case
def case_truncated_safetensors(tmp):
    from safetensors.torch import save_file

    path = tmp / "cut.safetensors"
    save_file(tiny_linear().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:100])
    return weights_run(tmp, path), says("cut.safetensors", "corrupt")


@case
def case_corrupt_safetensors_header(tmp):
    path = tmp / "garbled.safetensors"
    path.write_bytes((64).to_bytes(8, "little") + b"{not json" + b" " * 55)
    return weights_run(tmp, path), says("garbled.safetensors", "corrupt")


@case
def case_safetensors_for_another_shape(tmp):
    from safetensors.torch import save_file

    save_file(tiny_linear(num_classes=4).state_dict(), str(tmp / "four.safetensors"))
    return weights_run(tmp, tmp / "four.safetensors"), says("four.safetensors", "do not fit", "size mismatch", "fc.weight")


@case
def case_weights_of_another_shape(tmp):
    path = tmp / "other.pt"
    torch.save(tiny_linear(num_classes=5).state_dict(), path)
    return weights_run(tmp, path), says("other.pt", "do not fit", "size mismatch")


@case
def case_weights_for_another_architecture(tmp):
    torch.save(tiny_linear().state_dict(), tmp / "linear.pt")
    return weights_run(tmp, tmp / "linear.pt", source="builtin:digits-cnn"), says("linear.pt", "do not fit", "Missing key")


@case
def case_state_dict_with_wrong_keys(tmp):
    torch.save({"encoder.weight": torch.zeros(10, 64), "encoder.bias": torch.zeros(10)}, tmp / "renamed.pt")
    return weights_run(tmp, tmp / "renamed.pt"), says("renamed.pt", "do not fit", "Missing key", "fc.weight", "Unexpected key")


@case
def case_weights_not_a_state_dict(tmp):
    torch.save([torch.zeros(3), torch.ones(3)], tmp / "list.pt")
    return weights_run(tmp, tmp / "list.pt"), says("list.pt", "must be a state_dict")


@case
def case_pickled_full_module(tmp):
    torch.save(tiny_linear(), tmp / "whole.pt")  # the module itself, not its state_dict
    return weights_run(tmp, tmp / "whole.pt"), says("whole.pt", "refused", "arbitrary unpickling", "state_dict")


class _WritesAFile:
    """A pickle whose loading would create a file: what an attacker's weights file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _payload(tmp: Path) -> dict[str, Any]:
    return {"fc.weight": torch.zeros(10, 64), "payload": _WritesAFile(tmp / "PWNED")}


@case
def case_pickle_with_code(tmp):
    torch.save(_payload(tmp), tmp / "evil.pt")
    return weights_run(tmp, tmp / "evil.pt"), says("evil.pt", "refused")


# How each format would run the payload if loaded without restrictions (the refusal is all that stops it).
EVIL = {
    "evil.pt": (lambda p, tmp: torch.save(_payload(tmp), p), lambda p: torch.load(p, weights_only=False)),
    "legacy.pt": (lambda p, tmp: torch.save(_payload(tmp), p, _use_new_zipfile_serialization=False),
                  lambda p: torch.load(p, weights_only=False)),
    "raw.pkl": (lambda p, tmp: p.write_bytes(pickle.dumps(_payload(tmp))), lambda p: pickle.loads(p.read_bytes())),
    "pickled.safetensors": (lambda p, tmp: p.write_bytes(pickle.dumps(_payload(tmp))), lambda p: pickle.loads(p.read_bytes())),
}


@pytest.mark.parametrize("name", list(EVIL))
def test_pickle_payload_never_runs(cli, tmp_path, name):
    write, unsafe_load = EVIL[name]
    path = tmp_path / name
    write(path, tmp_path)
    line = assert_bad_input(invoke_as_shell(cli, *weights_run(tmp_path, path)))
    assert name in line and re.search("refused|corrupt", line), line
    assert not (tmp_path / "PWNED").exists()
    # the payload is live: an unrestricted load writes the file, so the refusal above is what saved us
    unsafe_load(path)
    assert (tmp_path / "PWNED").read_text() == "pwned"


def test_npz_object_payload_never_runs(cli, tmp_path):
    x = np.empty(1, dtype=object)
    x[0] = _WritesAFile(tmp_path / "PWNED")
    line = assert_bad_input(cli(*npz_run(tmp_path, x=x, y=np.zeros(1, np.int64))))
    assert "data.npz" in line and "unpickling" in line
    assert not (tmp_path / "PWNED").exists()
    with np.load(tmp_path / "data.npz", allow_pickle=True) as f:
        f["x"]
    assert (tmp_path / "PWNED").read_text() == "pwned"


# --- data section -----------------------------------------------------------------------------

@case
def case_data_file_missing(tmp):
    return suite(tmp, data={"source": "npz:absent.npz"}), says("absent.npz", "data file not found")


@case
def case_data_file_is_a_directory(tmp):
    (tmp / "arrays.npz").mkdir()
    return suite(tmp, data={"source": "npz:arrays.npz"}), says("arrays.npz", "is a directory")


@case
def case_data_file_not_an_npz(tmp):
    (tmp / "data.npz").write_text("x,y\n0,1\n")
    return suite(tmp, data={"source": "npz:data.npz"}), says("data.npz", "not an npz file", "zip archive")


@case
def case_image_size_negative_for_images(tmp):
    image_folder(tmp / "imgs", {"zero/a.png": None})
    return suite(tmp, data={"source": "imagefolder:imgs", "image_size": [8, -8]}), (
        r"data\.image_size: must be a positive int .*got \[8, -8\]$")  # not wrapped in an image-folder error


@case
def case_npz_without_x(tmp):
    return npz_run(tmp, images=np.zeros((4, 1, 8, 8), np.float32), y=np.zeros(4, np.int64)), says(
        "data.npz", "missing array(s) x", "found: images, y")


@case
def case_npz_without_y(tmp):
    return npz_run(tmp, x=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(4, np.int64)), says(
        "data.npz", "missing array(s) y", "found:", "labels")


@case
def case_x_wrong_rank(tmp):
    return digits_npz(tmp, x=np.zeros((4, 64), np.float32)), says("data.npz", "(N, C, H, W)", "(4, 64)")


@case
def case_nan_in_x(tmp):
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[2, 0, 3, 3] = np.nan
    return digits_npz(tmp, x=x), says("data.npz", "NaN", "1 sample(s)", "index 2")


@case
def case_inf_in_x(tmp):
    x = np.zeros((4, 1, 8, 8), np.float64)
    x[0, 0, 0, 0] = -np.inf
    return digits_npz(tmp, x=x), says("data.npz", "infinite", "index 0")


@case
def case_float_x_outside_unit_range(tmp):
    return digits_npz(tmp, x=np.full((4, 1, 8, 8), 16.0, np.float32)), says("data.npz", "[0, 1]", "16")


@case
def case_float_x_negative(tmp):
    return digits_npz(tmp, x=np.full((4, 1, 8, 8), -0.5, np.float32)), says("data.npz", "[0, 1]", "-0.5")


@case
def case_x_integers_not_uint8(tmp):
    return digits_npz(tmp, x=np.zeros((4, 1, 8, 8), np.int64)), says("data.npz", "float in [0, 1] or uint8", "got int64")


@case
def case_x_strings(tmp):
    return digits_npz(tmp, x=np.full((4, 1, 8, 8), "a")), says("data.npz", "x must be float in [0, 1] or uint8", "got strings")


@case
def case_labels_beyond_classes(tmp):
    return digits_npz(tmp, y=np.array([0, 1, 12, 3])), says("data.npz", "labels go up to 12", "10 classes", "0..9")


@case
def case_labels_negative(tmp):
    return digits_npz(tmp, y=np.array([0, -1, 2, 3])), says("data.npz", "non-negative", "-1")


@case
def case_labels_not_integers(tmp):
    return digits_npz(tmp, y=np.array([0.0, 1.5, 2.0, 3.0])), says("data.npz", "integer class labels", "found 1.5 at sample 1")


@case
def case_labels_strings(tmp):
    return digits_npz(tmp, y=np.array(["cat", "dog", "cat", "dog"])), says("data.npz", "integer class labels", "got strings")


@case
def case_labels_nan(tmp):
    return digits_npz(tmp, y=np.array([0.0, np.nan, 2.0, 3.0])), says("data.npz", "integer class labels", "found nan at sample 1")


@case
def case_labels_one_hot(tmp):
    return digits_npz(tmp, y=np.eye(10, dtype=np.int64)[:4]), says("data.npz", "y must have shape (4,)", "(4, 10)")


@case
def case_x_y_length_mismatch(tmp):
    return digits_npz(tmp, y=np.zeros(7, np.int64)), says("data.npz", "y must have shape (4,)", "(7,)")


@case
def case_npz_object_arrays(tmp):
    x = np.empty(4, dtype=object)
    x[:] = [np.zeros((1, 8, 8), np.float32)] * 4
    return digits_npz(tmp, x=x), says("data.npz", "unpickling")


@case
def case_empty_dataset(tmp):
    return digits_npz(tmp, n=0), says("data.npz", "empty", "0 samples")


@case
def case_data_with_three_channels(tmp):
    return digits_npz(tmp, x=np.zeros((4, 3, 8, 8), np.float32)), says("data.npz", "cannot take this data", "(3, 8, 8)")


@case
def case_data_too_small(tmp):
    return digits_npz(tmp, x=np.zeros((4, 1, 5, 5), np.float32)), says("data.npz", "cannot take this data", "(1, 5, 5)")


@case
def case_imagefolder_missing(tmp):
    return suite(tmp, data={"source": "imagefolder:nowhere"}), says("nowhere", "image folder not found")


@case
def case_imagefolder_without_images(tmp):
    (tmp / "imgs" / "zero").mkdir(parents=True)
    (tmp / "imgs" / "zero" / "notes.txt").write_text("no pictures here")
    return suite(tmp, data={"source": "imagefolder:imgs"}), says("imgs", "not a usable image folder", "no valid file")


@case
def case_imagefolder_empty_split(tmp):
    image_folder(tmp / "imgs", {"train/zero/a.png": None})
    (tmp / "imgs" / "test" / "zero").mkdir(parents=True)  # the test split exists and holds nothing
    return suite(tmp, data={"source": "imagefolder:imgs"}), says("test", "not a usable image folder")


@case
def case_imagefolder_unreadable_image(tmp):
    image_folder(tmp / "imgs", {"zero/a.png": None, "one/broken.png": b"\x89PNG\r\n\x1a\n truncated"})
    return suite(tmp, data={"source": "imagefolder:imgs"}), says("broken.png", "cannot read image")


@case
def case_imagefolder_mixed_sizes(tmp):
    from PIL import Image

    image_folder(tmp / "imgs", {"zero/a.png": None})
    Image.new("L", (9, 7)).save(tmp / "imgs" / "zero" / "b.png")
    return suite(tmp, data={"source": "imagefolder:imgs"}), says("imgs", "differ in size", "data.image_size")


@case
def case_torchvision_root_without_data(tmp):
    (tmp / "tvroot").mkdir()
    return suite(tmp, data={"source": "torchvision:MNIST:tvroot"}), says("tvroot", "cannot load torchvision MNIST", "without downloading")


@case
def case_torchvision_without_root(tmp):
    return suite(tmp, data={"source": "torchvision:MNIST"}), says("data.source", "needs a local root", "torchvision:NAME:ROOT")


@case
def case_torchvision_unknown_dataset(tmp):
    return suite(tmp, data={"source": "torchvision:MNSIT:tvroot"}), says("data.source", "'MNSIT'", "MNIST", "CIFAR10")


# --- the model meets the data -----------------------------------------------------------------

@case
def case_model_returns_flat_scores(tmp):
    return model_run(tmp, "flat_scores"), says("model.source", "(batch, classes)", "returned (32,)")


@case
def case_model_returns_images(tmp):
    return model_run(tmp, "image_scores"), says("model.source", "(batch, classes)", "returned (32, 1, 2, 5)")


@case
def case_model_returns_a_tuple(tmp):
    return model_run(tmp, "tuple_scores"), says("model.source", "(batch, classes)", "returned tuple")


@case
def case_model_raises_on_the_data(tmp):
    return model_run(tmp, "picky_model"), says("builtin:digits", "cannot take this data", "(1, 8, 8)", "expected 3 channels")


# --- other commands and arguments -------------------------------------------------------------

@case
def case_gate_missing_scorecard(tmp):
    return ["gate", str(tmp / "absent.json")], says("absent.json", "not found")


@case
def case_gate_scorecard_from_the_future(tmp):
    path = tmp / "future.json"
    path.write_text(json.dumps({"schema_version": 99, "name": "x"}), encoding="utf-8")
    return ["gate", str(path)], says("future.json", "schema_version 99", "valid: 1")


@case
def case_missing_baseline(tmp):
    return run_args(write_config(tmp), tmp, "--baseline", str(tmp / "old.json")), says("old.json", "not found")


# --- the runner of the table ------------------------------------------------------------------

def assert_bad_input(result) -> str:
    """Exit 2, exactly one stderr line of the form `harness: error: ...`, no traceback; returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and result.stderr.count("\n") == 1, result.stderr
    assert lines[0].startswith("harness: error: "), lines[0]
    return lines[0]


def invoke_as_shell(cli, *args: str):
    """Runs the CLI under Python's default warning filters: any warning shown there is one more stderr line."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=hidden)  # what Python hides outside __main__
        result = cli(*args)
    assert not shown, [f"{w.category.__name__}: {w.message}" for w in shown]
    return result


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in CASES.items()])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, name):
    args, pattern = CASES[name].make(tmp_path)
    line = assert_bad_input(invoke_as_shell(cli, *args))
    assert re.search(pattern, line), f"{line!r} does not match {pattern!r}"
    out = tmp_path / "out"
    assert not (out / "scorecard.json").exists() and not (out / "scorecard.partial.json").exists()
    if CASES[name].config:  # found before any work: validate says the same
        assert assert_bad_input(cli("validate", args[1])) == line


def test_console_script_prints_one_line(tmp_path):
    """The real process: stderr is exactly the one line (no warning, no traceback) and the exit code is 2."""
    np.savez(tmp_path / "data.npz", x=np.full((4, 1, 8, 8), np.nan, np.float32), y=np.zeros(4, np.int64))
    args = suite(tmp_path, data={"source": "npz:data.npz"})
    done = subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"harness: error: {tmp_path / 'data.npz'}: x contains NaN or infinite values in 4 sample(s), "
                                        "the first at index 0"], done.stderr
    assert done.stdout == "" and not (tmp_path / "out").exists()


def test_the_table_covers_every_section():
    """Each top-level key of a config has at least one row here, so a new section needs a new row."""
    from harness.config import Config

    keys = set(Config.model_fields) - {"cascade"}  # a plain bool: its only bad input is a wrong type
    covered = {k for k in keys if any(k.removesuffix("s") in name for name in CASES)}
    assert covered == keys, f"no bad-input case for {sorted(keys - covered)}"


def test_uint8_data_is_fine(cli, tmp_path):
    """The positive control for the data checks: uint8 0-255 images are scaled, not refused."""
    from harness.sources.data import digits_split

    x, y = digits_split("test")
    np.savez(tmp_path / "data.npz", x=(x[:16] * 255).round().to(torch.uint8).numpy(), y=y[:16].numpy())
    args = suite(tmp_path, data={"source": "npz:data.npz"}, gates=[{"metric": "clean_accuracy", "min": 0.8}])
    result = cli(*args)
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "out" / "scorecard.json").read_text())
    assert card["provenance"]["samples"] == 16 and card["metrics"]["clean_accuracy"] >= 0.8


def test_model_returning_nan_fails_a_check_not_the_input(cli, tmp_path):
    """NaN scores are a broken model, not bad input: the run finishes, the `finite` check fails, exit 1."""
    result = cli(*model_run(tmp_path, "nan_scores"))
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.stderr == ""
    card = json.loads((tmp_path / "out" / "scorecard.json").read_text())
    checks = {c["name"]: c["status"] for c in card["checks"]}
    assert checks["finite"] == "fail" and card["passed"] is False
    assert card["metrics"]["clean_accuracy"] == 0.0
    assert "[check fail] finite" in result.stdout


def test_debug_shows_the_traceback(cli, tmp_path):
    cfg = write_config(tmp_path, nmae="typo")
    from harness.core.errors import BadInput

    with pytest.raises(BadInput, match="nmae"):
        cli("--debug", "validate", str(cfg))
