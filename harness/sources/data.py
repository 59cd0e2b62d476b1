"""Datasets as the harness sees them: sample sources (harness.sources.samples) of images in [0, 1],
labels and stable sample ids, read a batch of rows at a time.

Sources: ``builtin:digits`` and ``npz:PATH`` (in memory), ``npy:DIR`` (DIR/x.npy memory-mapped and
DIR/y.npy), ``torchvision:NAME:ROOT`` (never downloads; NAME from an allow-list of loaders that unpickle
no unchecked file) and ``imagefolder:PATH`` (both decoded per batch). Everything is checked where it
enters, a chunk at a time for the lazy kinds: shape, range, NaN, labels.
"""

from __future__ import annotations

import inspect
import numbers
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from harness.core.errors import BadInput
from harness.core.registry import Registry
from harness.sources.samples import (NOT_NUMBERS, Data, DatasetReader, LazyData, NpyReader, Reader, TensorData, as_unit_float,
                                     check_labels, check_nonnegative, check_pixels)

__all__ = ["Data", "TensorData", "LazyData", "DATASETS", "TORCHVISION_DATASETS", "load_data", "digits_split", "data_from_tensors", "dataset_listing"]

DATASETS: Registry = Registry("dataset")
DIGITS_SPLIT_SEED = 0  # the digits train/test split never moves, so a cached model never sees its test set
DIGITS_TEST_FRACTION = 0.25


# A loader gives in-memory (x, y) arrays, or a Reader of the split by position (read lazily)
Loaded = Union[tuple[torch.Tensor, torch.Tensor], Reader]


def _tensor(a: np.ndarray | torch.Tensor, refusal: str, where: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        if a.is_complex():
            raise BadInput(where, f"{refusal}, got complex numbers")
        return a
    a = np.asarray(a)
    if a.dtype.kind in NOT_NUMBERS:
        raise BadInput(where, f"{refusal}, got {NOT_NUMBERS[a.dtype.kind]} ({a.dtype})")
    return torch.as_tensor(a)


def _checked(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates and converts arrays into float32 (n, C, H, W) in [0, 1] and int64 labels."""
    x = _tensor(x, "x must be float in [0, 1] or uint8 0-255", where)
    y = _tensor(y, "y must hold integer class labels", where)
    if x.dim() != 4:
        raise BadInput(where, f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    y = check_labels(y, int(x.shape[0]), where)
    floating = x.dtype.is_floating_point
    x = as_unit_float(x, where)
    if floating:  # uint8 is in range by its type
        check_pixels(iter([x]), where)
    check_nonnegative(y, where)
    return x.contiguous(), y.contiguous()


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits, as (n, 1, 8, 8) in [0, 1], split 75/25 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x = (images.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, labels, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()) if split == "train" else (
        torch.from_numpy(x_te),
        torch.from_numpy(y_te).long(),
    )


@DATASETS.register("builtin:digits")
def _builtin_digits(arg: str, split: str, base: Path, image_size) -> tuple[torch.Tensor, torch.Tensor]:
    return digits_split(split)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)


@DATASETS.register("npz")
def _npz(arg: str, split: str, base: Path, image_size) -> tuple[torch.Tensor, torch.Tensor]:
    path = _resolve(arg, base)
    if path.is_dir():
        raise BadInput(str(path), "is a directory, not an npz file")
    if not path.is_file():
        raise BadInput(str(path), "data file not found")
    if not zipfile.is_zipfile(path):  # np.load would take anything else for a .npy or a pickle
        raise BadInput(str(path), "not an npz file (expected a zip archive of arrays x and y, as numpy.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as f:  # never unpickle a data file
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise BadInput(str(path), f"npz is missing array(s) {', '.join(missing)} (found: {', '.join(f.files) or 'none'})")
            x, y = f["x"], f["y"]
    except BadInput:
        raise
    except ValueError as e:
        raise BadInput(str(path), f"cannot read npz without unpickling objects: {e}") from None
    except Exception as e:  # zipfile.BadZipFile, OSError, ...
        raise BadInput(str(path), f"not a readable npz file ({type(e).__name__}: {e})") from None
    return _checked(x, y, str(path))


def _image_transform(image_size):
    from torchvision import transforms

    # an int means a square: Resize(int) would only set the shorter side and keep mixed aspect ratios apart
    size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    positive = all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in size)
    if image_size is not None and not (len(size) == 2 and positive):
        shown = list(image_size) if isinstance(image_size, (list, tuple)) else repr(image_size)
        raise BadInput("data.image_size", f"must be a positive int or [height, width] of positive ints, got {shown}")
    steps = [transforms.Resize(size)] if image_size is not None else []
    return transforms.Compose(steps + [transforms.ToTensor()])


# The torchvision image-classification data sets whose loaders (read in torchvision 0.29's source) unpickle
# no file unchecked: each reads images, idx, .mat, csv or binary arrays; CIFAR's pickled batches load only
# after each file's MD5 matches the one torchvision ships. Anything else is refused: LSUN, for one,
# pickle.loads a cache file beside the data that nothing checks.
TORCHVISION_DATASETS = {
    **dict.fromkeys(("MNIST", "FashionMNIST", "KMNIST", "EMNIST", "QMNIST"), "idx files (a legacy processed/*.pt by weights-only torch.load)"),
    **dict.fromkeys(("CIFAR10", "CIFAR100"), "pickled batches, each loaded only after its MD5 matches torchvision's"),
    **dict.fromkeys(("SVHN", "Flowers102", "StanfordCars"), "scipy .mat files (SVHN and Flowers102 MD5-checked) and images"),
    "STL10": "raw uint8 binaries (np.fromfile)", "USPS": "bz2 text", "SEMEION": "text (np.loadtxt), MD5-checked",
    "FER2013": "csv", "ImageNet": "image folders and meta.bin by weights-only torch.load",
    **dict.fromkeys(("GTSRB", "Food101", "DTD", "EuroSAT", "Country211", "FGVCAircraft", "OxfordIIITPet", "SUN397",
                     "RenderedSST2", "Imagenette", "Caltech101", "Caltech256", "Places365"), "image files and text or csv lists"),
}
# loaders that call torch.load(weights_only=True): safe only where CVE-2025-32434 is fixed
_TORCH_LOADED = {"MNIST", "FashionMNIST", "KMNIST", "EMNIST", "QMNIST", "ImageNet"}
_REFUSED = {"LSUN": "it unpickles an unchecked cache file with pickle.load"}


def _allowed_torchvision(name: str) -> None:
    if name not in TORCHVISION_DATASETS:
        why = f"is refused: {_REFUSED[name]}" if name in _REFUSED else "is unknown or not allowed"
        raise BadInput("data.source", f"torchvision data set {name!r} {why} (allowed, the loaders known not to unpickle "
                       f"unchecked files: {', '.join(sorted(TORCHVISION_DATASETS))}; or use imagefolder:PATH or npz:PATH)")


def torchvision_version() -> str:
    import torchvision

    return str(torchvision.__version__)


@DATASETS.register("npy")
def _npy(arg: str, split: str, base: Path, image_size) -> Reader:
    path = _resolve(arg, base)
    if (path / split).is_dir():  # root/test/x.npy, or root/x.npy
        path = path / split
    if path.is_file():
        raise BadInput(str(path), "is a file: npy:DIR names a directory holding x.npy and y.npy")
    if not path.is_dir():
        raise BadInput(str(path), "npy data directory not found")
    return NpyReader(path)


@DATASETS.register("torchvision")
def _torchvision(arg: str, split: str, base: Path, image_size) -> Reader:
    import torchvision.datasets as tvd

    name, _, root = arg.partition(":")
    if not root:
        raise BadInput("data.source", "torchvision data needs a local root: torchvision:NAME:ROOT (e.g. torchvision:CIFAR10:./data)")
    _allowed_torchvision(name)
    cls = getattr(tvd, name, None)
    if not inspect.isclass(cls):
        raise BadInput("data.source", f"torchvision {torchvision_version()} has no data set {name!r}")
    if name in _TORCH_LOADED:
        from harness.sources.models import require_safe_torch_load

        require_safe_torch_load("data.source", f"convert torchvision {name} to npz:PATH")
    path = _resolve(root, base)
    params = inspect.signature(cls).parameters
    kwargs = {"root": str(path), "transform": _image_transform(image_size)}
    if "download" in params:
        kwargs["download"] = False  # no network at run time, ever
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    try:
        dataset = cls(**kwargs)
    except Exception as e:
        raise BadInput(str(path), f"cannot load torchvision {name} from this root without downloading ({type(e).__name__}: {e})") from None
    return DatasetReader(dataset, str(path))


@DATASETS.register("imagefolder")
def _imagefolder(arg: str, split: str, base: Path, image_size) -> Reader:
    from torchvision.datasets import ImageFolder

    path = _resolve(arg, base)
    if (path / split).is_dir():  # root/test/<class>/img.png, or root/<class>/img.png
        path = path / split
    if not path.is_dir():
        raise BadInput(str(path), "image folder not found")
    transform = _image_transform(image_size)
    try:
        dataset = ImageFolder(str(path), transform=transform)
    except Exception as e:
        raise BadInput(str(path), f"not a usable image folder ({type(e).__name__}: {e})") from None
    return DatasetReader(dataset, str(path))


def _scheme(source: str) -> tuple[str, str]:
    if source in DATASETS:
        return source, ""
    scheme, sep, arg = source.partition(":")
    if not sep or scheme not in DATASETS or scheme.startswith("builtin"):
        raise BadInput("data.source", f"unknown data source {source!r} (valid: {', '.join(dataset_choices())})")
    return scheme, arg


def dataset_choices() -> list[str]:
    args = {"torchvision": "NAME:ROOT", "npy": "DIR"}
    return [n if n.startswith("builtin:") else f"{n}:{args.get(n, 'PATH')}" for n in DATASETS.names()]


def dataset_listing() -> list[str]:
    """`harness list datasets`: the sources, and the torchvision data sets allowed as NAME, by what they read."""
    by_reading: dict[str, list[str]] = {}
    for name, reads in TORCHVISION_DATASETS.items():
        by_reading.setdefault(reads, []).append(name)
    return dataset_choices() + ["torchvision NAME, the loaders known not to unpickle unchecked files:"] + [
        f"  {', '.join(names)}: {reads}" for reads, names in by_reading.items()]


def check_source(source: str) -> None:
    """Raises BadInput for a source naming no known dataset or scheme, or a torchvision data set off
    the allow-list (no file is read)."""
    scheme, arg = _scheme(source)
    if scheme == "torchvision":
        _allowed_torchvision(arg.partition(":")[0])


def subset(n: int, limit: Optional[int], seed: int) -> torch.Tensor:
    """A deterministic subset of `limit` indices out of n, in increasing order (all when limit is None)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:limit].sort().values


def load_data(source: str, split: str = "test", limit: Optional[int] = None, seed: int = 0,
              base: Path = Path("."), image_size=None) -> Data:
    scheme, arg = _scheme(source)
    loaded: Loaded = DATASETS.get(scheme)(arg, split, base, image_size)
    origin = {"source": source, "split": split, "limit": limit, "seed": seed, "base": str(Path(base).resolve()),
              "image_size": None if image_size is None else (list(image_size) if isinstance(image_size, (list, tuple)) else image_size)}
    if not isinstance(loaded, tuple):  # a Reader: validated as it opened, read when a stage needs its samples
        return LazyData(loaded, subset(len(loaded.y), limit, seed), source, split, origin)
    x, y = _checked(*loaded, source)
    idx = subset(len(y), limit, seed)
    return TensorData(x=x[idx].contiguous(), y=y[idx].contiguous(), ids=idx, source=source, split=split, origin=origin)


def data_from_tensors(x: torch.Tensor, y: torch.Tensor, limit: Optional[int] = None, seed: int = 0) -> Data:
    """Data handed in by Python code (harness.run(data=(x, y)))."""
    x, y = _checked(x, y, "data")
    idx = subset(len(y), limit, seed)
    return TensorData(x=x[idx].contiguous(), y=y[idx].contiguous(), ids=idx, source="python:tensors", split="given")
