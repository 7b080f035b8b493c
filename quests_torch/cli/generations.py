"""``quests-torch generations``: active-learning generations: cumulative H, D and novelty of each
generation (:func:`quests_torch.compression.generation_report`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .inputs import load, params, structures_and_descriptors, system_idx
from .options import CLIError, add_common, add_plot, add_threshold
from .report import envelope, parameters, plot_path, wrote
from .rows import progress


def register(sub) -> None:
    p = sub.add_parser(
        "generations",
        help="active-learning generations: cumulative H, D and novelty of each generation",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="one file per generation, in order (or one structure file with --key)",
    )
    p.add_argument("--key", default=None, help="atoms.info key holding the generation")
    add_threshold(p)
    add_plot(p)
    add_common(p)
    p.set_defaults(func=run)


def _from_files(args, k, cutoff, stored, timings):
    """(labels, descriptors, generation of each environment): one file per generation."""
    if len(args.inputs) < 2:
        raise CLIError("give one file per generation (two or more), or one file and --key")
    parts, labels = [], []
    for i, path in enumerate(args.inputs):
        ds = load(path, args.index, k, cutoff, args, stored, timings, f"gen{i}")
        parts.append(ds.x)
        labels.append(Path(path).stem)
    gen = torch.repeat_interleave(
        torch.arange(len(parts)), torch.tensor([p.shape[0] for p in parts])
    )
    return labels, torch.cat(parts), gen.to(parts[0].device)


def _from_key(args, k, cutoff, stored, timings):
    """(labels, descriptors, generation of each environment): ``atoms.info[--key]``."""
    if len(args.inputs) != 1 or args.inputs[0] in stored:
        raise CLIError("--key needs exactly one structure file (generation in atoms.info[KEY])")
    frames, ds = structures_and_descriptors(
        args.inputs[0], args.index, k, cutoff, args, stored, timings, "input"
    )
    missing = [i for i, a in enumerate(frames) if args.key not in a.info]
    if missing:
        raise CLIError(
            f"{args.inputs[0]}: structure {missing[0]} has no info key {args.key!r} "
            f"({len(missing)} of {len(frames)} lack it)"
        )
    values = [a.info[args.key] for a in frames]
    try:
        labels = sorted(set(values))
    except TypeError:
        raise CLIError(f"--key {args.key}: values of mixed types cannot be ordered") from None
    lookup = {v: g for g, v in enumerate(labels)}
    per_struct = torch.tensor([lookup[v] for v in values], device=ds.x.device)
    gen = per_struct[system_idx(ds)]
    return [v.item() if hasattr(v, "item") else v for v in labels], ds.x, gen


def run(args: argparse.Namespace):
    from ..compression import generation_report

    k, cutoff, stored = params(args, list(args.inputs))
    timings: dict = {}
    sets = _from_files if args.key is None else _from_key
    labels, x, gen = sets(args, k, cutoff, stored, timings)
    t0 = time.perf_counter()
    rep = generation_report(
        x,
        gen,
        labels=labels,
        h=args.bandwidth,
        threshold=args.threshold,
        progress=progress(args, float(x.shape[0]) ** 2),
    )
    timings["kernel"] = round(time.perf_counter() - t0, 4)
    rows = rep.rows()
    files = []
    if args.plot:
        from ..plots import plot_generations

        files.append(str(plot_generations(plot_path(args.plot, "generations"), rows)))
    return report(args, k, cutoff, x, rows, timings, files)


def report(args, k: int, cutoff: float, x, rows: list[dict], timings: dict, files: list):
    """The JSON document and summary lines of ``generations``."""
    result = envelope(
        args,
        parameters(args, k, cutoff, "bandwidth", "threshold", "key", "dtype"),
        inputs={"inputs": list(args.inputs)},
        timings=timings,
        results={"generations": rows},
        files=files,
        device=str(x.device),
    )
    lines = [
        f"{len(rows)} generations, {x.shape[0]} environments, h={args.bandwidth:g} "
        f"(novel: dH > {args.threshold:g} against all earlier generations)",
        f"  {'generation':>14s} {'new envs':>9s} {'cum. envs':>9s} {'H cum.':>8s} "
        f"{'D cum.':>8s} {'novel':>7s} {'max dH':>8s}",
    ]
    for r in rows:
        nov = "-" if r["novelty"] is None else f"{100 * r['novelty']:6.2f}%"
        mx = "-" if r["max_dh"] is None else f"{r['max_dh']:8.2f}"
        lines.append(
            f"  {r['generation']!s:>14s} {r['n_environments']:9d} "
            f"{r['cumulative_environments']:9d} {r['entropy']:8.4f} {r['diversity']:8.4f} "
            f"{nov:>7s} {mx:>8s}"
        )
    lines += wrote(files)
    return result, lines
