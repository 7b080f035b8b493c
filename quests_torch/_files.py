"""Low-level file helpers shared by every writer and reader of the package: atomic writes,
directory fsync, content hashes and the cache folder.

They import nothing from the package, so that the generic I/O (:mod:`quests_torch.io`), the
descriptor store, the resume state and the frame readers can all build on them without
importing each other. :mod:`quests_torch.io` re-exports them under their old names.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "default_cache_dir", "file_sha256", "fsync_dir"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: never a half file.

    A new file gets the mode the user's umask gives (``0o666 & ~umask``, ``0o644`` usually);
    an overwritten file keeps its mode.

    Args:
        path: the final path.
        write: called with the temporary path; must create the file there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        write(tmp)
        try:  # an overwritten file keeps its permissions
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _new_temp_file(path: Path) -> Path:
    """An empty, new hidden file next to ``path``, created with mode ``0o666 & ~umask``.

    ``tempfile.mkstemp`` would create it ``0o600``: tables, JSON and figures must get the
    permissions any other program's output gets under the user's umask.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{path.suffix}"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{path}: could not create a temporary file next to it")


def fsync_dir(folder: Path) -> None:
    """``fsync`` a folder, so that the renames and new files in it are durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$QUESTS_TORCH_CACHE`` or ``$XDG_CACHE_HOME/quests-torch`` (``~/.cache/quests-torch``)."""
    env = os.environ.get("QUESTS_TORCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quests-torch"
