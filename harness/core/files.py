"""Atomic file writes, hashing, and locks: a result on disk is either whole or absent, and written by one run."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from harness.core.errors import BadInput

try:
    import fcntl
except ImportError:  # Windows: not a target; runs there go unlocked rather than fail to import
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_path", "write_text_atomic", "sha256_file", "sha256_bytes", "exclusive", "output_lock", "LOCK_FILE"]

LOCK_FILE = ".harness.lock"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; moves it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result gets the mode any new file would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _holder(fd: int) -> str:
    """Who holds a lock, from the text its holder wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started_at']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


@contextlib.contextmanager
def exclusive(lock: Path, what: str, where: str) -> Iterator[None]:
    """Holds `lock` (an flock on that file) for the block, or raises BadInput(where) naming its holder.

    The kernel drops an flock when its process ends, however it ends, so the file a killed run leaves
    behind blocks nobody. The holder writes its pid, host and start time into the file; on release it
    removes the file while still holding it, and whoever opened the old file meanwhile retries on the new one.
    """
    if fcntl is None:
        yield
        return
    lock = Path(lock)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: someone holds it
            holder = _holder(fd)
            os.close(fd)
            raise BadInput(where, f"another run holds {what} ({holder}; lock file {lock.name}): wait for it to finish, or "
                           "choose another output") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started_at": started}).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def output_lock(directory: Path) -> Iterator[None]:
    """One run at a time in an output directory (created for it; removed again if the run left it empty)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BadInput(str(directory), "the output directory is a file")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(directory / LOCK_FILE, "this output directory", str(directory)):
            yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: a bad config leaves no directory behind
