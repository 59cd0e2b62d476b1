"""Loading models, weights and data: every source checked against numbers known in advance."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import harness
from harness.sources.data import load_data, subset
from harness.core.errors import BadInput
from harness.sources.models import BoundedModel, load_model, load_weights, looks_like_probabilities
from tests.conftest import LinearNet, tiny_linear


def softmax_linear(num_classes: int = 10) -> nn.Module:
    """A python:tests.test_loading:softmax_linear factory: a model that outputs probabilities."""
    return nn.Sequential(tiny_linear(num_classes), nn.Softmax(dim=1))


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def data_sha256(x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> str:
    """dataset_sha256 computed here with hashlib, from the arrays the data should hold: per array, its
    shape, then its bytes (float32 pixels, int64 labels and ids)."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64), np.ascontiguousarray(ids, np.int64)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """model_sha256 computed here with hashlib: per tensor in name order, its name, shape and dtype,
    then its raw bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous()
        h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# --- npz --------------------------------------------------------------------------------------

def test_npz_float_is_taken_as_is(tmp_path):
    x = np.random.default_rng(0).random((6, 1, 4, 4), dtype=np.float32)
    path = write_npz(tmp_path / "f.npz", x, np.array([0, 1, 2, 0, 1, 2]))
    data = load_data(f"npz:{path}")
    everything = data.read(torch.arange(len(data)))
    assert everything.dtype == torch.float32 and data.y.dtype == torch.int64 and data.shape == (1, 4, 4)
    assert torch.equal(everything, torch.from_numpy(x))
    assert data.y.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.ids.tolist() == list(range(6))


def test_npz_uint8_is_scaled_to_unit_range(tmp_path):
    x = np.array([0, 51, 255, 128], dtype=np.uint8).reshape(1, 1, 2, 2).repeat(3, axis=0)
    data = load_data(f"npz:{write_npz(tmp_path / 'u.npz', x, np.array([1, 1, 0]))}")
    everything = data.read(torch.arange(3))
    assert everything.dtype == torch.float32
    assert data.read(0).flatten().tolist() == pytest.approx([0.0, 0.2, 1.0, 128 / 255])
    assert float(everything.min()) == 0.0 and float(everything.max()) == 1.0


def test_npz_path_is_relative_to_base(tmp_path):
    write_npz(tmp_path / "rel.npz", np.zeros((2, 1, 2, 2), np.float32), np.array([0, 1]))
    assert len(load_data("npz:rel.npz", base=tmp_path)) == 2


# --- deterministic subsets --------------------------------------------------------------------

def test_limit_is_a_deterministic_sorted_subset(tmp_path):
    n = 100
    x = (np.arange(n, dtype=np.float32) / n).reshape(n, 1, 1, 1)
    path = write_npz(tmp_path / "d.npz", x, np.arange(n) % 10)
    a = load_data(f"npz:{path}", limit=20, seed=0)
    b = load_data(f"npz:{path}", limit=20, seed=0)
    c = load_data(f"npz:{path}", limit=20, seed=1)
    assert torch.equal(a.ids, b.ids) and a.sha256() == b.sha256()
    assert not torch.equal(a.ids, c.ids) and a.sha256() != c.sha256()
    ids = a.ids.numpy()
    assert a.sha256() == data_sha256(x[ids], (np.arange(n) % 10)[ids], ids)  # the hash names the samples measured
    assert len(a) == 20 and len(set(a.ids.tolist())) == 20
    assert a.ids.tolist() == sorted(a.ids.tolist())
    # each sample is the one its id names
    assert torch.equal(a.read(torch.arange(len(a))).flatten(), a.ids.float() / n)
    assert torch.equal(a.y, a.ids % 10)


@pytest.mark.parametrize("limit", [None, 100, 1000])
def test_limit_at_or_above_n_gives_everything(limit):
    assert subset(100, limit, seed=3).tolist() == list(range(100))


def test_builtin_digits_subset_is_stable():
    a = load_data("builtin:digits", "test", limit=32, seed=0)
    assert len(a) == 32 and a.shape == (1, 8, 8)
    assert torch.equal(a.ids, load_data("builtin:digits", "test", limit=32, seed=0).ids)
    assert len(load_data("builtin:digits", "test")) == 450  # 25% of scikit-learn's 1797 digits


# --- imagefolder ------------------------------------------------------------------------------

def write_png(path: Path, value: int, size: tuple[int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, color=value).save(path)


def test_imagefolder_labels_follow_sorted_folder_names(tmp_path):
    # created out of order: labels must come from the sorted names, not the creation order
    write_png(tmp_path / "zebra" / "a.png", 255, (6, 6))
    write_png(tmp_path / "apple" / "a.png", 0, (6, 6))
    write_png(tmp_path / "apple" / "b.png", 51, (6, 6))
    write_png(tmp_path / "mango" / "a.png", 102, (6, 6))
    data = load_data(f"imagefolder:{tmp_path}")
    x = data.read(torch.arange(len(data)))
    assert x.shape == (4, 3, 6, 6) and data.shape == (3, 6, 6)  # ImageFolder reads RGB
    assert data.y.tolist() == [0, 0, 1, 2]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert [round(float(v), 4) for v in x.mean(dim=(1, 2, 3))] == [0.0, 0.2, 0.4, 1.0]


def test_imagefolder_uses_the_split_folder_when_there_is_one(tmp_path):
    write_png(tmp_path / "train" / "a" / "x.png", 0, (4, 4))
    write_png(tmp_path / "test" / "a" / "x.png", 255, (4, 4))
    write_png(tmp_path / "test" / "b" / "x.png", 255, (4, 4))
    assert len(load_data(f"imagefolder:{tmp_path}", split="test")) == 2
    assert len(load_data(f"imagefolder:{tmp_path}", split="train")) == 1


def mixed_sizes(root: Path) -> None:
    write_png(root / "a" / "small.png", 255, (8, 8))
    write_png(root / "a" / "wide.png", 255, (20, 10))
    write_png(root / "b" / "tall.png", 0, (9, 13))


@pytest.mark.parametrize("size, shape", [(8, (8, 8)), ([6, 10], (6, 10))])
def test_imagefolder_image_size_resizes_mixed_sizes(tmp_path, size, shape):
    mixed_sizes(tmp_path)
    data = load_data(f"imagefolder:{tmp_path}", image_size=size)
    x = data.read(torch.arange(len(data)))
    assert x.shape == (3, 3, *shape)
    assert data.y.tolist() == [0, 0, 1]
    assert torch.allclose(x[:2], torch.ones(1)) and torch.allclose(x[2], torch.zeros(1))


def test_imagefolder_mixed_sizes_without_image_size_is_exit_2(cli, tmp_path):
    mixed_sizes(tmp_path / "imgs")
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(yaml.safe_dump({"device": "cpu", "data": {"source": "imagefolder:imgs"}}), encoding="utf-8")
    result = cli("run", str(cfg), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1
    assert "imgs" in result.stderr and "image_size" in result.stderr


# --- torchvision datasets: local only ---------------------------------------------------------

def test_torchvision_dataset_without_files_names_the_root(tmp_path):
    root = tmp_path / "cifar"
    root.mkdir()
    with pytest.raises(BadInput) as info:
        load_data(f"torchvision:CIFAR10:{root}")
    assert info.value.where == str(root)
    assert "without downloading" in info.value.problem
    assert list(root.iterdir()) == []  # nothing was fetched


def test_torchvision_dataset_is_never_asked_to_download(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
            calls.append({"root": root, "train": train, "download": download})
            self.items = [(torch.full((3, 2, 2), i / 4), i) for i in range(3)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    data = load_data("torchvision:CIFAR10:data", split="test", base=tmp_path)
    assert calls == [{"root": str(tmp_path / "data"), "train": False, "download": False}]
    assert data.y.tolist() == [0, 1, 2] and data.read(2).flatten().tolist() == [0.5] * 12


# --- model sources ----------------------------------------------------------------------------

def test_python_factory_gets_its_kwargs():
    model, info = load_model("python:tests.conftest:tiny_linear", kwargs={"num_classes": 3})
    assert isinstance(model.net, LinearNet) and model.net.fc.out_features == 3
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 3)
    assert info["source"] == "python:tests.conftest:tiny_linear" and info["model_sha256"] == state_sha256(tiny_linear(3).state_dict())


def test_python_factory_kwargs_through_a_config(tmp_path):
    card = harness.run({"device": "cpu", "model": {"source": "python:tests.conftest:tiny_linear", "kwargs": {"num_classes": 12}},
                        "data": {"limit": 32}})
    data = load_data("builtin:digits", limit=32)
    with torch.no_grad():
        logits = tiny_linear(num_classes=12)(data.read(torch.arange(len(data))))
    assert logits.shape == (32, 12) and card.provenance["samples"] == 32
    assert card.metrics["clean_accuracy"] == pytest.approx(float((logits.argmax(1) == data.y).float().mean()))


def test_torchvision_resnet18_from_a_local_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    model, info = load_model("torchvision:resnet18", weights=str(tmp_path / "r18.pt"), num_classes=10)
    assert torch.equal(model.net.fc.weight, net.fc.weight) and torch.equal(model.net.conv1.weight, net.conv1.weight)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model(x), net.eval()(x), atol=1e-5)
    assert info["weights"] == str(tmp_path / "r18.pt")
    assert info["weights_sha256"] == hashlib.sha256((tmp_path / "r18.pt").read_bytes()).hexdigest()


def test_torchvision_model_without_weights_is_exit_2(cli, tmp_path):
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(yaml.safe_dump({"device": "cpu", "model": {"source": "torchvision:resnet18", "num_classes": 10}}), encoding="utf-8")
    result = cli("run", str(cfg), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr.startswith("harness: error: model.weights: ") and len(result.stderr.splitlines()) == 1
    assert "nothing is downloaded" in result.stderr


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, still what users ship
def test_torchscript_round_trip(tmp_path):
    net = tiny_linear().eval()
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    model, _ = load_model(f"torchscript:{tmp_path / 'net.pt'}")
    x = torch.rand(4, 1, 8, 8)
    assert isinstance(model.net, torch.jit.ScriptModule)
    assert torch.equal(model(x), net(x))


# --- weights files ----------------------------------------------------------------------------

KNOWN_MODEL_SHA256 = "56f5cbdbf8cf79f3d17a077c42f2cb0722667071842ee4b050325fe10ef9e363"


def trained_like() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return LinearNet().state_dict()


def save_safetensors(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path))


@pytest.mark.parametrize("form", ["safetensors", "state_dict", "checkpoint", "data_parallel"])
def test_weights_forms_load_the_same_tensors(tmp_path, form):
    state = trained_like()
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pt")
    if form == "safetensors":
        save_safetensors(path, state)
    elif form == "state_dict":
        torch.save(state, path)
    elif form == "checkpoint":
        torch.save({"epoch": 3, "state_dict": state, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_weights(path)
    assert sorted(loaded) == ["fc.bias", "fc.weight"]
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    model, info = load_model("python:tests.conftest:tiny_linear", weights=str(path))
    assert torch.equal(model.net.fc.weight, state["fc.weight"])
    # the file's bytes, and the tensors as evaluated: the same model hash whichever form carried them
    assert info["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["model_sha256"] == state_sha256(state)


def test_model_hash_known_answer(tmp_path):
    """A fixed state's digest, written down once (so state_sha256 above is pinned too); one value
    changed by 1e-7 changes it."""
    state = {"fc.weight": torch.arange(640, dtype=torch.float32).reshape(10, 64) / 640, "fc.bias": torch.zeros(10)}
    assert state_sha256(state) == KNOWN_MODEL_SHA256
    changed = {**state, "fc.bias": torch.tensor([0.0] * 9 + [1e-7])}
    for weights, expected in ((state, KNOWN_MODEL_SHA256), (changed, state_sha256(changed))):
        save_safetensors(tmp_path / "w.safetensors", weights)
        _, info = load_model("python:tests.conftest:tiny_linear", weights=str(tmp_path / "w.safetensors"))
        assert info["model_sha256"] == expected
    assert state_sha256(changed) != KNOWN_MODEL_SHA256


def test_weights_path_is_relative_to_base(tmp_path):
    save_safetensors(tmp_path / "w.safetensors", trained_like())
    model, info = load_model("python:tests.conftest:tiny_linear", weights="w.safetensors", base=tmp_path)
    assert info["weights"] == str(tmp_path / "w.safetensors")
    assert torch.equal(model.net.fc.bias, trained_like()["fc.bias"])


# --- the model boundary -----------------------------------------------------------------------

class Recorder(nn.Module):
    """Returns a flattened copy of its input (so normalization is visible) through a dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x.flatten(1) * self.scale)


def test_bounded_model_normalizes_per_channel():
    mean, std = [0.5, 0.25, 0.0], [0.5, 0.25, 2.0]
    model = BoundedModel(Recorder(), mean, std)
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(model(x), expected.flatten(1))
    assert torch.equal(BoundedModel(Recorder())(x), x.flatten(1))  # no preprocessing: inputs pass as they are


def test_bounded_model_stays_in_eval_mode_and_frozen():
    model = BoundedModel(Recorder())
    assert model.train() is model
    assert not model.training and not model.net.training and not model.net.drop.training
    x = torch.ones(64, 1, 4, 4)
    assert torch.equal(model(x), x.flatten(1))  # dropout off: training mode would zero about half
    assert all(not p.requires_grad for p in model.parameters())
    x.requires_grad_(True)
    model(x).sum().backward()  # input gradients still flow
    assert torch.equal(x.grad, torch.ones_like(x))


def test_probability_outputs_are_detected():
    x = torch.rand(16, 1, 8, 8)
    logits = tiny_linear()(x)
    assert looks_like_probabilities(softmax_linear()(x))
    assert not looks_like_probabilities(logits)
    assert not looks_like_probabilities(torch.sigmoid(logits))  # in [0, 1] but rows do not sum to 1


def test_probability_model_is_flagged_in_the_scorecard():
    card = harness.run({"device": "cpu", "model": {"source": "python:tests.test_loading:softmax_linear"}, "data": {"limit": 32},
                        "attacks": [{"name": "fgsm", "norm": "linf", "epsilons": [0.1]}]})
    checks = {c["name"]: c for c in card.checks}
    assert {"name": "output-logits", "status": "warn"}.items() <= checks["output-logits"].items()
    assert "probabilities" in checks["output-logits"]["detail"]
    assert checks["budget"]["status"] == "pass" and checks["finite"]["status"] == "pass"
    # the logarithm handed to attacks keeps the predictions of the probabilities
    data = load_data("builtin:digits", limit=32)
    with torch.no_grad():
        probs = softmax_linear()(data.read(torch.arange(len(data))))
    assert card.metrics["clean_accuracy"] == pytest.approx(float((probs.argmax(1) == data.y).float().mean()))


def test_logits_model_passes_the_output_check():
    card = harness.run({"device": "cpu", "model": {"source": "python:tests.conftest:tiny_linear"}, "data": {"limit": 32}})
    assert {"name": "output-logits", "status": "pass", "detail": "the model outputs logits"} in card.checks


# --- the builtin model ------------------------------------------------------------------------

def test_builtin_digits_model_is_accurate(digits_model, digits_test):
    x, y = digits_test
    with torch.no_grad():
        accuracy = float((digits_model(x).argmax(1) == y).float().mean())
    assert len(y) == 450
    assert accuracy >= 0.95, accuracy


@pytest.mark.slow
def test_builtin_training_is_deterministic(digits_model):
    """A fresh training gives bit for bit the weights in the cache, which another process (an earlier
    session, or this one's first use) trained: the same recipe, the same model, whoever trains it."""
    from harness.sources.builtin import accuracy, train_digits_cnn
    from harness.sources.data import digits_split

    a, acc_a = train_digits_cnn()
    sa, sb = a.state_dict(), digits_model.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert acc_a == accuracy(digits_model, *digits_split("test")) >= 0.95


def test_builtin_training_does_not_depend_on_the_callers_thread_count():
    """The cached builtin weights must be the same whichever process trains them first: a test session
    (one torch thread) or a `harness run` (all cores). Without the recipe's own thread count, 1 and 2
    threads give different weights."""
    from harness.sources.builtin import RECIPE, train_digits_cnn

    recipe = {**RECIPE, "epochs": 1}
    before = torch.get_num_threads()
    weights = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        weights.append(train_digits_cnn(recipe)[0].state_dict())
        assert torch.get_num_threads() == threads  # the caller's setting is restored
    torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
