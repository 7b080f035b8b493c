"""Output paths, checked before a command reads or computes anything."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..store import is_store
from .options import CLIError
from .report import plot_path

#: (attribute, option) of every single-file output a command may have
_FILE_OPTIONS = (
    ("output", "-o"),
    ("json", "--json"),
    ("save", "--save"),
    ("extxyz", "--extxyz"),
    ("checkpoint", "--checkpoint"),
    ("per_environment", "--per-environment"),
    ("write", "--write"),
)


#: (attribute, name in messages) of every input path a command reads: the positional inputs
#: and ``-r``; ``compress --checkpoint`` and ``screen --cache-dir`` are read and written (a
#: resume), so they are outputs that may exist, never inputs an output must avoid
INPUT_OPTIONS = (
    ("input", "INPUT"),
    ("trajectory", "TRAJECTORY"),
    ("inputs", "INPUTS"),
    ("reference", "-r/--reference"),
)


def screen_table(args: argparse.Namespace) -> Path:
    """The per-frame table of ``screen``: ``--table`` or ``TRAJECTORY-STEM.screen.csv``."""
    return Path(args.table or f"{Path(args.trajectory).stem}.screen.csv")


def check_writable(
    path: str | os.PathLike, option: str, folder: bool = False, given: str | None = None
) -> None:
    """Refuse an output that cannot be written, naming the option and the target.

    ``path`` is a file (``folder=False``) or a folder the command writes into; ``given`` is
    what the user typed when it differs (a ``--plot`` prefix). Missing folders are fine (they
    are created when writing, as :func:`quests_torch.io.atomic_write` does); the nearest
    existing one must be a folder this process may write in.
    """
    target = Path(path)
    name = f"{option} {path if given is None else given}"
    if not folder and target.is_dir():
        raise CLIError(f"{name}: is a folder, give a file name")
    existing = target if folder else target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{name}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{name}: cannot write in {existing} (permission denied)")


def command_inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(name, path)`` of every input path of the parsed command (:data:`INPUT_OPTIONS`)."""
    out = []
    for attr, name in INPUT_OPTIONS:
        value = getattr(args, attr, None)
        for path in value if isinstance(value, list) else [value]:
            if path is not None:
                out.append((name, str(path)))
    return out


def command_outputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(option, path)`` of every single-file output of the parsed command (``--plot`` and
    ``--outdir``, which name several files, excepted)."""
    files = [(flag, getattr(args, name, None)) for name, flag in _FILE_OPTIONS]
    files += [("-o", out) for out in getattr(args, "outputs", None) or []]
    if args.command == "screen":
        files.append(("--table", args.table or screen_table(args)))  # as given
    return [(flag, str(path)) for flag, path in files if path is not None]


class _Path:
    """A path as the file system sees it: the real path (symbolic links and ``..`` resolved)
    and, for an existing file, its device and inode (hard links are the same file)."""

    def __init__(self, path: str):
        self.given = path
        self.real = os.path.realpath(path)
        try:
            st = os.stat(self.real)
            self.inode = (st.st_dev, st.st_ino)
        except OSError:
            self.inode = None

    def same(self, other: _Path) -> bool:
        return self.real == other.real or (self.inode is not None and self.inode == other.inode)

    def within(self, folder: _Path) -> bool:
        return Path(self.real).is_relative_to(folder.real) and self.real != folder.real

    def store(self) -> str | None:
        """The descriptor store this path lies inside, if any (``is_store`` on each parent)."""
        for parent in Path(self.real).parents:
            if is_store(parent):
                return str(parent)
        return None


def check_aliases(args: argparse.Namespace) -> None:
    """Refuse an output that is an input, that lies inside a descriptor store, or that another
    output of the command names too (each would lose data: an input replaced, a store that
    later writers refuse, one result written over another)."""
    inputs = [(name, path, _Path(path)) for name, path in command_inputs(args)]
    own_store = args.command == "descriptors" and is_store(args.output)
    # the stores an output could land in, named in the message
    owners = [(f"the input {name}", given, inp) for name, given, inp in inputs]
    if own_store:
        owners.append(("the output -o", args.output, _Path(args.output)))
    seen: list[tuple[str, str, _Path]] = []
    for flag, path in command_outputs(args):
        out = _Path(path)
        for name, given, inp in inputs:
            if out.same(inp):
                raise CLIError(
                    f"{flag} {path}: is the input {name} ({given}); give another file name"
                )
        if own_store and flag == "-o":  # the store this command writes: no input inside it
            for name, given, inp in inputs:
                if inp.within(out):
                    raise CLIError(
                        f"-o {path}: the store would hold the input {name} ({given}); give "
                        "a store folder that does not contain the input"
                    )
        else:
            _check_not_in_store(flag, path, out, owners)
        for other_flag, other, prev in seen:
            if out.same(prev):
                raise CLIError(
                    f"{flag} {path}: is also the output {other_flag} ({other}); give "
                    "each output its own name"
                )
        seen.append((flag, path, out))
    plot = getattr(args, "plot", None)
    if plot is not None:
        folder = _Path(str(Path(plot_path(plot, "figure")).parent))
        _check_not_in_store("--plot", plot, folder, owners, folder_itself=True)
    if getattr(args, "outdir", None) is not None:
        _check_not_in_store("--outdir", args.outdir, _Path(args.outdir), owners, True)


def _check_not_in_store(flag, path, out: _Path, owners, folder_itself: bool = False) -> None:
    """Refuse an output below a descriptor store (``folder_itself``: or that store), naming
    the input or output that the store is when it is one (``owners``)."""
    store = out.store()
    if folder_itself and is_store(out.real):
        store = out.real
    if store is None:
        return
    whose = [f"{what} ({given})" for what, given, p in owners if p.real == store]
    raise CLIError(
        f"{flag} {path}: lies inside the descriptor store {store}"
        + (f", {whose[0]}" if whose else "")
        + "; a store holds only its own files: write it outside the store"
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path of a command, checked before it reads or computes anything: none may
    be an input, lie inside a descriptor store or repeat another output
    (:func:`check_aliases`), and each must be writable (:func:`check_writable`)."""
    check_aliases(args)
    plot = getattr(args, "plot", None)
    for flag, path in command_outputs(args):
        store = args.command == "descriptors" and flag == "-o" and is_store(path)
        check_writable(path, flag, folder=store)  # a descriptor store is a folder
    if plot is not None:
        check_writable(Path(plot_path(plot, "figure")).parent, "--plot", True, given=plot)
    if getattr(args, "outdir", None) is not None:
        check_writable(args.outdir, "--outdir", folder=True)


def write_format(path: str, option: str) -> str:
    """The ASE format of an output file, from its name; unknown names are refused."""
    from ase.io.formats import filetype, ioformats

    try:
        fmt = filetype(path, read=False)
    except (ValueError, OSError) as exc:
        raise CLIError(f"{option} {path}: {exc}") from None
    if fmt not in ioformats or not ioformats[fmt].can_write:
        raise CLIError(f"{option} {path}: ASE cannot write format {fmt!r} (try .extxyz)")
    return fmt
