"""``quests-torch generate`` (upstream ``mcmc``): move a structure of a dataset until the max or
mean of its per-atom dH against the dataset reaches ``--target``
(:func:`quests_torch.sampling.generate_to_target` or
:func:`~quests_torch.sampling.random_walk_to_target`).

A target not reached within ``--steps`` evaluations is an error (exit 2, nothing written)
unless ``--best-effort``; it is not distributed (under ``torchrun`` every rank runs it, rank 0
writes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..checks import DEFAULT_CUTOFF, DEFAULT_K
from ..io import atomic_write, is_descriptor_file
from .inputs import dist, from_structures
from .options import (
    SEED_MAX,
    CLIError,
    add_bandwidth,
    add_device,
    add_output,
    add_seed,
    finite_float,
    k_option,
    positive_float,
    positive_int,
)
from .outputs import write_format
from .report import envelope, input_info, parameters

#: descriptor evaluations per structure when ``--steps`` is not given
_DEFAULT_STEPS = {"gradient": 100, "random-walk": 2000}


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="move a structure of a dataset until its dH against the dataset reaches a target",
        description="Start from a structure of the dataset (-i, or one drawn with --seed) and "
        "move its atoms until the max or mean per-atom dH against the whole dataset reaches "
        "--target (upstream mcmc). A target not reached within --steps evaluations is an "
        "error (exit 2) unless --best-effort. Not distributed: under torchrun every rank runs "
        "the same generation and rank 0 alone writes.",
    )
    p.add_argument("input", help="the dataset: any ASE-readable structure file")
    p.add_argument(
        "-i",
        "--start",
        type=int,
        default=None,
        help="index of the start structure in the dataset (default: drawn with --seed)",
    )
    p.add_argument(
        "-n",
        "--count",
        type=positive_int,
        default=1,
        help="structures to generate, each from its own start (drawn) or seed (default 1; "
        "a progress bar on stderr when more than one)",
    )
    p.add_argument("--target", type=finite_float, required=True, help="target dH (nats)")
    p.add_argument("--statistic", choices=["max", "mean"], default="max", help="of per-atom dH")
    p.add_argument(
        "--tolerance",
        type=positive_float,
        default=0.25,
        help="reached when |dH - target| <= this (default 0.25 nats)",
    )
    p.add_argument(
        "-m",
        "--method",
        choices=["gradient", "random-walk"],
        default="gradient",
        help="trust-region gradient steps (default) or random-walk Metropolis",
    )
    _add_moves(p)
    p.add_argument(
        "-w",
        "--write",
        required=True,
        help="generated structures, any format ASE writes (.extxyz keeps dH in atoms.info)",
    )
    p.add_argument(
        "--compare", action="store_true", help="write each start structure before its result"
    )
    p.add_argument(
        "--best-effort",
        action="store_true",
        help="write the best structures and exit 0 even when the target is not reached",
    )
    _add_common(p)
    p.set_defaults(func=run)


def _add_moves(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="descriptor evaluations per structure (default 100 gradient, 2000 random-walk)",
    )
    p.add_argument(
        "--max-step", type=positive_float, default=0.05, help="largest move of an atom, Å"
    )
    p.add_argument(
        "--min-distance",
        type=finite_float,
        default=1.5,
        help="smallest interatomic distance allowed, Å (default 1.5)",
    )
    p.add_argument(
        "--step-std", type=positive_float, default=0.02, help="random-walk: displacement std, Å"
    )
    p.add_argument(
        "--kT", type=positive_float, default=0.1, help="random-walk: Metropolis temperature"
    )
    add_seed(p, "start structures and random-walk seed (default 0)")


def _add_common(p: argparse.ArgumentParser) -> None:
    """The common options of ``generate`` (no ``-i``: it names the start structure)."""
    g = p.add_argument_group("common options")
    g.add_argument("-k", type=k_option, default=None, help=f"default {DEFAULT_K}")
    g.add_argument("-c", "--cutoff", type=positive_float, default=None, help="Å (default 5)")
    add_bandwidth(g)
    add_device(g)
    g.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    add_output(g)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")


def _starts(args: argparse.Namespace, n_frames: int) -> list[int]:
    """Start structure of each of the ``-n`` runs: ``-i`` for all, or drawn with ``--seed``."""
    if args.start is not None:
        start = args.start + n_frames if args.start < 0 else args.start
        if not 0 <= start < n_frames:
            raise CLIError(
                f"-i {args.start}: the dataset has {n_frames} structures "
                f"(give an index from {-n_frames} to {n_frames - 1})"
            )
        return [start] * args.count
    rng = np.random.default_rng(args.seed)
    return [int(i) for i in rng.integers(0, n_frames, size=args.count)]


def _generate_all(args, frames, bank, starts: list[int], steps: int) -> list[tuple]:
    """``(start, seed, GenerationResult)`` of each run, a progress bar for more than one."""
    common = {
        "statistic": args.statistic,
        "tolerance": args.tolerance,
        "max_step": args.max_step,
        "min_distance": args.min_distance,
    }
    runs, bar = [], None
    if not args.quiet and len(starts) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="generate", unit="structure", file=sys.stderr)
    try:
        for j, start in enumerate(starts):
            try:
                r = _generate_one(args, frames[start], bank, steps, args.seed + j, common)
            except ValueError as exc:  # the start structure cannot be generated from
                raise CLIError(
                    f"{args.input} structure {start} (start of run {j}): {exc}"
                ) from None
            runs.append((start, args.seed + j, r))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(dH=f"{r.value:.3f}", reached="yes" if r.reached else "no")
    finally:
        if bar is not None:
            bar.close()
    return runs


def _generate_one(args, atoms, bank, steps: int, seed: int, common: dict):
    """One run of ``--method`` from ``atoms``."""
    from ..sampling import generate_to_target, random_walk_to_target

    if args.method == "gradient":
        return generate_to_target(atoms, bank, args.target, max_evaluations=steps, **common)
    return random_walk_to_target(
        atoms,
        bank,
        args.target,
        max_evaluations=steps,
        step_std=args.step_std,
        kT=args.kT,
        seed=seed,
        **common,
    )


def _check_reached(args, runs: list[tuple], steps: int) -> None:
    """A target missed by any run is an error unless ``--best-effort``."""
    missed = [(j, r) for j, (_s, _seed, r) in enumerate(runs) if not r.reached]
    if missed and not args.best_effort:
        j, r = missed[0]
        raise CLIError(
            f"--target {args.target:g} not reached within {steps} evaluations "
            f"({len(missed)} of {len(runs)} structures; structure {j} from dataset structure "
            f"{runs[j][0]}: best {args.statistic} dH {r.value:.3f}, tolerance "
            f"{args.tolerance:g}); raise --steps or --max-step, or --best-effort to write the "
            "best structures anyway"
        )


def _output_structures(args, frames, runs: list[tuple]) -> list:
    """The structures written to ``--write``: each result (after its start with ``--compare``),
    with the run recorded in ``atoms.info``."""
    out = []
    for j, (start, _seed, r) in enumerate(runs):
        info = {
            "generate_index": j,
            "generate_start": start,
            "generate_target": r.target,
            "generate_statistic": args.statistic,
            "generate_dH": r.value,
            "generate_reached": r.reached,
        }
        if args.compare:
            first = frames[start].copy()
            first.calc = None
            first.info.update({**info, "generate_role": "start", "generate_dH": r.history[0]})
            out.append(first)
            info["generate_role"] = "result"
        a = r.atoms
        a.info.update(info)
        out.append(a)
    return out


def _check_seeds(args: argparse.Namespace) -> None:
    """Run ``j`` of ``-n`` uses seed ``--seed + j``: the last one must still be a seed."""
    last = args.seed + args.count - 1
    if last > SEED_MAX:
        raise CLIError(
            f"--seed {args.seed} with -n/--count {args.count}: the runs use the seeds "
            f"{args.seed}..{last}, above the largest seed {SEED_MAX}; give --seed at most "
            f"{SEED_MAX - args.count + 1}"
        )


#: memory held per generated structure besides its atoms (result, history, atoms.info, the
#: JSON record and its text), measured on 32-atom cells (~4.3 KiB, ~6.7 KiB with --compare)
#: and rounded up
_RUN_BYTES = 6 << 10
#: bytes per atom of each structure kept (ase.Atoms arrays, the positions tensor)
_ATOM_BYTES = 64


def generation_bytes(count: int, n_atoms: int, k: int, compare: bool) -> int:
    """Bytes ``generate -n count`` holds at once: every result (with ``--compare`` its start
    copy too) until they are written, plus one evaluation's descriptor work (forward and
    backward, ``[n_atoms, 2k - 1]`` float64 arrays, a generous 16 of them)."""
    copies = 2 if compare else 1
    per_run = copies * (_RUN_BYTES + _ATOM_BYTES * n_atoms)
    return count * per_run + 16 * 8 * n_atoms * (2 * k - 1)


def _check_memory(args: argparse.Namespace, frames, k: int) -> None:
    """Refuse ``-n`` structures that cannot be held in memory, before generating any."""
    from .._memory import available_memory

    n_atoms = max(len(a) for a in frames)
    need = generation_bytes(args.count, n_atoms, k, args.compare)
    have = available_memory("cpu")
    if need > have:
        each = need / args.count
        raise CLIError(
            f"-n/--count {args.count}: holding {args.count} generated structures of up to "
            f"{n_atoms} atoms until they are written needs about {_gib(need)} "
            f"(~{each / 1024:.3g} KiB each), more than the {_gib(have)} of memory available; "
            f"generate at most {max(1, int(args.count * have / need))} per call"
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:,.3f} GiB" if n < 2**40 else f"{n / 2**40:,.1f} TiB"


def run(args: argparse.Namespace):
    from ..uncertainty import UncertaintyBank

    _check_seeds(args)
    fmt = write_format(args.write, "--write")
    if is_descriptor_file(args.input):
        raise CLIError(f"{args.input}: generate needs structures to start from, not descriptors")
    k, cutoff = args.k or DEFAULT_K, args.cutoff or DEFAULT_CUTOFF
    timings: dict = {}
    frames, ds = from_structures(args.input, ":", k, cutoff, args, timings, "input")
    _check_memory(args, frames, k)
    starts = _starts(args, len(frames))
    bank = UncertaintyBank(ds.x, k=k, cutoff=cutoff, h=args.bandwidth)
    steps = args.steps or _DEFAULT_STEPS[args.method]
    t0 = time.perf_counter()
    runs = _generate_all(args, frames, bank, starts, steps)
    timings["generate"] = round(time.perf_counter() - t0, 4)
    _check_reached(args, runs, steps)
    out = _output_structures(args, frames, runs)
    if dist().rank() == 0:
        import ase.io

        atomic_write(Path(args.write), lambda p: ase.io.write(p, out, format=fmt))
    return report(args, k, cutoff, steps, frames, ds, runs, timings)


def _structure_record(args, j: int, start: int, seed: int, r) -> dict:
    return {
        "index": j,
        "start": start,
        "seed": seed if args.method == "random-walk" else None,
        "reached": r.reached,
        "dH_start": r.history[0],
        "dH": r.value,
        "history": r.history,
        "n_evaluations": r.n_evaluations,
        "n_backward": r.n_backward,
        "n_accepted": r.n_accepted,
        "n_rejected_geometry": r.n_rejected_geometry,
        "max_displacement": max(r.max_displacements, default=0.0),
        "min_distance": min(r.min_distances),
        "seconds": round(r.wall_time, 4),
    }


def report(args, k, cutoff, steps, frames, ds, runs, timings):
    """The JSON document and summary lines of ``generate``."""
    structures = [_structure_record(args, j, *run) for j, run in enumerate(runs)]
    results = {
        "n_structures": len(runs),
        "n_reached": sum(r.reached for *_, r in runs),
        "n_evaluations": sum(r.n_evaluations for *_, r in runs),
        "structures": structures,
    }
    names = ("bandwidth", "dtype", "method", "target", "statistic", "tolerance")
    moves = ("max_step", "min_distance", "seed", "best_effort")
    result = envelope(
        args,
        {
            **parameters(args, k, cutoff, *names),
            "steps": steps,
            **{n: getattr(args, n) for n in moves},
        },
        inputs={"input": input_info(ds)},
        timings=timings,
        results=results,
        files=[args.write],
        device=str(ds.x.device),
    )
    lines = [
        f"generate ({args.method}): {len(runs)} structure(s) from {args.input} "
        f"({len(frames)} structures, {ds.x.shape[0]} environments), target {args.statistic} "
        f"dH = {args.target:g} +- {args.tolerance:g} nats, h={args.bandwidth:g}",
    ]
    for s_ in structures:
        lines.append(
            f"  {s_['index']}: from structure {s_['start']}: dH {s_['dH_start']:.3f} -> "
            f"{s_['dH']:.3f} in {s_['n_evaluations']} evaluations"
            + ("" if s_["reached"] else " (target NOT reached: best effort)")
        )
    lines.append(f"  wrote {args.write}" + (" (start and result of each)" if args.compare else ""))
    return result, lines
