"""Atomic file writes: a reader (or a resumed run) never sees a half-written file; the lock that keeps a second
command out of a folder that a command is writing; and reading back a YAML file a user may have edited."""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from geovq.errors import GeovqError

#: the lock file of a run or search directory (`directory_lock`)
LOCK_NAME = ".geovq.lock"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are 0600, which a rename would carry onto published reports and shared run
    # directories. Created exclusively with 0666, the file gets the user's umask, as open() would give it.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def one_line(error: BaseException) -> str:
    """A parser's message (YAML's and JSON's span several lines) as one line, for a one-line GeovqError."""
    return " ".join(str(error).split())


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """The YAML file at `path`, loaded safely; a YAML error (a tag, truncated or invalid YAML) or a file that is
    not text is one GeovqError naming the file as not `what`, never a traceback."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise GeovqError(f"{path} is not {what}: {one_line(e)}") from None


def check_writable(folder: Path, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be made or written: the nearest existing folder on
    its path must be writable (a read-only filesystem answers EROFS here, a folder of another user EACCES)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GeovqError(f"{option} {folder}: {existing} is a file, not a folder; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GeovqError(f"{option} {folder} cannot be written: {existing} is on a read-only filesystem or not "
                         "writable by this user; give a writable folder")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    # np.savez appends ".npz" to names without it, so write through a file object.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


@contextmanager
def directory_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive OS lock (flock) on `folder` for the block: a second geovq command on the same folder gets
    a one-line GeovqError naming the holder's PID. The kernel drops the lock with the holder's process, so a killed
    command leaves no stale lock (the file stays, unlocked). The folder must exist."""
    import fcntl

    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise GeovqError(f"{folder} is in use by another geovq command (PID {holder}); wait for it to end, or "
                             "choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
