"""``quests-torch bandwidth``: the bandwidth rule ``h(volume per atom)``
(:func:`quests_torch.metrics.bandwidth`)."""

from __future__ import annotations

import argparse

import numpy as np

from ..io import is_descriptor_file
from .inputs import read_structures
from .options import CLIError, add_output, positive_float
from .report import envelope


def register(sub) -> None:
    p = sub.add_parser("bandwidth", help="bandwidth rule h(volume per atom)")
    p.add_argument("input", nargs="?", default=None, help="periodic structures")
    p.add_argument("--volume", type=positive_float, default=None, help="Å^3/atom instead")
    p.add_argument("--method", choices=["gaussian", "cutoff"], default="gaussian")
    p.add_argument("-i", "--index", default=":", help="ASE index/slice of frames (default ':')")
    add_output(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def _volumes(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """Volumes per atom (Å^3/atom) of ``--volume`` or of the periodic input structures."""
    if args.volume is not None:
        return np.array([args.volume]), "given"
    if args.input is None:
        raise CLIError("give a structure file or --volume V (Å^3/atom)")
    if is_descriptor_file(args.input):
        raise CLIError(f"{args.input}: bandwidth needs structures (cell volumes), not descriptors")
    frames = read_structures(args.input, args.index)
    periodic = [a for a in frames if a.pbc.all()]
    if not periodic:
        raise CLIError(
            f"{args.input}: no fully periodic structure in the selection: the volume per atom "
            "is undefined (give --volume V)"
        )
    volumes = np.array([a.get_volume() / len(a) for a in periodic])
    return volumes, f"{len(periodic)} periodic structures of {args.input}"


def run(args: argparse.Namespace):
    from ..metrics import bandwidth

    volumes, source = _volumes(args)
    v = float(volumes.mean())
    res = {
        "volume_per_atom": v,
        "volume_per_atom_min": float(volumes.min()),
        "volume_per_atom_max": float(volumes.max()),
        "bandwidth_gaussian": bandwidth(v, "gaussian"),
        "bandwidth_cutoff": bandwidth(v, "cutoff"),
        "bandwidth": bandwidth(v, args.method),
        "method": args.method,
    }
    result = envelope(args, {"method": args.method}, results=res, source=source)
    lines = [
        f"volume per atom {v:.4f} Å^3/atom ({source})",
        f"  h (gaussian rule) = {res['bandwidth_gaussian']:.5f} 1/Å",
        f"  h (cutoff rule)   = {res['bandwidth_cutoff']:.5f} 1/Å",
        f"  -> -b {res['bandwidth']:.5f}  ({args.method})",
    ]
    return result, lines
