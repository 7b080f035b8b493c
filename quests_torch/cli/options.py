"""Options shared by the commands: argparse value types, the parser class and option groups.

The value types wrap the library's validators (:mod:`quests_torch.checks`) so that the command
line accepts exactly what the library accepts; they only turn the text into a number and the
library's refusal into an argparse error.
"""

from __future__ import annotations

import argparse
import math

import torch

from ..checks import (
    DEFAULT_BANDWIDTH,
    DEFAULT_CUTOFF,
    DEFAULT_K,
    MAX_K,
    check_k,
    check_positive_float,
    check_positive_int,
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


#: the largest ``--seed``: torch's generators take at most a signed 64-bit seed
SEED_MAX = 2**63 - 1


def positive_int(text: str) -> int:
    """An integer >= 1 (:func:`quests_torch.checks.check_positive_int`)."""
    try:
        return check_positive_int(int(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer (1 or more), got {text!r}"
        ) from None


def seed_option(text: str) -> int:
    """``--seed``: an integer in ``0..SEED_MAX`` (numpy refuses negative seeds, torch's
    generators more than 64 bits)."""
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 0 to {SEED_MAX} (2**63 - 1), got {text!r}"
        )
    return v


def positive_float(text: str) -> float:
    """A finite number > 0 (:func:`quests_torch.checks.check_positive_float`)."""
    try:
        return check_positive_float(float(text), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def k_option(text: str) -> int:
    """``-k``: the library's rule (:func:`quests_torch.checks.check_k`), ``1..MAX_K``."""
    v = positive_int(text)
    try:
        return check_k(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"k must be at most {MAX_K}, got {v}") from None


def rows_option(text: str) -> int | str:
    """``--rows``: a positive integer, ``auto`` (by the cost rule) or ``all`` (exact)."""
    if text in ("auto", "all"):
        return text
    try:
        return check_positive_int(int(text), "rows")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, 'auto' or 'all', got {text!r}"
        ) from None


def size_option(text: str) -> int | float:
    """``-s``: an integer count of structures (``200``) or a fraction (``0.3``, ``1.0``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {text}")
    return value


def dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` choice."""
    return {"float64": torch.float64, "float32": torch.float32}[name]


def add_common(p: argparse.ArgumentParser, bandwidth: bool = True, json_out: bool = True) -> None:
    """``-i -k -c -b --device --dtype -o -q``: the options of the descriptor-based commands."""
    g = p.add_argument_group("common options")
    g.add_argument("-i", "--index", default=":", help="ASE index/slice of frames (default ':')")
    g.add_argument(
        "-k",
        type=k_option,
        default=None,
        help=f"nearest neighbours, 1..{MAX_K} (default {DEFAULT_K})",
    )
    g.add_argument(
        "-c",
        "--cutoff",
        type=positive_float,
        default=None,
        help=f"descriptor cutoff in Å (default {DEFAULT_CUTOFF:g})",
    )
    if bandwidth:
        add_bandwidth(g)
    add_device(g)
    g.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64", help="compute dtype"
    )
    if json_out:
        add_output(g)
    add_types(g)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no summary")


def add_bandwidth(g) -> None:
    g.add_argument(
        "-b",
        "--bandwidth",
        type=positive_float,
        default=DEFAULT_BANDWIDTH,
        help=f"kernel bandwidth h in 1/Å (default {DEFAULT_BANDWIDTH})",
    )


def add_device(g) -> None:
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")


def add_output(g) -> None:
    g.add_argument("-o", "--output", default=None, help="write results as JSON here")


def add_reference(p: argparse.ArgumentParser, required: bool = True, help: str | None = None):
    """``-r/--reference`` and ``--reference-index``."""
    p.add_argument(
        "-r",
        "--reference",
        required=required,
        default=None,
        help=help or "reference structures (ASE-readable) or descriptor file (.npz/.pt)",
    )
    p.add_argument(
        "--reference-index", default=":", help="ASE index/slice of reference frames (default ':')"
    )


def add_threshold(p: argparse.ArgumentParser, help: str = "novel if dH > this") -> None:
    p.add_argument("--threshold", type=finite_float, default=0.0, help=help)


def add_seed(p: argparse.ArgumentParser, help: str = "random seed (default 0)") -> None:
    p.add_argument("--seed", type=seed_option, default=0, help=help)


def add_rows(p: argparse.ArgumentParser) -> None:
    """``--rows N|auto|all`` and ``--seed`` (sampled-row estimates)."""
    p.add_argument(
        "--rows",
        type=rows_option,
        default="auto",
        help="estimate from N uniformly sampled rows (exact log p against all) with an error "
        "bar; 'all': exact; 'auto' (default): exact unless that would take over an hour at the "
        "documented pair rate, then 20,000 rows",
    )
    add_seed(p, "seed of the sampled rows (default 0)")


def readers_option(text: str) -> int:
    """``--readers``: an integer >= 0 (0 or 1: frames parsed in the computing process)."""
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def types_option(text: str) -> dict[int, int]:
    """``--types``: LAMMPS types to elements, ``1=Cu,2=Zr`` or ``Cu,Zr``
    (:func:`quests_torch.readers.lammps.parse_types`)."""
    from ..readers.lammps import parse_types

    try:
        return parse_types(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("`types`", "expected")) from None


def add_types(g) -> None:
    """``--types MAP``: the elements of the LAMMPS types of a dump without an ``element``
    column (every dump the command reads)."""
    g.add_argument(
        "--types",
        type=types_option,
        default=None,
        metavar="MAP",
        help="elements of the LAMMPS types of a dump without an element column: "
        "1=Cu,2=Zr, or Cu,Zr for types 1, 2 (LAMMPS dump inputs only)",
    )


def add_readers(p: argparse.ArgumentParser) -> None:
    """``--readers N``: processes parsing an (ext)xyz trajectory
    (:func:`quests_torch.io.iter_structures`); default the free cores minus the compute
    threads, at least 1."""
    p.add_argument(
        "--readers",
        type=readers_option,
        default=None,
        help="processes parsing an .xyz/.extxyz trajectory or a LAMMPS dump (0 or 1: in this "
        "process; "
        "default: the free cores minus the torch threads, at least 1)",
    )


def readers_of(args: argparse.Namespace) -> int:
    """The ``--readers`` of a command, its default resolved
    (:func:`quests_torch.readers.pool.default_readers`)."""
    from ..readers.pool import default_readers

    return default_readers() if args.readers is None else args.readers


def add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plot", metavar="PREFIX", default=None, help="write PNG figures PREFIX*.png")
