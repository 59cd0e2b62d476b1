"""Sample sources: a data set read a batch of rows at a time, so no run needs the whole set in memory.

A run holds labels and sample ids (small) and reads images when a stage needs them: `read(rows)` takes
positions 0 .. len - 1 of this run (after `limit` subsetting), not split ids. Two kinds:

- `TensorData`: in-memory tensors (builtin digits, npz, `(x, y)` from Python, a Dataset handed in).
- `LazyData`: a reader of the full split by position (`npy:DIR` memory-mapped, image folders and
  torchvision data sets decoded per batch) and the split positions this run uses.

Every kind hashes the same way, streamed in batches: the digest of a set equals the one of its
in-memory copy, so a scorecard names what it measured whatever the source kind.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import numpy as np
import torch

from harness.core.errors import BadInput

__all__ = ["Data", "TensorData", "LazyData", "Reader", "NpyReader", "DatasetReader", "STREAM_BYTES", "as_unit_float",
           "check_labels", "check_pixels", "check_nonnegative", "NOT_NUMBERS"]

STREAM_BYTES = 4 * 2**20  # float32 bytes per streamed batch (hash, digests, validation): memory stays flat in N

# numpy kinds that are not pixel values or class labels (torch holds none of them but complex)
NOT_NUMBERS = {"U": "strings", "S": "bytes", "O": "Python objects", "M": "dates", "m": "time spans", "V": "raw records",
               "c": "complex numbers"}


class Data:
    """A sample source: `len`, `ids` (split ids, int64), `y` (labels, int64, in memory), `shape` (C, H, W),
    `read(rows)` (float32 in [0, 1]), `sha256()`, `source` and `split`."""

    y: torch.Tensor
    ids: torch.Tensor
    source: str
    split: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape, (C, H, W)."""
        raise NotImplementedError

    def read(self, rows: Any) -> torch.Tensor:
        """The samples at these rows of the run (0 .. len - 1, not split ids), float32 in [0, 1]; indexing
        follows torch's (a 1-D tensor or list gives a batch, an int one sample)."""
        raise NotImplementedError

    def batch_rows(self) -> int:
        """Rows per streamed batch: about STREAM_BYTES of float32, at least one."""
        return max(1, STREAM_BYTES // (4 * max(1, math.prod(self.shape))))

    def batches(self, rows: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(rows, samples) over the whole run in order, a batch at a time."""
        for idx in torch.arange(len(self)).split(rows or self.batch_rows()):
            yield idx, self.read(idx)

    def sha256(self) -> str:
        """Hash of the data as loaded (after subsetting), so a result names exactly what it measured: the
        shape and bytes of x (float32), then of y and ids (int64). Streamed: the bytes in the order an
        in-memory (n, C, H, W) tensor holds them."""
        h = hashlib.sha256()
        h.update(str((len(self), *self.shape)).encode())
        for _, x in self.batches():
            h.update(x.contiguous().numpy())  # the buffer itself: no second copy of the batch
        for t in (self.y.contiguous(), self.ids.contiguous()):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


@dataclass(frozen=True, eq=False)
class TensorData(Data):
    """The in-memory kind: `x` is this kind's storage (n, C, H, W) float32 in [0, 1]; code that takes any
    Data reads through read(rows) and shape."""

    x: torch.Tensor
    y: torch.Tensor  # (n,) int64
    ids: torch.Tensor  # (n,) int64, the sample's index in its full split
    source: str
    split: str
    origin: Optional[dict] = field(default=None, compare=False)  # the loader's arguments (harness.engines.recipes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def read(self, rows: Any) -> torch.Tensor:
        return self.x[rows]


class Reader(Protocol):
    """Reads samples of a full split by position; `y` holds the split's labels."""

    y: torch.Tensor
    shape: tuple[int, ...]

    def read(self, positions: torch.Tensor) -> torch.Tensor: ...


class LazyData(Data):
    """A split read on demand through a Reader, restricted to the split positions `ids` (sorted)."""

    def __init__(self, reader: Reader, ids: torch.Tensor, source: str, split: str, origin: Optional[dict] = None) -> None:
        self.origin = origin  # the loader's arguments, for a worker that reads the same files (harness.engines.recipes)
        self.reader = reader
        self.ids = ids
        self.y = reader.y[ids].contiguous()
        self.source = source
        self.split = split

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.reader.shape)

    def read(self, rows: Any) -> torch.Tensor:
        positions = self.ids[rows]
        if positions.dim() == 0:  # an int row: one sample, as tensor indexing gives
            return self.reader.read(positions.reshape(1))[0]
        return self.reader.read(positions)


def as_unit_float(x: torch.Tensor, where: str) -> torch.Tensor:
    """Pixels as float32 in [0, 1]: uint8 0-255 scaled, floats cast (checked by check_pixels)."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)  # in place on the new float copy: the values of x.float() / 255.0
    if x.dtype.is_floating_point:
        return x.float()
    raise BadInput(where, f"x must be float in [0, 1] or uint8 0-255, got {str(x.dtype).removeprefix('torch.')}")


def check_labels(y: torch.Tensor, n: int, where: str) -> torch.Tensor:
    """Labels of n samples as int64: 1-D, one per sample, integer valued (non-negativity: check_nonnegative)."""
    if y.dim() != 1 or y.shape[0] != n:
        raise BadInput(where, f"y must have shape ({n},) to match x, got {tuple(y.shape)}")
    if n == 0:
        raise BadInput(where, "the dataset is empty (0 samples)")
    if y.dtype.is_floating_point:
        bad = (y != y.round()).nonzero()  # NaN too: it equals nothing
        if bad.numel():
            i = int(bad[0])
            raise BadInput(where, f"y must hold integer class labels, found {float(y[i]):g} at sample {i}")
    elif y.dtype == torch.bool:
        raise BadInput(where, "y must hold integer class labels, got booleans")
    return y.long()


def check_nonnegative(y: torch.Tensor, where: str) -> None:
    if int(y.min()) < 0:
        raise BadInput(where, f"labels must be non-negative, found {int(y.min())}")


def check_pixels(chunks: Iterator[torch.Tensor], where: str) -> None:
    """Float pixels (already float32, in order, a chunk at a time) are finite and in [0, 1]: the
    same verdict and message whether the set comes as one chunk or streamed."""
    bad_rows, first, lo, hi, start = 0, -1, math.inf, -math.inf, 0
    for x in chunks:
        if x.numel():
            finite = torch.isfinite(x).flatten(1).all(dim=1)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten()
                first = first if first >= 0 else start + int(bad[0])
                bad_rows += bad.numel()
            elif not bad_rows:  # past a NaN the range no longer matters: the NaN is the error
                lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        start += x.shape[0]
    if bad_rows:
        raise BadInput(where, f"x contains NaN or infinite values in {bad_rows} sample(s), the first at index {first}")
    if lo < 0.0 or hi > 1.0:
        raise BadInput(where, f"float x must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}] (store uint8 0-255 or scale it)")


class NpyReader:
    """x.npy memory-mapped (read-only, never unpickled), y.npy in memory. Each read maps the file anew
    and drops the mapping after copying its rows out: pages a long-lived map had touched would count
    as the process's resident memory, up to the whole file by the end of a run."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "x.npy"
        for p in (self.path, folder / "y.npy"):
            if not p.is_file():
                raise BadInput(str(p), "not found (npy:DIR reads DIR/x.npy and DIR/y.npy)")
        x = _open_npy(self.path, mmap=True)
        where = str(self.path)
        if x.dtype.kind in NOT_NUMBERS:
            raise BadInput(where, f"x must be float in [0, 1] or uint8 0-255, got {NOT_NUMBERS[x.dtype.kind]} ({x.dtype})")
        if not (x.dtype == np.uint8 or x.dtype.kind == "f"):
            raise BadInput(where, f"x must be float in [0, 1] or uint8 0-255, got {x.dtype}")
        if x.ndim != 4:
            raise BadInput(where, f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
        self.dtype, self.offset, self.order = x.dtype, int(x.offset), "F" if np.isfortran(x) else "C"
        self.n, self.shape = int(x.shape[0]), tuple(int(d) for d in x.shape[1:])
        del x
        y = _open_npy(folder / "y.npy", mmap=False)
        if y.dtype.kind in NOT_NUMBERS:
            raise BadInput(str(folder / "y.npy"), f"y must hold integer class labels, got {NOT_NUMBERS[y.dtype.kind]} ({y.dtype})")
        y = check_labels(torch.from_numpy(_native(y)), self.n, str(folder / "y.npy"))
        if self.dtype.kind == "f":  # uint8 is in range by its type; floats are checked a chunk at a time
            rows = max(1, STREAM_BYTES // (4 * math.prod(self.shape)))
            check_pixels((self.read(torch.arange(a, min(a + rows, self.n))) for a in range(0, self.n, rows)), where)
        check_nonnegative(y, str(folder / "y.npy"))
        self.y = y.contiguous()

    def _map(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.n, *self.shape), order=self.order)

    def read(self, positions: torch.Tensor) -> torch.Tensor:
        mm = self._map()
        idx = positions.numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"positions out of range for {self.n} samples")
        # a run of consecutive positions is a slice (no index array); either way a copy, then unmapped
        part = mm[int(idx[0]):int(idx[-1]) + 1] if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)) else mm[idx]
        # one copy out of the map, floats straight to float32 (the cast torch's .float() makes)
        rows = np.array(part, dtype=np.uint8 if self.dtype == np.uint8 else np.float32, order="C")
        del part, mm
        return as_unit_float(torch.from_numpy(rows), str(self.path))


def _native(a: np.ndarray) -> np.ndarray:
    return a.astype(a.dtype.newbyteorder("=")) if a.dtype.byteorder not in "=|" else a


def _open_npy(path: Path, mmap: bool) -> np.ndarray:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":  # np.load would take a zip archive or a pickle for a .npy
        raise BadInput(str(path), "not an .npy file (expected an array as numpy.save writes it)")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)  # never unpickle a data file
    except ValueError as e:
        raise BadInput(str(path), f"cannot read .npy without unpickling objects: {e}") from None
    except Exception as e:
        raise BadInput(str(path), f"not a readable .npy file ({type(e).__name__}: {e})") from None


class DatasetReader:
    """A torch Dataset of (image tensor, label) read by index, each batch decoded when it is read (image
    folders, torchvision data sets). Opening it decodes every sample once, a sample at a time, so an
    unreadable file or mixed sizes fail before the run starts; only the labels stay."""

    def __init__(self, dataset: Any, where: str) -> None:
        self.dataset, self.where = dataset, where
        self.files = getattr(dataset, "samples", None)  # (path, class) pairs of an image folder
        labels: list[int] = []
        shapes: set[tuple[int, ...]] = set()
        for i in range(len(dataset)):
            img, label = self._item(i)
            shapes.add(tuple(img.shape))
            labels.append(int(label))
        if not labels:
            raise BadInput(where, "the dataset is empty (0 samples)")
        if len(shapes) > 1:
            raise BadInput(where, f"images differ in size ({len(shapes)} shapes); set data.image_size to resize them")
        shape = shapes.pop()
        if len(shape) != 3:
            raise BadInput(where, f"x must have shape (N, C, H, W), got {(len(labels), *shape)}")
        self.shape = shape
        self.y = torch.tensor(labels, dtype=torch.long)
        check_nonnegative(self.y, where)

    def _item(self, i: int) -> tuple[torch.Tensor, Any]:
        try:
            img, label = self.dataset[i]
        except Exception as e:
            name = self.files[i][0] if self.files else f"{self.where} (sample {i})"
            raise BadInput(str(name), f"cannot read image ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        return img, label

    def read(self, positions: torch.Tensor) -> torch.Tensor:
        xs = [self._item(int(i))[0] for i in positions]
        if any(tuple(t.shape) != self.shape for t in xs):  # a file replaced since it was opened
            raise BadInput(self.where, f"images differ in size (expected {self.shape}); set data.image_size to resize them")
        if not xs:
            return torch.empty((0, *self.shape))
        return torch.stack(xs).float()
