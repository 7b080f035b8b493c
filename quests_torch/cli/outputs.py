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


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path of a command, checked before it reads or computes anything."""
    files = [(getattr(args, name, None), flag) for name, flag in _FILE_OPTIONS]
    files += [(out, "-o") for out in getattr(args, "outputs", None) or []]
    if args.command == "screen":
        files.append((screen_table(args), "--table"))
    plot = getattr(args, "plot", None)
    for path, flag in files:
        if path is not None:
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
