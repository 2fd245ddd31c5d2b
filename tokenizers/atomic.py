"""Atomic file writes: everything vistok writes goes to a temporary name beside its target and
is renamed into place, so a killed process leaves the old file or the new one, never part of one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from vistok.tokenizers.errors import VistokError

# The temporary name of a write in progress: "." + the target's name + "." + mkstemp's 8 random
# characters + ".tmp" (e.g. ".best-0000080.ckpt.k2j_x9qa.tmp"); a killed process leaves it behind.
_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def current_umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``.

    ``fsync`` flushes the data to disk before the rename, so the file also survives a power loss
    (worth it for checkpoints and shards, too slow for thousands of PNGs). On failure the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """The temporary files of :func:`atomic_path`'s naming in ``folder`` (not its subfolders).

    Only a killed process leaves one behind; a caller that knows no write into ``folder`` is in
    progress (a run starting) removes them. An absent folder has none.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TEMP_NAME.match(p.name) and p.is_file() and not p.is_symlink())


def check_writable(path: str | os.PathLike, label: str, *, folder: bool = True, create: bool = False) -> Path:
    """Check that the output ``path`` (a folder, or a file when not ``folder``) can be written.

    Commands call this before any work, so an output that cannot be written (a path under a
    regular file, a read-only place) is one sentence naming ``label`` (e.g. "--out") and the fix,
    not a traceback after minutes of work. ``create`` makes the folder (or the file's folder) now;
    otherwise nothing is left behind. The nearest existing folder is tested by creating and
    removing a probe file: ``os.access`` says yes to root even where the file system refuses.
    Returns ``path``.
    """
    path = Path(path).expanduser()
    directory = path if folder else path.parent
    existing = next(p for p in (directory, *directory.parents) if p.exists() or p.is_symlink() or p == p.parent)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise VistokError(f"{label} {path} {where}; choose a path that is not inside a file.")
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
            existing = directory
        fd, probe = tempfile.mkstemp(prefix=".vistok-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise VistokError(f"{label} {path} cannot be written ({reason} in {existing}); choose a location you can write to.") from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], fsync: bool = False) -> Path:
    """Write a file through ``write(binary_handle)``, atomically."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``path``, atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), fsync=fsync)


def json_safe(value: Any) -> Any:
    """``value`` with everything JSON cannot hold made plain: NaN/inf -> None, keys -> str,
    tuples -> lists, tensors and numpy arrays or scalars -> Python numbers and lists."""
    if hasattr(value, "tolist"):  # torch.Tensor, np.ndarray, np.float32 (duck-typed: no torch import here)
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON readers reject NaN and Infinity
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def atomic_write_json(path: str | os.PathLike, data: Any, fsync: bool = False) -> Path:
    """Write ``data`` as indented JSON (with a final newline), atomically; see :func:`json_safe`."""
    return atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", fsync=fsync)
