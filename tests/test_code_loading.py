"""What loading runs: a python: import leaves sys.path as it was, `harness list models` says which
sources run code, torch.load is refused below torch 2.6, torchvision data sets come from an allow-list,
and harness.run(model=obj) hands the caller's model back as it found it."""

from __future__ import annotations

import inspect
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import harness
from harness.sources import data as data_module
from harness.core.errors import BadInput
from harness.sources.models import kept_as_found, load_model, load_weights

REPO = Path(__file__).resolve().parent.parent


def module_dir(tmp_path: Path, name: str, body: str) -> Path:
    """A directory holding one importable module `name` (a name no other test uses)."""
    folder = tmp_path / "code"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(body)
    return folder


# --- python: leaves sys.path as it was -----------------------------------------------------------

NET = "import torch\ndef build():\n    torch.manual_seed(0)\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"


def test_python_source_restores_sys_path(tmp_path, monkeypatch):
    folder = module_dir(tmp_path, "codeload_restores_path", NET)
    monkeypatch.chdir(tmp_path)  # the working directory is put on the path while importing, too
    before = list(sys.path)
    assert str(folder) not in before and str(tmp_path) not in before
    try:
        model, info = load_model("python:codeload_restores_path:build", base=folder)
        assert info["source"] == "python:codeload_restores_path:build"
        assert sys.modules["codeload_restores_path"].__file__ == str(folder / "codeload_restores_path.py")
        assert sys.path == before  # the config's directory is not left at the front for the rest of the process
    finally:
        sys.modules.pop("codeload_restores_path", None)


def test_python_source_restores_sys_path_when_the_factory_fails(tmp_path):
    folder = module_dir(tmp_path, "codeload_fails", "def build():\n    raise RuntimeError('no model today')\n")
    before = list(sys.path)
    try:
        with pytest.raises(BadInput, match="no model today"):
            load_model("python:codeload_fails:build", base=folder)
        with pytest.raises(BadInput, match="cannot import module 'codeload_missing'"):
            load_model("python:codeload_missing:build", base=folder)
        assert sys.path == before
    finally:
        sys.modules.pop("codeload_fails", None)


def test_a_factory_can_still_import_beside_itself_while_it_runs(tmp_path):
    """The path is restored after the factory, not before: a factory importing a sibling lazily works."""
    folder = module_dir(tmp_path, "codeload_lazy", "def build():\n    import codeload_sibling\n    return codeload_sibling.build()\n")
    (folder / "codeload_sibling.py").write_text(NET)
    try:
        model, _ = load_model("python:codeload_lazy:build", base=folder)
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
        assert str(folder) not in sys.path
    finally:
        sys.modules.pop("codeload_lazy", None)
        sys.modules.pop("codeload_sibling", None)


def test_list_models_says_which_sources_run_code(cli):
    result = cli("list", "models")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "RUNS CODE: imports and runs the module" in lines["python:MODULE:FACTORY"]
    assert "RUNS CODE: runs the TorchScript program" in lines["torchscript:PATH"]
    assert "runs only the harness's own code" in lines["builtin:digits-cnn"]
    assert "runs only torchvision's code" in lines["torchvision:NAME"]
    assert "RUNS CODE" not in lines["builtin:digits-cnn"] + lines["torchvision:NAME"]
    assert "never unpickled" in lines["weights:"] and "torch >= 2.6" in lines["weights:"]


# --- torch at a version whose weights-only loader holds (CVE-2025-32434) ------------------------

def test_pyproject_floors_torch_at_2_6():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.6" in deps and "torchvision>=0.21" in deps


@pytest.mark.parametrize("version, refused", [("2.5.1+cu121", True), ("2.4.0", True), ("1.13.1", True),
                                              ("2.6.0", False), ("2.14.1+cu130", False), ("2.10.0a0", False)])
def test_torch_load_is_refused_below_2_6(tmp_path, monkeypatch, version, refused):
    path = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.ones(2, 3)}, path)
    monkeypatch.setattr(torch, "__version__", version)
    if refused:
        with pytest.raises(BadInput) as info:
            load_weights(path)
        assert info.value.where == str(path)
        assert f"torch {version} is older than 2.6" in info.value.problem and "CVE-2025-32434" in info.value.problem
    else:
        assert torch.equal(load_weights(path)["fc.weight"], torch.ones(2, 3))


def test_old_torch_still_loads_safetensors_and_refuses_pt_through_the_cli(tmp_path, monkeypatch, cli):
    from safetensors.torch import save_file

    from tests.conftest import tiny_linear

    state = tiny_linear().state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["fc.weight"], state["fc.weight"])  # no torch.load
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(yaml.safe_dump({"device": "cpu", "model": {"source": "python:tests.conftest:tiny_linear", "weights": "w.pt"},
                                   "data": {"limit": 8}, "attacks": []}))
    result = cli("run", str(cfg), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert str(tmp_path / "w.pt") in line and "CVE-2025-32434" in line and "torch>=2.6" in line


# --- torchvision data sets: an allow-list ------------------------------------------------------

def test_lsun_is_refused_through_the_cli_naming_the_allowed_ones(tmp_path, cli):
    (tmp_path / "lsun").mkdir()
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": "torchvision:LSUN:lsun"}, "attacks": []}))
    for command in (("run", str(cfg), "--out", str(tmp_path / "out")), ("validate", str(cfg))):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.strip().splitlines()
        assert "data.source" in line and "'LSUN' is refused: it unpickles an unchecked cache file" in line
        allowed = re.search(r"allowed, the loaders known not to unpickle unchecked files: ([^;]+);", line).group(1).split(", ")
        assert allowed == sorted(data_module.TORCHVISION_DATASETS) and {"CIFAR10", "MNIST", "SVHN"} <= set(allowed)
    assert list((tmp_path / "lsun").iterdir()) == [] and not (tmp_path / "out").exists()  # nothing read, nothing written


@pytest.mark.parametrize("name", ["FakeData", "CelebA", "Kinetics", "NoSuchSet"])
def test_anything_off_the_list_is_refused(tmp_path, name):
    with pytest.raises(BadInput) as info:
        data_module.load_data(f"torchvision:{name}:{tmp_path}")
    assert info.value.where == "data.source" and f"{name!r} is unknown or not allowed" in info.value.problem


def test_every_allowed_name_is_an_installed_torchvision_data_set_without_an_unchecked_pickle():
    import torchvision.datasets as tvd

    assert "LSUN" not in data_module.TORCHVISION_DATASETS
    for name in data_module.TORCHVISION_DATASETS:
        cls = getattr(tvd, name)
        assert inspect.isclass(cls), name
        source = inspect.getsource(inspect.getmodule(cls))
        if "pickle.load" in source:  # CIFAR only: each pickled batch is loaded after its MD5 check
            assert name in ("CIFAR10", "CIFAR100") and "check_integrity(fpath, md5)" in source, name


def test_torchvision_sets_read_by_torch_load_are_refused_on_old_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.0")
    with pytest.raises(BadInput, match="CVE-2025-32434"):
        data_module.load_data(f"torchvision:MNIST:{tmp_path}")
    with pytest.raises(BadInput, match="cannot load torchvision CIFAR10"):  # no torch.load in its loader: not refused for it
        data_module.load_data(f"torchvision:CIFAR10:{tmp_path}")


# --- harness.run(model=obj) hands the model back as it found it ---------------------------------

def caller_model() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.BatchNorm1d(32), nn.Linear(32, 10))
    net.train()
    net[1].weight.requires_grad_(False)  # a frozen layer, as a fine-tuning script leaves it
    net[3].eval()  # one submodule in eval while the rest trains
    return net


def state_of(net: nn.Module) -> tuple:
    return ([m.training for m in net.modules()], [p.requires_grad for p in net.parameters()],
            [t.device for t in [*net.parameters(), *net.buffers()]])


SMALL = {"name": "caller", "device": "cpu", "data": {"limit": 40}, "attacks": [{"name": "fgsm", "norm": "linf", "epsilons": [0.1]}],
         "gates": []}


def test_run_leaves_the_callers_model_as_it_found_it():
    net = caller_model()
    before = state_of(net)
    assert before[0] == [True, True, True, True, False, True] and before[1] == [False, True, True, True, True, True]
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    card = harness.run(SMALL, model=net, show_progress=False)
    assert card.provenance["model_source"] == "python:object"
    assert state_of(net) == before
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())  # evaluation never trained it


def test_run_restores_the_model_when_it_raises():
    net = caller_model()
    before = state_of(net)
    wrong = (torch.rand(8, 3, 5, 5), torch.zeros(8, dtype=torch.long))  # the model cannot take 3x5x5 inputs
    with pytest.raises(BadInput, match="the model cannot take this data"):
        harness.run(SMALL, model=net, data=wrong)
    assert state_of(net) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_moves_the_model_back_to_its_device():
    net = caller_model()
    before = state_of(net)
    card = harness.run({**SMALL, "device": "cuda"}, model=net, show_progress=False)
    assert card.provenance["device"].startswith("cuda")
    assert state_of(net) == before and all(p.device.type == "cpu" for p in net.parameters())


def test_kept_as_found_restores_every_flag_when_the_block_raises():
    net = caller_model()
    param = net[1].weight
    before = state_of(net)
    with pytest.raises(RuntimeError, match="midway"):
        with kept_as_found(net):
            net.eval()
            for p in net.parameters():
                p.requires_grad_(True)
            raise RuntimeError("midway")
    assert state_of(net) == before and net[1].weight is param  # the same Parameter objects: an optimizer still holds them
