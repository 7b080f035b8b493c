"""The ``quests-torch`` command line: thin wrappers that parse, call the API and write results.

Subcommands so far: ``descriptors`` (structures -> .npz/.pt) and ``demo`` (the built-in
example). Errors are one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .descriptors import DEFAULT_CUTOFF, DEFAULT_K, get_descriptors
from .structures import resolve_device

__all__ = ["main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _dtype(name: str) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[name]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", type=int, default=DEFAULT_K, help="nearest neighbours (default 32)")
    p.add_argument(
        "-c", "--cutoff", type=float, default=DEFAULT_CUTOFF, help="cutoff in Å (default 5)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary output")


def read_structures(path: str, index: str = ":") -> list:
    """Structures from any file ASE can read, with an ASE index/slice (``":"``, ``"0:10"``)."""
    import ase.io

    if not Path(path).exists():
        raise CLIError(f"{path}: no such file")
    try:
        frames = ase.io.read(path, index=index)
    except Exception as exc:  # ASE raises many types for unreadable files
        raise CLIError(f"{path}: cannot read structures ({type(exc).__name__}: {exc})") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise CLIError(f"{path}: the selection {index!r} holds no structures")
    return frames


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_descriptors(args: argparse.Namespace) -> dict:
    frames = read_structures(args.input, args.index)
    t0 = time.perf_counter()
    x = get_descriptors(
        frames,
        k=args.k,
        cutoff=args.cutoff,
        dtype=_dtype(args.dtype),
        device=resolve_device(args.device),
    )
    elapsed = time.perf_counter() - t0
    meta = {"k": args.k, "cutoff": args.cutoff, "dtype": args.dtype, "quests_torch": __version__}
    counts = np.array([len(a) for a in frames], dtype=np.int64)
    out = Path(args.output)
    if out.suffix == ".pt":
        atomic_write(
            out, lambda p: torch.save({"descriptors": x.cpu(), "n_atoms": counts, **meta}, p)
        )
    else:
        arrays = {"descriptors": x.cpu().numpy(), "n_atoms": counts}
        arrays.update({key: np.asarray(v) for key, v in meta.items()})
        atomic_write(out, lambda p: np.savez(p, **arrays))
    return {
        "command": "descriptors",
        "n_structures": len(frames),
        "n_atoms": int(x.shape[0]),
        "width": int(x.shape[1]),
        "seconds": round(elapsed, 3),
        "output": str(out),
        **meta,
    }


def cmd_demo(args: argparse.Namespace) -> dict:
    from .demo import run_demo

    return run_demo(device=resolve_device(args.device), quiet=args.quiet, outdir=args.outdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quests-torch",
        description="QUESTS information entropy and uncertainty of atomistic data (PyTorch).",
    )
    parser.add_argument("--version", action="version", version=f"quests-torch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("descriptors", help="compute descriptors of structures, write .npz or .pt")
    p.add_argument("input", help="any file ASE can read (extxyz, traj, POSCAR, LAMMPS dump, ...)")
    p.add_argument("-i", "--index", default=":", help="ASE index/slice of frames (default ':')")
    p.add_argument("-o", "--output", required=True, help="output .npz or .pt")
    _add_common(p)
    p.set_defaults(func=cmd_descriptors)

    p = sub.add_parser("demo", help="run the built-in example (EMT Cu: cold solid vs hot)")
    p.add_argument("--outdir", default=None, help="also write demo results (JSON) here")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (CLIError, ValueError, TypeError) as exc:
        print(f"quests-torch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quests-torch {args.command}: interrupted", file=sys.stderr)
        return 130
    if not getattr(args, "quiet", False) and args.command != "demo":
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
