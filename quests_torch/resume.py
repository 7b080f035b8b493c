"""The resume state of a screening table: what identifies a screening, who may write it, and
what was committed.

A resumable screening (:func:`quests_torch.screening.screen_trajectory` and its sharded front
end :func:`quests_torch.distributed.screen_trajectory`) keeps next to its table ``T``

* ``T.state.json`` (:func:`state_path`): the screening's identity (:func:`screening_identity`:
  the trajectory's size and SHA-256, the reference descriptors' SHA-256 and every parameter)
  and what is committed: frames, and per output file its length in bytes and the SHA-256 of
  those bytes;
* ``T.lock`` (:func:`table_lock`): an exclusive ``flock`` held for the whole run, so two
  screenings never append to the same table; the file stays beside the table (the lock is
  the ``flock``: a dead run's lock frees itself, and there is nothing stale to delete).

A rerun resumes only when the identity matches and the committed bytes are still the ones
written (:func:`verify_committed`); anything else is refused with a message naming what
changed, or started afresh with ``overwrite=True`` (``--overwrite``). This module holds those
rules once for both screening front ends, and :class:`ResumeState` applies them: open,
validate (or rewind to the last commit), append and commit batch by batch, complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ._files import atomic_write, file_sha256
from ._version import __version__

__all__ = [
    "STATE_VERSION",
    "HeldLock",
    "ResumeState",
    "TableInUseError",
    "lock_path",
    "new_state",
    "read_state",
    "reference_hash",
    "resume_state",
    "screening_identity",
    "state_path",
    "table_lock",
    "trajectory_key",
    "verify_committed",
    "write_state",
]

#: version of the state file layout (2: content keys and committed SHA-256)
STATE_VERSION = 2
_CHUNK = 1 << 22
_OVERWRITE = "overwrite=True (--overwrite)"


class TableInUseError(OSError):
    """Another process holds the lock of the table (it is screening into it)."""


def state_path(table: Path) -> Path:
    """``<table>.state.json``: the resume state of ``table``."""
    return table.with_name(table.name + ".state.json")


def lock_path(table: Path) -> Path:
    """``<table>.lock``: locked by the run writing ``table``."""
    return table.with_name(table.name + ".lock")


class HeldLock:
    """The exclusive ``flock`` held by :func:`table_lock` on its (permanent) lock file.

    Attributes:
        path: the lock file.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def check(self) -> None:
        """Check that the lock file at :attr:`path` is still the one this process locked.

        A lock file removed (or replaced) while its holder runs lets a second process lock a
        new file at the same path: a writer calls this before each commit and stops instead
        of writing beside another.

        Raises:
            TableInUseError: the file at :attr:`path` is no longer the locked one.
        """
        if self._fd < 0:  # no flock on this platform
            return
        try:
            same = os.path.samestat(os.fstat(self._fd), os.stat(path := self.path))
        except FileNotFoundError:
            same = False
        if not same:
            raise TableInUseError(
                f"{path}: this lock file was removed or replaced while this process held it, "
                "so another process may be writing the same output; stopping (what was "
                "committed is kept; rerun to resume). Never delete a lock file: a dead "
                "process's lock frees itself"
            )


@contextmanager
def table_lock(table: Path) -> Iterator[HeldLock]:
    """Hold an exclusive, non-blocking ``flock`` on ``<table>.lock`` for the ``with`` block.

    The lock is the ``flock``, not the file: the lock of a process that died (even by
    ``SIGKILL``) frees itself, and a lock file found after a crash is no reason to act. The
    file stays beside an output that exists, so there is nothing stale to delete; a run that
    leaves no ``table`` removes it on release (while still holding it: a process that locked
    the removed file sees that it is no longer the one at the path and locks the new one).
    Deleting a lock file while its run holds it would let a second run lock a new file at the
    same path: the holder sees it with :meth:`HeldLock.check`. A symbolic link at the lock's
    path is refused (``O_NOFOLLOW``).

    Yields:
        the :class:`HeldLock`.

    Raises:
        TableInUseError: another process holds the lock.
    """
    path = lock_path(table)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): no protection
        yield HeldLock(path, -1)
        return
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    made_folder = not path.parent.exists()
    fd = -1
    for _ in range(100):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # the folder was removed meanwhile
            continue
        except OSError as exc:  # ELOOP: a symbolic link
            raise OSError(f"{path}: cannot open the lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TableInUseError(
                f"{table}: in use by another screening (its lock {path} is held); wait for "
                "it to finish or use another output name"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise OSError(f"{path}: cannot lock the table: {exc}") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed or replaced as we opened it: lock the new one
        fd = -1
    if fd < 0:  # pragma: no cover - the path kept changing under us
        raise TableInUseError(f"{table}: in use by another screening ({path} keeps changing)")
    try:
        yield HeldLock(path, fd)
    finally:
        if not os.path.lexists(table):  # no output: leave nothing (unlinked while held)
            path.unlink(missing_ok=True)
        os.close(fd)
        if made_folder:
            try:
                path.parent.rmdir()  # only when empty: a run that wrote nothing leaves nothing
            except OSError:
                pass


def trajectory_key(path: str | os.PathLike) -> str:
    """``"<size>:<sha256>"`` of a trajectory file's bytes (streamed): its identity in the
    resume state, so a different file under the same name is never taken for the old one."""
    size = os.stat(path).st_size
    return f"{size}:{file_sha256(path)}"


def reference_hash(reference: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of the reference descriptors: dtype, shape and value bytes."""
    ref_np = torch.as_tensor(reference).detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(f"{ref_np.dtype.str}{ref_np.shape}".encode())
    digest.update(ref_np.tobytes())
    return digest.hexdigest()


def screening_identity(
    *,
    trajectory_key: str,
    reference_key: str,
    index: str,
    h: float,
    threshold: float,
    k: int,
    cutoff: float,
    cluster_cutoff: float,
    dtype: torch.dtype,
    jsonl: bool,
    xyz_path: Path | None,
    frame_offset: int = 0,
) -> tuple[dict, str]:
    """The parameters that identify a screening and their hash (the state's ``key``).

    The trajectory is identified by its content (:func:`trajectory_key`), not its path, and
    the reference by its descriptors (:func:`reference_hash`).
    """
    params = {
        "trajectory": trajectory_key,
        "index": index,
        "reference": reference_key,
        "h": float(h),
        "threshold": float(threshold),
        "k": int(k),
        "cutoff": float(cutoff),
        "cluster_cutoff": float(cluster_cutoff),
        "dtype": str(dtype).removeprefix("torch."),
        "table_format": "jsonl" if jsonl else "csv",
        "extxyz": str(xyz_path.resolve()) if xyz_path else None,
        "frame_offset": int(frame_offset),
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    return params, key


def _short(value) -> str:
    if isinstance(value, str) and len(value) > 40:
        return value[:24] + "…"
    return repr(value)


def describe_change(old: dict, new: dict) -> str:
    """What differs between two :func:`screening_identity` parameter sets, in words."""
    changes = []
    for name in [*new, *(n for n in old if n not in new)]:
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if name == "trajectory":
            changes.append(
                f"the trajectory's content changed (size:sha256 {_short(a)} -> {_short(b)})"
            )
        elif name == "reference":
            changes.append(f"the reference descriptors changed (sha256 {_short(a)} -> {_short(b)})")
        else:
            changes.append(f"parameter `{name}` changed ({_short(a)} -> {_short(b)})")
    return "; ".join(changes) or "its key does not match"


def new_state(key: str, params: dict, batch_atoms: int, header: str, **extra) -> dict:
    """The state of freshly created outputs: the header committed, no frame done."""
    return {
        "version": STATE_VERSION,
        "quests_torch": __version__,
        "key": key,
        "params": params,
        "batch_atoms": int(batch_atoms),
        "frames_done": 0,
        "complete": False,
        "bytes": {"table": len(header.encode()), "extxyz": 0},
        "sha256": {
            "table": hashlib.sha256(header.encode()).hexdigest(),
            "extxyz": hashlib.sha256().hexdigest(),
        },
        **extra,
    }


def write_state(path: Path, state: dict) -> None:
    """Replace the state file atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(state, indent=1)))


def _not_a_state(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"{path}: not a valid screening resume state ({problem}); delete it or use {_OVERWRITE}"
    )


def read_state(path: Path) -> dict | None:
    """The state in ``path`` (``None`` when there is none), checked to be an object with a
    ``key`` and ``params``.

    Raises:
        ValueError: unreadable, not JSON, or not a JSON object of that shape (names ``path``).
    """
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _not_a_state(path, f"unreadable JSON: {exc}") from None
    if not isinstance(state, dict):
        raise _not_a_state(path, f"a JSON {type(state).__name__}, not an object")
    if not isinstance(state.get("key"), str) or not isinstance(state.get("params"), dict):
        raise _not_a_state(path, "no `key` string and `params` object")
    return state


def _check_committed_fields(path: Path, state: dict) -> None:
    def count(v, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    if not count(state.get("frames_done"), 0):
        raise _not_a_state(path, f"`frames_done` {state.get('frames_done')!r}")
    if not count(state.get("batch_atoms"), 1):
        raise _not_a_state(path, f"`batch_atoms` {state.get('batch_atoms')!r}")
    for name, ok in (("bytes", lambda v: count(v, 0)), ("sha256", lambda v: isinstance(v, str))):
        field = state.get(name)
        if not (isinstance(field, dict) and all(ok(field.get(f)) for f in ("table", "extxyz"))):
            raise _not_a_state(path, f"`{name}` must give `table` and `extxyz`, got {field!r}")


def resume_state(table: Path, key: str, params: dict, *, overwrite: bool, header: str):
    """The state to resume ``table`` from, or ``None`` for a fresh start.

    Raises:
        ValueError: the outputs belong to another screening (the message names what changed:
            trajectory, reference or parameter), the state is not valid, or ``table`` exists
            without a state; never with ``overwrite``.
    """
    if overwrite:
        return None
    state_file = state_path(table)
    state = read_state(state_file)
    if state is not None:
        if state["key"] != key:
            raise ValueError(
                f"{table}: holds results of a different screening "
                f"({describe_change(state['params'], params)}, per {state_file.name}); rerun "
                f"with the original inputs, use another output name or {_OVERWRITE}"
            )
        _check_committed_fields(state_file, state)
        return state
    if table.exists():
        with open(table, "rb") as fh:
            head = fh.read(len(header.encode()) + 1)
        if head not in (b"", header.encode()):
            raise ValueError(
                f"{table}: exists and was not written by a resumable screening (no "
                f"{state_file.name}); use another output name or {_OVERWRITE}"
            )
    return None


def verify_committed(path: Path, state: dict, name: str, *, exact: bool = False):
    """Check that ``path`` starts with the bytes committed for output ``name`` (``"table"``
    or ``"extxyz"``) in ``state``; with ``exact``, that it holds nothing else.

    Returns:
        a ``hashlib`` SHA-256 object fed with the committed bytes (to continue appending).

    Raises:
        ValueError: the file is missing, shorter, or its committed bytes changed since (an
            edited table, e.g. CRLF line endings): it is never truncated then.
    """
    n_bytes, expected = state["bytes"][name], state["sha256"][name]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(
            f"{path}: missing, but its resume state records {n_bytes} committed bytes; "
            f"use {_OVERWRITE}"
        ) from None
    if size < n_bytes:
        raise ValueError(
            f"{path}: {size} bytes, shorter than the {n_bytes} committed bytes: the file was "
            f"modified since it was written; use {_OVERWRITE}"
        )
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        left = n_bytes
        while left and (block := fh.read(min(_CHUNK, left))):
            digest.update(block)
            left -= len(block)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"{path}: its committed rows changed since they were written (SHA-256 of the "
            f"first {n_bytes} bytes differs from the resume state; edited, or line endings "
            f"converted?); refusing to truncate it; use {_OVERWRITE}"
        )
    if exact and size != n_bytes:
        raise ValueError(
            f"{path}: {size - n_bytes} bytes after the {n_bytes} committed ones of a complete "
            f"screening: the file was modified since it was written; use {_OVERWRITE}"
        )
    return digest


class ResumeState:
    """The resume state of one screening's outputs: opened once, validated, then advanced one
    committed batch at a time and finally marked complete.

    ``record`` is the state as written to ``<table>.state.json`` (``None`` before
    :meth:`begin` on a fresh start). Both screening front ends use it:
    :func:`quests_torch.screening.screen_file` appends batches (:meth:`append` then
    :meth:`commit`), :func:`quests_torch.distributed.screen_trajectory` records its merged
    outputs (:meth:`complete` with their sizes and digests).

    Args:
        table: the per-frame table.
        extxyz: the per-atom extxyz output, or ``None``.
        key, params: the screening's identity (:func:`screening_identity`).
        header: the table's header (``""`` for JSON lines).
    """

    def __init__(
        self, table: Path, extxyz: Path | None, *, key: str, params: dict, header: str
    ) -> None:
        self.table, self.extxyz = table, extxyz
        self.file = state_path(table)
        self.key, self.params, self.header = key, params, header
        self.record: dict | None = None
        self.lock: HeldLock | None = None  # the table's lock, checked at each commit
        self._digests: dict = {}
        self._handles: dict = {}

    @classmethod
    def open(
        cls,
        table: Path,
        extxyz: Path | None,
        *,
        key: str,
        params: dict,
        header: str,
        overwrite: bool,
    ) -> ResumeState:
        """The state found next to ``table`` (:func:`resume_state`: refused when it belongs to
        another screening or is not valid); ``record`` is ``None`` when there is none or with
        ``overwrite``."""
        state = cls(table, extxyz, key=key, params=params, header=header)
        state.record = resume_state(table, key, params, overwrite=overwrite, header=header)
        return state

    @property
    def outputs(self) -> list[tuple[str, Path]]:
        """``(name, path)`` of each output: the table, and the extxyz when there is one."""
        out = [("table", self.table)]
        return out if self.extxyz is None else [*out, ("extxyz", self.extxyz)]

    @property
    def frames_done(self) -> int:
        """Frames committed (0 without a record)."""
        return 0 if self.record is None else self.record["frames_done"]

    @property
    def is_complete(self) -> bool:
        return self.record is not None and self.record.get("complete") is True

    @property
    def batch_atoms(self) -> int | None:
        """Atoms per batch of the recorded screening (``None`` without a record)."""
        return None if self.record is None else self.record["batch_atoms"]

    def validate(self, *, exact: bool = False, missing_ok: bool = False) -> None:
        """Check that every output still starts with its committed bytes (and, with ``exact``,
        holds nothing else; with ``missing_ok``, skip outputs not yet written); changes
        nothing (:func:`verify_committed`)."""
        for name, path in self.outputs:
            if not (missing_ok and not path.exists()):
                self._digests[name] = verify_committed(path, self.record, name, exact=exact)

    def rewind(self) -> int:
        """Validate the outputs and cut whatever was written after the last commit (a run
        killed between an append and its commit); returns the frames committed. An output
        whose committed bytes changed is refused, never truncated."""
        self.validate()
        for name, path in self.outputs:
            with open(path, "r+b") as fh:
                fh.truncate(self.record["bytes"][name])
                os.fsync(fh.fileno())
        return self.frames_done

    def begin(self, batch_atoms: int, **extra) -> None:
        """A fresh record: the header committed, no frame done (written by :meth:`save`, or
        with the outputs by the first :meth:`append`)."""
        self.record = new_state(self.key, self.params, batch_atoms, self.header, **extra)
        self._digests = {}

    def save(self) -> None:
        """Write the record atomically."""
        write_state(self.file, self.record)

    def append(self, rows: bytes, extxyz: bytes | None = None) -> None:
        """Append one batch's table rows (and extxyz frames) to the outputs, flushed and
        ``fsync``-ed; not committed until :meth:`commit`. The first call of a fresh start
        creates the outputs (the header, an empty extxyz) and writes the record."""
        if not self._handles:
            if not self._digests:
                self._create_outputs()
            for name, path in self.outputs:
                self._handles[name] = open(path, "ab")  # closed by close()
        for name, data in (("table", rows), ("extxyz", extxyz)):
            if name in self._handles and data is not None:
                fh = self._handles[name]
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
                self._digests[name].update(data)

    def commit(self, frames: int) -> None:
        """Record the ``frames`` appended since the last commit as done, with the outputs'
        sizes and SHA-256, in one atomic write of the state (first checking that the run
        still holds the table's lock, when :attr:`lock` is set)."""
        if self.lock is not None:
            self.lock.check()
        xyz = self._handles.get("extxyz")
        self.record["frames_done"] += frames
        self.record["bytes"] = {
            "table": self._handles["table"].tell(),
            "extxyz": xyz.tell() if xyz is not None else 0,
        }
        sha = dict(self.record["sha256"])  # an output never written keeps its empty digest
        sha.update((name, d.hexdigest()) for name, d in self._digests.items())
        self.record["sha256"] = sha
        self.save()

    def complete(
        self,
        *,
        frames_done: int | None = None,
        n_bytes: dict | None = None,
        sha256: dict | None = None,
    ) -> None:
        """Mark the screening complete and write the state; ``frames_done``, ``n_bytes`` and
        ``sha256`` record outputs written whole (the merged parts of a distributed run)."""
        if frames_done is not None:
            self.record.update(frames_done=frames_done, bytes=n_bytes, sha256=sha256)
        self.record["complete"] = True
        self.save()

    def close(self) -> None:
        """Close the outputs opened by :meth:`append`."""
        for fh in self._handles.values():
            fh.close()
        self._handles = {}

    def __enter__(self) -> ResumeState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create_outputs(self) -> None:
        atomic_write(self.table, lambda p: p.write_text(self.header))
        if self.extxyz is not None:
            atomic_write(self.extxyz, lambda p: p.write_bytes(b""))
        self.save()
        self._digests = {"table": hashlib.sha256(self.header.encode()), "extxyz": hashlib.sha256()}
