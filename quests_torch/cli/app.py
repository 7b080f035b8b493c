"""The parser of ``quests-torch`` and its entry point: parse, join ``torchrun``'s process group,
check the outputs, run the command, write its JSON, print its summary, map errors to exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from .. import __version__
from . import (
    bandwidth,
    compress,
    demo,
    descriptors,
    dh,
    entropy,
    generate,
    generations,
    learning_curve,
    overlap,
    screen,
)
from .inputs import dist
from .options import CLIError, Parser
from .outputs import check_outputs
from .report import write_json

#: the command modules, in the order ``--help`` lists them; each has ``register(subparsers)``
#: (adds its parser, with ``func=run``) and ``run(args) -> (result, lines)``
COMMANDS = (
    descriptors,
    entropy,
    dh,
    overlap,
    learning_curve,
    bandwidth,
    screen,
    compress,
    generations,
    generate,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``quests-torch`` argument parser, one subparser per command."""
    parser = Parser(
        prog="quests-torch",
        description="QUESTS information entropy and uncertainty of atomistic data (PyTorch).",
        epilog="Inputs: any file ASE can read (extxyz, traj, POSCAR, LAMMPS dump, ...) or a "
        "descriptor file (.npz/.pt) written by `quests-torch descriptors`.",
    )
    parser.add_argument("--version", action="version", version=f"quests-torch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``quests-torch`` / ``python -m quests_torch``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"quests-torch {args.command}"
    # under torchrun (WORLD_SIZE > 1): join the process group; rank 0 alone prints and writes
    started, lead = False, True
    if int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:
        try:
            started = dist().init_from_env()
        except (RuntimeError, ValueError) as exc:
            print(f"{prog}: error: cannot join the torch.distributed group: {exc}", file=sys.stderr)
            return 2
        lead = dist().rank() == 0
    if not lead:
        args.quiet = True
        for name in ("save", "plot", "outputs"):
            if getattr(args, name, None) is not None:
                setattr(args, name, None)
    try:
        return _run(args, prog, lead)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace, prog: str, lead: bool) -> int:
    """Run the parsed command; errors are one line on stderr (exit 2; 1 for internal errors,
    which ``QUESTS_TORCH_DEBUG=1`` re-raises), an interrupt exits 130."""
    try:
        check_outputs(args)
        result, lines = args.func(args)
        out = getattr(args, "output", None) if args.command != "descriptors" else args.json
        if out and lead:
            write_json(out, result)
            lines.append(f"  results: {out}")
    except CLIError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as exc:
        if os.environ.get("QUESTS_TORCH_DEBUG"):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: still one line unless debugging
        if os.environ.get("QUESTS_TORCH_DEBUG"):
            raise
        print(
            f"{prog}: internal error: {type(exc).__name__}: {exc} "
            "(rerun with QUESTS_TORCH_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    if not args.quiet:
        for line in lines:
            print(line)
    return 0
