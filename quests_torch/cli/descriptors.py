"""``quests-torch descriptors``: compute descriptors of structures, write ``.npz`` or ``.pt``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..checks import DEFAULT_CUTOFF, DEFAULT_K
from ..io import is_descriptor_file, save_descriptors
from .inputs import dist, load
from .options import CLIError, add_common
from .report import envelope, input_info


def register(sub) -> None:
    p = sub.add_parser("descriptors", help="compute descriptors of structures, write .npz or .pt")
    p.add_argument("input", help="any file ASE can read")
    p.add_argument("-o", "--output", required=True, help="output descriptor file (.npz or .pt)")
    p.add_argument("--json", default=None, help="also write the run's results as JSON here")
    add_common(p, bandwidth=False, json_out=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace):
    if is_descriptor_file(args.input):
        raise CLIError(f"{args.input}: already a descriptor file; give a structure file")
    out = Path(args.output)
    if not is_descriptor_file(out):
        raise CLIError(f"-o {out}: descriptor output must end in .npz or .pt")
    k, cutoff = args.k or DEFAULT_K, args.cutoff or DEFAULT_CUTOFF
    timings: dict = {}
    ds = load(args.input, args.index, k, cutoff, args, {}, timings, "input")
    t0 = time.perf_counter()
    if dist().rank() == 0:  # under torchrun every rank holds the rows; one writes them
        save_descriptors(out, ds.x, ds.n_atoms, k=k, cutoff=cutoff, dtype=args.dtype)
    timings["write"] = round(time.perf_counter() - t0, 4)
    return report(args, ds, out, k, cutoff, timings)


def report(args, ds, out: Path, k: int, cutoff: float, timings: dict):
    result = envelope(
        args,
        {"k": k, "cutoff": cutoff, "dtype": args.dtype, "index": args.index},
        inputs={"input": input_info(ds)},
        timings=timings,
        results={"output": str(out), "width": int(ds.x.shape[1])},
        device=str(ds.x.device),
    )
    lines = [
        f"{args.input}: {len(ds.n_atoms)} structures, {ds.x.shape[0]} environments "
        f"-> {out} [{ds.x.shape[0]} x {ds.x.shape[1]}, k={k}, cutoff={cutoff:g} Å, {args.dtype}]",
        f"descriptors {timings['input_descriptors']:.2f} s on {ds.x.device}",
    ]
    return result, lines
