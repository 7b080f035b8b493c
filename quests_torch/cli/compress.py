"""``quests-torch compress``: select the informative structures of a dataset
(:func:`quests_torch.compression.compress`: msc, msc_conditional, fps, random, k_means)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..io import atomic_write
from .inputs import load, params, structures_and_descriptors, system_idx
from .options import (
    CLIError,
    add_common,
    add_plot,
    add_reference,
    add_seed,
    add_threshold,
    positive_float,
    size_option,
)
from .report import envelope, input_info, parameters, plot_path, write_json, wrote


def register(sub) -> None:
    p = sub.add_parser(
        "compress", help="select the informative structures of a dataset (msc, fps, ...)"
    )
    p.add_argument("input", help="structures (any ASE format) or descriptor file")
    p.add_argument(
        "-m",
        "--method",
        choices=["msc", "msc_conditional", "fps", "random", "k_means"],
        default="msc",
        help="selection method (default msc)",
    )
    p.add_argument(
        "-s",
        "--size",
        type=size_option,
        default=0.1,
        help="structures to keep: a count (200) or a fraction (0.3; default 0.1)",
    )
    add_reference(
        p,
        required=False,
        help="msc_conditional: the dataset you already have (structures or descriptor file)",
    )
    add_seed(p, "random seed of random/k_means (default 0)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="msc/msc_conditional/fps: save the selection state here and resume from it "
        "when rerun (a larger -s extends it)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=positive_float,
        default=60.0,
        help="seconds between checkpoint saves (default 60)",
    )
    add_threshold(p, "covered if dH <= this (overlap)")
    p.add_argument(
        "-o",
        "--output",
        dest="outputs",
        action="append",
        default=None,
        help="selected structures (.extxyz/.xyz, info and arrays kept) or indices and metrics "
        "(.json); repeat for both",
    )
    add_plot(p)
    add_common(p, json_out=False)
    p.set_defaults(func=run)


def _is_json(path: str) -> bool:
    return path.lower().endswith(".json")


def run(args: argparse.Namespace):
    from ..compression import compress

    outputs = args.outputs or []
    for out in outputs:
        if not out.lower().endswith((".json", ".extxyz", ".xyz")):
            raise CLIError(f"-o {out}: write .extxyz/.xyz (structures) or .json (indices, metrics)")
    k, cutoff, stored = params(args, [args.input, args.reference])
    timings: dict = {}
    frames, ds = structures_and_descriptors(
        args.input, args.index, k, cutoff, args, stored, timings, "input"
    )
    if frames is None and any(not _is_json(o) for o in outputs):
        raise CLIError(
            f"{args.input} is a descriptor file: writing structures needs the structures"
        )
    ref = None
    if args.reference is not None:
        ref = load(
            args.reference, args.reference_index, k, cutoff, args, stored, timings, "reference"
        ).x
    elif args.method == "msc_conditional":
        raise CLIError("-m msc_conditional needs -r/--reference (the dataset you already have)")
    n_struct = len(ds.n_atoms)
    if isinstance(args.size, int) and not 1 <= args.size <= n_struct:
        raise CLIError(f"-s {args.size}: {args.input} has {n_struct} structures")
    t0 = time.perf_counter()
    res = compress(
        ds.x,
        system_idx(ds),
        args.size,
        args.method,
        h=args.bandwidth,
        reference=ref,
        generator=args.seed,
        threshold=args.threshold,
        progress=not args.quiet and n_struct > 200,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
    )
    timings["compress"] = round(time.perf_counter() - t0, 4)
    files = _write_structures(outputs, frames, res.indices.tolist())
    if args.plot:
        from ..plots import plot_compression_curve

        title = f"{args.method} compression of {Path(args.input).name}"
        path = plot_path(args.plot, "compression")
        files.append(str(plot_compression_curve(path, res.curve.as_dict(), n_struct, title)))
    result, lines = report(args, k, cutoff, ds, res, timings, files)
    for out in outputs:  # the JSON outputs hold the envelope itself
        if _is_json(out):
            write_json(out, result)
            files.append(out)
    lines += wrote(files)
    return result, lines


def _write_structures(outputs: list[str], frames, indices: list[int]) -> list[str]:
    """The selected structures (energies, forces, info kept) to every non-JSON output."""
    files = []
    for out in outputs:
        if _is_json(out):
            continue
        import ase.io

        chosen = []
        for rank, i in enumerate(indices):
            atoms = frames[i].copy()
            atoms.calc = frames[i].calc  # keep energies/forces read from the input
            atoms.info["quests_source_index"] = i
            atoms.info["quests_selection_rank"] = rank
            chosen.append(atoms)
        atomic_write(Path(out), lambda p, c=chosen: ase.io.write(p, c, format="extxyz"))
        files.append(out)
    return files


def report(args, k: int, cutoff: float, ds, res, timings: dict, files: list):
    """The JSON document and summary lines of ``compress`` (without the ``wrote`` lines)."""
    summary, curve, indices = res.summary(), res.curve.as_dict(), res.indices.tolist()
    names = ("bandwidth", "method", "size", "seed", "threshold", "dtype")
    result = envelope(
        args,
        parameters(args, k, cutoff, *names),
        inputs={"input": input_info(ds)},
        timings=timings,
        results={
            "indices": indices,
            "summary": summary,
            "curve": curve,
            "structure_entropy": res.structure_entropy.tolist(),
        },
        files=files,
        device=str(ds.x.device),
    )
    m = summary["compressed_size"]
    lines = [
        f"{args.method}: selected {m} of {len(ds.n_atoms)} structures "
        f"({summary['compressed_envs']} of {summary['original_envs']} environments) "
        f"in {timings['compress']:.2f} s",
        f"  selection: H = {summary['entropy']:.4f} nats, D = {summary['diversity']:.4f} nats, "
        f"covers {100 * summary['overlap']:.2f} % of the dataset (dH <= {args.threshold:g})",
        f"  {'structures':>10s} {'envs':>8s} {'H':>8s} {'D':>8s} {'covered':>8s}",
    ]
    marks = sorted({max(1, round(m * f)) for f in (0.1, 0.25, 0.5, 0.75, 1.0)})
    for j in marks:
        lines.append(
            f"  {j:10d} {curve['n_environments'][j - 1]:8d} {curve['entropy'][j - 1]:8.4f} "
            f"{curve['diversity'][j - 1]:8.4f} {100 * curve['overlap'][j - 1]:7.2f}%"
        )
    lines.append(f"  first selected: {indices[:10]}{' ...' if m > 10 else ''}")
    return result, lines
