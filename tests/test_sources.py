"""Sample sources read by rows: every kind against an independently built in-memory array, npy memory
mapping, image folders decoded per batch, the streamed hash, and `harness run` on each kind."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import harness.sources.samples as samples
from harness.core.errors import BadInput
from harness.sources.data import data_from_tensors, load_data, subset
from harness.sources.samples import LazyData, NpyReader, TensorData

N, SHAPE = 70, (3, 8, 8)


def tiny_cnn() -> nn.Module:
    """A python:tests.test_sources:tiny_cnn factory: 3x8x8 images, 3 classes, fixed weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))


def pixels(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), rng.integers(0, 3, n)


def eager_sha256(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> str:
    """The dataset hash as an in-memory tensor gave it before sources were lazy: per tensor, its shape
    then its bytes."""
    h = hashlib.sha256()
    for t in (x.contiguous(), y.contiguous(), ids.contiguous()):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def write_npy(folder: Path, x: np.ndarray, y: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    return folder


def write_folder(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """One RGB PNG per sample, under its class folder; names sort in sample order within a class."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y)):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.transpose(img, (1, 2, 0))).save(root / f"c{label}" / f"{i:05d}.png")
    return root


def folder_order(y: np.ndarray) -> np.ndarray:
    """The sample order ImageFolder lists: by class folder, then file name."""
    return np.lexsort((np.arange(len(y)), y))


ROWS = [torch.tensor([0, 5, 3, 3, 69]), torch.arange(10, 40), torch.tensor([], dtype=torch.long)]


def assert_reads(data, expected: torch.Tensor) -> None:
    """`data` reads `expected` (its in-memory copy, float32) at any rows: unsorted, repeated, a range,
    none, an int, a slice."""
    assert data.shape == tuple(expected.shape[1:]) and len(data) == expected.shape[0]
    for rows in ROWS:
        rows = rows[rows < len(data)]
        got = data.read(rows)
        assert got.dtype == torch.float32 and torch.equal(got, expected[rows])
    assert torch.equal(data.read(len(data) - 1), expected[-1])
    assert torch.equal(data.read(slice(None)), expected)


# --- every kind reads the samples its rows name ---------------------------------------------------

@pytest.mark.parametrize("limit", [None, 25])
def test_npz_npy_and_tensors_read_the_rows_asked(tmp_path, limit):
    x, y = pixels()
    idx = subset(N, limit, seed=4)
    expected = torch.from_numpy(x).float()[idx] / 255.0
    np.savez(tmp_path / "d.npz", x=x, y=y)
    kinds = {"npz": load_data(f"npz:{tmp_path / 'd.npz'}", limit=limit, seed=4),
             "npy": load_data(f"npy:{write_npy(tmp_path / 'npy', x, y)}", limit=limit, seed=4),
             "tensors": data_from_tensors(torch.from_numpy(x), torch.from_numpy(y), limit=limit, seed=4)}
    assert isinstance(kinds["npy"], LazyData) and isinstance(kinds["npz"], TensorData)
    for name, data in kinds.items():
        assert torch.equal(data.ids, idx) and data.y.tolist() == y[idx.numpy()].tolist(), name
        assert_reads(data, expected)


def test_npy_float_pixels_are_taken_as_is(tmp_path):
    x = np.random.default_rng(1).random((N, *SHAPE))  # float64: cast to float32 as npz is
    data = load_data(f"npy:{write_npy(tmp_path, x, np.arange(N) % 3)}")
    assert_reads(data, torch.from_numpy(x).float())


def test_imagefolder_reads_the_rows_asked(tmp_path):
    x, y = pixels()
    order = folder_order(y)
    data = load_data(f"imagefolder:{write_folder(tmp_path / 'imgs', x, y)}", limit=30, seed=2)
    idx = subset(N, 30, seed=2)
    assert isinstance(data, LazyData) and torch.equal(data.ids, idx)
    assert data.y.tolist() == y[order][idx.numpy()].tolist()
    assert_reads(data, torch.from_numpy(x[order]).float()[idx] / 255.0)


def test_torchvision_reads_by_index_when_asked(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    x = torch.rand(N, *SHAPE)
    reads: list[int] = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
            pass

        def __len__(self):
            return N

        def __getitem__(self, i):
            reads.append(i)
            return x[i], i % 3

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    data = load_data("torchvision:CIFAR10:data", base=tmp_path, limit=40, seed=1)
    assert sorted(reads) == list(range(N))  # opening checks each sample once (sizes, readability) ...
    reads.clear()
    got = data.read(torch.tensor([3, 1]))
    ids = subset(N, 40, seed=1)
    assert reads == [int(ids[3]), int(ids[1])]  # ... then a read decodes only the rows asked
    assert data.y.tolist() == (ids % 3).tolist()
    assert_reads(data, x[ids])


# --- npy is memory-mapped: only the rows read are read -------------------------------------------

def test_npy_reads_come_from_the_file_a_batch_at_a_time(tmp_path):
    x = np.random.default_rng(2).random((N, *SHAPE), dtype=np.float32)
    folder = write_npy(tmp_path, x, np.arange(N) % 3)
    data = load_data(f"npy:{folder}")
    assert isinstance(data.reader, NpyReader) and isinstance(data.reader._map(), np.memmap)
    # corrupt the tail on disk after loading: rows before it still read right, and the tail reads what
    # the file now holds, so nothing was copied into memory when the set was opened
    mm = np.load(folder / "x.npy", mmap_mode="r+")
    mm[60:] = np.nan
    mm.flush()
    del mm
    assert torch.equal(data.read(torch.arange(60)), torch.from_numpy(x[:60]))
    assert bool(torch.isnan(data.read(torch.arange(60, N))).all())


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status VmRSS on this system")


def test_npy_larger_than_what_is_read_is_never_loaded_whole(tmp_path):
    n, shape = 3000, (4, 64, 64)  # 196 MB of float32
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(n, *shape))
    for a in range(0, n, 250):
        x[a:a + 250] = np.float32(a / n)
    x.flush()
    del x
    np.save(tmp_path / "y.npy", np.zeros(n, dtype=np.int64))
    before = _rss_bytes()
    data = load_data(f"npy:{tmp_path}")  # validates every value, a chunk at a time
    rows = data.read(torch.tensor([0, 2999]))
    grown = _rss_bytes() - before
    assert rows[0].max() == 0.0 and rows[1].min() == np.float32(2750 / n)
    assert grown < 80 * 2**20, f"resident memory grew {grown / 2**20:.0f} MB reading a 196 MB file"


# --- image folders decode per batch exactly as the eager decode did -------------------------------

def test_imagefolder_batches_match_the_eager_decode(tmp_path):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from harness.sources.data import _image_transform

    rng = np.random.default_rng(3)
    for i in range(24):  # mixed sizes and modes, resized: the transform runs per batch as it did on load
        size = (int(rng.integers(9, 20)), int(rng.integers(9, 20)))
        a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        img = Image.fromarray(a) if i % 3 else Image.fromarray(a[..., 0])  # greyscale too: ImageFolder reads RGB
        (tmp_path / f"k{i % 4}").mkdir(exist_ok=True)
        img.save(tmp_path / f"k{i % 4}" / f"{i}.png")
    eager = ImageFolder(str(tmp_path), transform=_image_transform([7, 9]))  # today's decode: every image, stacked
    x = torch.stack([eager[i][0] for i in range(len(eager))])
    y = torch.tensor([eager[i][1] for i in range(len(eager))])
    data = load_data(f"imagefolder:{tmp_path}", image_size=[7, 9])
    assert torch.equal(data.y, y) and data.shape == (3, 7, 9)
    for batch in torch.arange(len(data)).split(5):
        assert torch.equal(data.read(batch), x[batch])
    assert data.sha256() == eager_sha256(x, y, torch.arange(len(y)))


# --- the streamed hash is the eager one --------------------------------------------------------

@pytest.mark.parametrize("stream_bytes", [samples.STREAM_BYTES, 3 * 4 * 8 * 8 * 7])  # one batch, or batches of 7
def test_streamed_sha256_equals_the_eager_one(tmp_path, monkeypatch, stream_bytes):
    monkeypatch.setattr(samples, "STREAM_BYTES", stream_bytes)
    x, y = pixels()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    idx = subset(N, 33, seed=0)
    want = eager_sha256(torch.from_numpy(x).float()[idx] / 255.0, torch.from_numpy(y)[idx], idx)
    npz = load_data(f"npz:{tmp_path / 'd.npz'}", limit=33)
    npy = load_data(f"npy:{write_npy(tmp_path / 'npy', x, y)}", limit=33)
    assert npz.sha256() == want == npy.sha256()
    assert npz.batch_rows() == (7 if stream_bytes < 10_000 else samples.STREAM_BYTES // (4 * 3 * 8 * 8))


def test_builtin_digits_hash_is_unchanged():
    from harness.sources.data import digits_split

    x, y = digits_split("test")
    idx = subset(len(y), 60, seed=3)
    assert load_data("builtin:digits", limit=60, seed=3).sha256() == eager_sha256(x[idx], y[idx], idx)


# --- `harness run` on each kind: the same samples, the same results --------------------------------

def _run(cli, tmp_path: Path, name: str, source: str) -> dict:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "device": "cpu", "model": {"source": "python:tests.test_sources:tiny_cnn"},
        "data": {"source": source, "limit": None, "batch_size": 16},
        "attacks": [{"name": "fgsm", "norm": "linf", "epsilons": [0.05]}, {"name": "pgd", "norm": "l2", "epsilons": [0.5], "steps": 3}]}))
    result = cli("run", str(cfg), "--out", str(tmp_path / name))
    assert result.exit_code in (0, 1), result.output
    return json.loads((tmp_path / name / "scorecard.json").read_text())


def test_run_on_npy_and_imagefolder_equals_the_run_on_npz(cli, tmp_path):
    x, y = pixels(48, seed=5)
    order = folder_order(y)  # the image folder lists samples by class: the npz holds them in that order
    x, y = x[order], y[order]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    write_npy(tmp_path / "npy", x, y)
    write_folder(tmp_path / "imgs", x, y)
    cards = {name: _run(cli, tmp_path, name, src) for name, src in
             (("npz", "npz:d.npz"), ("npy", "npy:npy"), ("imagefolder", "imagefolder:imgs"))}
    base = cards["npz"]
    assert base["provenance"]["samples"] == 48 and len(base["metrics"]) >= 3
    for name in ("npy", "imagefolder"):
        assert cards[name]["metrics"] == base["metrics"], name
        assert cards[name]["provenance"]["dataset_sha256"] == base["provenance"]["dataset_sha256"], name
        outcomes = (tmp_path / name / "outcomes.json").read_text()
        assert outcomes == (tmp_path / "npz" / "outcomes.json").read_text(), name  # per-sample digests too


# --- bad npy input: exit 2, one line naming the file -----------------------------------------------

def _bad(tmp_path: Path, x, y, x_file: bytes | None = None) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    if x_file is not None:
        (folder / "x.npy").write_bytes(x_file)
    elif x is not None:
        np.save(folder / "x.npy", x, allow_pickle=True)
    if y is not None:
        np.save(folder / "y.npy", y, allow_pickle=True)
    return folder


GOOD_X, GOOD_Y = np.zeros((4, *SHAPE), np.float32), np.array([0, 1, 2, 0])
NAN_X = GOOD_X.copy()
NAN_X[2, 1, 3, 3] = np.nan
BAD_NPY = {
    "wrong_shape": (lambda: (GOOD_X[:, 0], GOOD_Y, None), "x.npy", r"x must have shape \(N, C, H, W\), got \(4, 8, 8\)"),
    "nan": (lambda: (NAN_X, GOOD_Y, None), "x.npy", r"NaN or infinite values in 1 sample\(s\), the first at index 2"),
    "out_of_unit_range": (lambda: (GOOD_X + 2, GOOD_Y, None), "x.npy", r"float x must lie in \[0, 1\], found values in \[2, 2\]"),
    "int_pixels": (lambda: (GOOD_X.astype(np.int32), GOOD_Y, None), "x.npy", r"float in \[0, 1\] or uint8 0-255, got int32"),
    "negative_labels": (lambda: (GOOD_X, np.array([0, -1, 2, 0]), None), "y.npy", r"labels must be non-negative, found -1"),
    "fractional_labels": (lambda: (GOOD_X, np.array([0, 1.5, 2, 0]), None), "y.npy", r"integer class labels, found 1.5 at sample 1"),
    "labels_too_few": (lambda: (GOOD_X, GOOD_Y[:3], None), "y.npy", r"y must have shape \(4,\) to match x, got \(3,\)"),
    "object_pixels": (lambda: (np.array([{"a": 1}] * 4, dtype=object), GOOD_Y, None), "x.npy", r"without unpickling"),
    "object_labels": (lambda: (GOOD_X, np.array([1, "a", None, 0], dtype=object), None), "y.npy", r"without unpickling"),
    "pickle_named_npy": (lambda: (None, GOOD_Y, pickle.dumps(GOOD_X)), "x.npy", r"not an \.npy file"),
    "missing_labels": (lambda: (GOOD_X, None, None), "y.npy", r"not found \(npy:DIR reads DIR/x.npy and DIR/y.npy\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPY))
def test_bad_npy_is_exit_2_with_one_line(cli, tmp_path, case):
    make, file, message = BAD_NPY[case]
    x, y, raw = make()
    folder = _bad(tmp_path, x, y, raw)
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(yaml.safe_dump({"device": "cpu", "model": {"source": "python:tests.test_sources:tiny_cnn"},
                                   "data": {"source": f"npy:{folder}"}}))
    result = cli("run", str(cfg), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(folder / file) in lines[0], lines
    import re

    assert re.search(message, lines[0]), lines[0]


def test_npy_labels_beyond_the_models_classes_are_exit_2(cli, tmp_path):
    folder = _bad(tmp_path, GOOD_X, np.array([0, 1, 7, 0]))
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(yaml.safe_dump({"device": "cpu", "model": {"source": "python:tests.test_sources:tiny_cnn"},
                                   "data": {"source": f"npy:{folder}"}}))
    result = cli("run", str(cfg), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "labels go up to 7 but the model has 3 classes" in result.stderr


@pytest.mark.parametrize("make, problem", [(lambda p: None, "npy data directory not found"),
                                           (lambda p: p.write_text("x"), "is a file: npy:DIR names a directory")])
def test_npy_source_must_be_a_directory(tmp_path, make, problem):
    make(tmp_path / "nope")
    with pytest.raises(BadInput) as info:
        load_data(f"npy:{tmp_path / 'nope'}")
    assert info.value.where == str(tmp_path / "nope") and problem in info.value.problem


# --- the report's example images read only the rows they show --------------------------------------

class _CountingReader:
    """A Reader over an in-memory split that records every position it is asked for."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.shape, self.asked = x, y, tuple(x.shape[1:]), []

    def read(self, positions: torch.Tensor) -> torch.Tensor:
        self.asked += positions.tolist()
        return self.x[positions]


def test_example_images_read_only_the_samples_shown():
    from types import SimpleNamespace

    from harness.reports.images import example_records

    x, y = torch.rand(N, *SHAPE), torch.arange(N) % 3
    reader = _CountingReader(x, y)
    data = LazyData(reader, torch.arange(5, N), "test", "test")  # rows are positions 0.., split ids 5..
    adv = {s: (x[s + 5] + 0.01).clamp(0, 1) for s in (2, 9, 30, 31, 40, 50)}
    ev = SimpleNamespace(results=[SimpleNamespace(norm="linf", value=0.1, label="0.1", subject="fgsm-linf",
                                                  distance=torch.full((len(data),), 0.01),
                                                  examples=[(s, a, 0) for s, a in adv.items()])])
    records = example_records(ev, data, limit=4)
    assert len(records) == 4 and len(reader.asked) == 4  # 4 of the 65 samples read, once each
    assert sorted(reader.asked) == sorted(r["sample"] for r in records)
    assert {r["sample"] - 5 for r in records} <= set(adv)
