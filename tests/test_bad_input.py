"""Bad input of every kind ends in exit 2 and one line on stderr that names the file or key path.

Each case builds its files under tmp_path and returns the command line and the pieces the error
line must contain. Adding a row here is all a new kind of bad input needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import tiny_linear

Case = Callable[[Path], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {}

DATA = {"source": "builtin:digits", "limit": 32}


def case(fn: Case) -> Case:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def write_config(tmp: Path, **sections: Any) -> Path:
    """A small valid suite (digits, 32 samples, CPU), with the given top-level keys replaced."""
    raw = {"name": "bad-input", "device": "cpu", "model": {"source": "builtin:digits-cnn"}, "data": dict(DATA), **sections}
    path = tmp / "suite.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def run_args(cfg: Path, tmp: Path, *extra: str) -> list[str]:
    return ["run", str(cfg), "--out", str(tmp / "out"), *extra]


def pgd(**knobs: Any) -> dict[str, Any]:
    return {"name": "pgd", "norm": "linf", "epsilons": ["8/255"], "steps": 1, **knobs}


def npz_run(tmp: Path, **arrays: np.ndarray) -> tuple[list[str], list[str]]:
    path = tmp / "data.npz"
    np.savez(path, **arrays)
    cfg = write_config(tmp, data={"source": f"npz:{path.name}"})
    return run_args(cfg, tmp), ["data.npz"]


def weights_run(tmp: Path, weights: Path) -> list[str]:
    cfg = write_config(tmp, model={"source": "python:tests.conftest:tiny_linear", "weights": weights.name})
    return run_args(cfg, tmp)


# --- the config file itself -------------------------------------------------------------------

@case
def case_missing_config(tmp):
    return run_args(tmp / "nowhere.yaml", tmp), ["nowhere.yaml", "not found"]


@case
def case_config_is_a_directory(tmp):
    (tmp / "adir.yaml").mkdir()
    return run_args(tmp / "adir.yaml", tmp), ["adir.yaml", "cannot read"]


@case
def case_config_not_utf8(tmp):
    path = tmp / "binary.yaml"
    path.write_bytes(b"name: \xff\xfe\x00\x81 binary\n")
    return ["validate", str(path)], ["binary.yaml", "YAML"]


@case
def case_invalid_yaml_syntax(tmp):
    path = tmp / "broken.yaml"
    path.write_text("name: x\nmodel: {source: [unclosed\n", encoding="utf-8")
    return ["validate", str(path)], ["broken.yaml", "not valid YAML", "line"]


@case
def case_unknown_top_level_key(tmp):
    return ["validate", str(write_config(tmp, nmae="typo"))], ["suite.yaml", "'nmae'", "name"]


@case
def case_unknown_model_key(tmp):
    cfg = write_config(tmp, model={"source": "builtin:digits-cnn", "foo": 1})
    return ["validate", str(cfg)], ["suite.yaml", "model.foo", "weights"]


@case
def case_unknown_data_key(tmp):
    cfg = write_config(tmp, data={**DATA, "bar": 1})
    return ["validate", str(cfg)], ["suite.yaml", "data.bar", "batch_size"]


# --- attacks and epsilons ---------------------------------------------------------------------

@case
def case_unknown_attack(tmp):
    cfg = write_config(tmp, attacks=[{"name": "deepfoo", "norm": "linf", "epsilons": [0.1]}])
    return ["validate", str(cfg)], ["attacks[0]", "'deepfoo'", "fgsm", "pgd"]


@case
def case_unknown_attack_parameter(tmp):
    cfg = write_config(tmp, attacks=[pgd(stepz=3)])
    return ["validate", str(cfg)], ["attacks[0]", "'stepz'", "steps"]


@case
def case_unknown_norm(tmp):
    cfg = write_config(tmp, attacks=[pgd(norm="l7")])
    return ["validate", str(cfg)], ["attacks[0].norm", "'l7'", "linf", "l2"]


@pytest.mark.parametrize("eps", ["8/x", "abc"])
def test_epsilon_that_does_not_parse(cli, tmp_path, eps):
    cfg = write_config(tmp_path, attacks=[pgd(epsilons=[eps])])
    line = assert_bad_input(cli("validate", str(cfg)))
    assert "attacks[0].epsilons[0]" in line and repr(eps) in line and "8/255" in line


@case
def case_negative_epsilon(tmp):
    cfg = write_config(tmp, attacks=[pgd(epsilons=["1/255", -0.1])])
    return ["validate", str(cfg)], ["attacks[0].epsilons[1]", "negative"]


@case
def case_zero_denominator(tmp):
    cfg = write_config(tmp, attacks=[pgd(epsilons=["8/0"])])
    return ["validate", str(cfg)], ["attacks[0].epsilons[0]", "'8/0'"]


@case
def case_empty_epsilons(tmp):
    cfg = write_config(tmp, attacks=[pgd(epsilons=[])])
    return ["validate", str(cfg)], ["attacks[0]", "needs `epsilons`"]


# --- model sources and weights ----------------------------------------------------------------

@case
def case_unknown_model_source(tmp):
    cfg = write_config(tmp, model={"source": "hub:some/model"})
    return ["validate", str(cfg)], ["model.source", "'hub:some/model'", "builtin:digits-cnn", "python:MODULE:FACTORY"]


@case
def case_unknown_data_source(tmp):
    cfg = write_config(tmp, data={"source": "s3:bucket/x"})
    return ["validate", str(cfg)], ["data.source", "'s3:bucket/x'", "builtin:digits", "npz:PATH", "imagefolder:PATH"]


@case
def case_missing_weights(tmp):
    return weights_run(tmp, tmp / "gone.safetensors"), ["gone.safetensors", "not found"]


@case
def case_corrupt_pt_weights(tmp):
    path = tmp / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return weights_run(tmp, path), ["noise.pt", "corrupt"]


@case
def case_truncated_safetensors(tmp):
    from safetensors.torch import save_file

    path = tmp / "cut.safetensors"
    save_file(tiny_linear().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:100])
    return weights_run(tmp, path), ["cut.safetensors", "corrupt"]


@case
def case_weights_of_another_shape(tmp):
    path = tmp / "other.pt"
    torch.save(tiny_linear(num_classes=5).state_dict(), path)
    return weights_run(tmp, path), ["other.pt", "do not fit", "size mismatch"]


class _WritesAFile:
    """A pickle whose loading would create a file: what an attacker's weights file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@case
def case_pickle_with_code(tmp):
    marker = tmp / "PWNED"
    path = tmp / "evil.pt"
    torch.save({"fc.weight": torch.zeros(10, 64), "payload": _WritesAFile(marker)}, path)
    return weights_run(tmp, path), ["evil.pt", "refused"]


# --- data -------------------------------------------------------------------------------------

@case
def case_data_with_three_channels(tmp):
    args, where = npz_run(tmp, x=np.zeros((4, 3, 8, 8), np.float32), y=np.zeros(4, np.int64))
    return args, where + ["cannot take this data", "(3, 8, 8)"]


@case
def case_data_too_small(tmp):
    args, where = npz_run(tmp, x=np.zeros((4, 1, 5, 5), np.float32), y=np.zeros(4, np.int64))
    return args, where + ["cannot take this data", "(1, 5, 5)"]


@case
def case_labels_beyond_classes(tmp):
    args, where = npz_run(tmp, x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 12, 3]))
    return args, where + ["labels go up to 12", "10 classes"]


@case
def case_empty_dataset(tmp):
    args, where = npz_run(tmp, x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    return args, where + ["empty"]


@case
def case_nan_in_x(tmp):
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[2, 0, 3, 3] = np.nan
    args, where = npz_run(tmp, x=x, y=np.zeros(4, np.int64))
    return args, where + ["NaN"]


@case
def case_float_x_outside_unit_range(tmp):
    args, where = npz_run(tmp, x=np.full((4, 1, 8, 8), 16.0, np.float32), y=np.zeros(4, np.int64))
    return args, where + ["[0, 1]", "16"]


@case
def case_npz_without_y(tmp):
    args, where = npz_run(tmp, x=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    return args, where + ["missing", "y", "labels"]


@case
def case_npz_object_arrays(tmp):
    x = np.empty(4, dtype=object)
    x[:] = [np.zeros((1, 8, 8), np.float32)] * 4
    args, where = npz_run(tmp, x=x, y=np.zeros(4, np.int64))
    return args, where + ["unpickling"]


# --- gates, devices, sizes, arguments, scorecards ---------------------------------------------

@case
def case_gate_unknown_metric(tmp):
    cfg = write_config(tmp, attacks=[pgd()], gates=[{"metric": "robust_accuracy:pgd-linf@9/255", "min": 0.5}])
    return ["validate", str(cfg)], ["gates[0].metric", "robust_accuracy:pgd-linf@8/255", "clean_accuracy"]


@case
def case_gate_with_min_and_max(tmp):
    cfg = write_config(tmp, gates=[{"metric": "clean_accuracy", "min": 0.5, "max": 0.9}])
    return ["validate", str(cfg)], ["gates[0]", "exactly one of min, max, max_drop"]


@case
def case_device_cuda_without_cuda(tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return run_args(write_config(tmp, device="cuda"), tmp), ["device", "no CUDA"]


@case
def case_device_tpu(tmp):
    return ["validate", str(write_config(tmp, device="tpu"))], ["suite.yaml: device:", "'tpu'", "cuda:N"]


@case
def case_batch_size_zero(tmp):
    cfg = write_config(tmp, data={**DATA, "batch_size": 0})
    return ["validate", str(cfg)], ["data.batch_size", "greater than or equal to 1"]


@case
def case_limit_zero(tmp):
    cfg = write_config(tmp, data={**DATA, "limit": 0})
    return ["validate", str(cfg)], ["data.limit", "greater than or equal to 1"]


@case
def case_device_argument_bogus(tmp):
    return run_args(write_config(tmp), tmp, "--device", "bogus"), ["device", "'bogus'", "cuda:N"]


@case
def case_gate_missing_scorecard(tmp):
    return ["gate", str(tmp / "absent.json")], ["absent.json", "not found"]


@case
def case_gate_scorecard_from_the_future(tmp):
    path = tmp / "future.json"
    path.write_text(json.dumps({"schema_version": 99, "name": "x"}), encoding="utf-8")
    return ["gate", str(path)], ["future.json", "schema_version 99", "valid: 1"]


def assert_bad_input(result) -> str:
    """Exit 2, exactly one stderr line of the form `harness: error: ...`, no traceback; returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("harness: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, name):
    args, expected = CASES[name](tmp_path)
    result = cli(*args)
    line = assert_bad_input(result)
    for piece in expected:
        assert piece in line, f"{piece!r} not in {line!r}"
    assert not (tmp_path / "out" / "scorecard.json").exists()


def test_pickle_payload_never_runs(cli, tmp_path):
    args, _ = case_pickle_with_code(tmp_path)
    assert_bad_input(cli(*args))
    assert not (tmp_path / "PWNED").exists()
    # the payload is live: an unrestricted load writes the file, so the refusal above is what saved us
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "PWNED").read_text() == "pwned"


def test_debug_shows_the_traceback(cli, tmp_path):
    cfg = write_config(tmp_path, nmae="typo")
    from harness.errors import BadInput

    with pytest.raises(BadInput, match="nmae"):
        cli("--debug", "validate", str(cfg))
