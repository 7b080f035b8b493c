"""``quests-torch screen``: stream a trajectory against a reference: per-atom dH, novel atoms,
solid-like clusters (:func:`quests_torch.distributed.screen_trajectory`, resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checks import DEFAULT_CLUSTER_CUTOFF
from ..io import is_descriptor_file
from .inputs import device, load, params
from .options import (
    CLIError,
    add_common,
    add_plot,
    add_readers,
    add_reference,
    add_threshold,
    dtype,
    positive_float,
    positive_int,
    readers_of,
)
from .outputs import screen_table
from .report import envelope, input_info, parameters, plot_path, wrote


def register(sub) -> None:
    p = sub.add_parser(
        "screen", help="stream a trajectory: per-atom dH, novel atoms, solid-like clusters"
    )
    p.add_argument("trajectory", help="any ASE-readable trajectory (streamed, never loaded whole)")
    add_reference(p)
    p.add_argument(
        "--table",
        default=None,
        help="per-frame table, .csv or .jsonl (default TRAJECTORY-STEM.screen.csv)",
    )
    p.add_argument("--extxyz", default=None, help="also write frames with per-atom dH (OVITO)")
    add_threshold(p)
    p.add_argument(
        "--cluster-cutoff",
        type=positive_float,
        default=DEFAULT_CLUSTER_CUTOFF,
        help="cluster edge length, Å",
    )
    p.add_argument(
        "--batch-atoms", type=positive_int, default=None, help="atoms per batch (default auto)"
    )
    p.add_argument("--cache-dir", default=None, help="reference descriptor cache folder")
    p.add_argument("--no-cache", action="store_true", help="do not cache reference descriptors")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh over outputs of another screening (a changed trajectory, "
        "reference or parameter, or an edited table)",
    )
    add_plot(p)
    add_readers(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace):
    from ..distributed import screen_trajectory

    if is_descriptor_file(args.trajectory):
        raise CLIError(
            f"{args.trajectory}: screen needs structures (a trajectory), not descriptors"
        )
    if not Path(args.trajectory).exists():
        raise CLIError(f"{args.trajectory}: no such file")
    k, cutoff, stored = params(args, [args.reference])
    timings: dict = {}
    ref = load(
        args.reference, args.reference_index, k, cutoff, args, stored, timings, "reference", True
    )
    try:
        out = screen_trajectory(
            args.trajectory,
            ref.x,
            screen_table(args),
            index=args.index,
            extxyz=args.extxyz,
            h=args.bandwidth,
            threshold=args.threshold,
            k=k,
            cutoff=cutoff,
            cluster_cutoff=args.cluster_cutoff,
            dtype=dtype(args.dtype),
            device=device(args),
            batch_atoms=args.batch_atoms,
            overwrite=args.overwrite,
            progress=not args.quiet,
            readers=readers_of(args),
            types=args.types,
        )
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    timings.update({f"screen_{key}": v for key, v in out.timings.as_dict().items()})
    timings["screen_total"] = round(out.seconds, 4)
    files = [str(out.table)] + ([str(out.extxyz)] if out.extxyz else [])
    if args.plot:
        from ..plots import plot_screening_timeline

        files.append(str(plot_screening_timeline(plot_path(args.plot, "timeline"), out.frames)))
    return report(args, k, cutoff, ref, out, timings, files)


def _rates(out) -> dict:
    """Frames and atoms screened per second in this run (empty when nothing was screened)."""
    if not (out.frames_screened and out.seconds > 0):
        return {}
    n_atoms = int(out.frames["n_atoms"][out.frames_resumed :].sum())
    return {
        "frames_per_s": out.frames_screened / out.seconds,
        "atoms_per_s": n_atoms / out.seconds,
    }


def report(args, k: int, cutoff: float, ref, out, timings: dict, files: list):
    """The JSON document and summary lines of ``screen``."""
    s, rates = out.summary, _rates(out)
    cached = ref.meta.get("cache_hit")
    result = envelope(
        args,
        {
            **parameters(args, k, cutoff, "bandwidth", "threshold", "cluster_cutoff", "dtype"),
            "index": args.index,
            "batch_atoms": out.batch_atoms,
        },
        inputs={
            "trajectory": args.trajectory,
            "reference": {**input_info(ref), "cache_hit": cached},
        },
        timings=timings,
        results={
            **s,
            "frames_screened_now": out.frames_screened,
            "frames_resumed": out.frames_resumed,
            **rates,
        },
        files=files,
        device=str(ref.x.device),
    )
    lines = [
        f"screened {args.trajectory} against {args.reference} ({ref.x.shape[0]} reference "
        f"environments{', cached' if cached else ''}), h={args.bandwidth:g}",
    ]
    if out.frames_resumed:
        lines.append(
            f"  resumed: {out.frames_resumed} frames were already done, {out.frames_screened} "
            "screened now"
        )
    if s.get("n_frames"):
        lines += _summary_lines(args, s)
    if rates:
        t = out.timings
        lines.append(
            f"  {rates['frames_per_s']:.2f} frames/s, {rates['atoms_per_s']:.0f} atoms/s "
            f"(io {t.io:.2f} s, descriptors {t.descriptors:.2f} s, "
            f"kernel {t.kernel:.2f} s, clusters {t.clusters:.2f} s)"
        )
    lines += wrote(files)
    return result, lines


def _summary_lines(args, s: dict) -> list[str]:
    return [
        f"  {s['n_frames']} frames, {s['n_atoms']} atoms; dH max {s['dH_max']:.3f} (frame "
        f"{s['dH_max_frame']}), mean {s['dH_mean']:.3f} nats",
        f"  novel atoms (dH > {args.threshold:g}): {100 * s['novel_fraction']:.2f} %; frames "
        f"with novel atoms: {s['frames_with_novel_atoms']}",
        f"  largest covered cluster: {s['largest_cluster_min']}..{s['largest_cluster_max']} "
        "atoms; first frame below half the atoms: "
        f"{s['first_frame_largest_cluster_below_half']}",
    ]
