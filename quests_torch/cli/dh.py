"""``quests-torch dh``: per-environment dH of test data against a reference.

``--approx N`` (upstream ``approx_dH``) is dH from the ``N`` nearest references
(:func:`quests_torch.metrics.approx_delta_entropy`, an upper bound of the exact dH), timed
beside the exact dH (``seconds_approx``, ``seconds_exact``; ``--no-exact`` skips the exact
one); it is not sharded under ``torchrun`` (every rank computes it, rank 0 writes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write
from ..metrics import fraction_above
from .inputs import Pair, load_pair
from .options import CLIError, add_common, add_plot, add_reference, add_threshold, positive_int
from .report import envelope, input_info, parameters, plot_path, wrote
from .rows import progress


def register(sub) -> None:
    p = sub.add_parser("dh", help="per-environment dH of test data against a reference")
    p.add_argument("input", help="test structures or descriptor file")
    add_reference(p)
    add_threshold(p)
    p.add_argument("--top", type=positive_int, default=10, help="report the N largest dH")
    p.add_argument("--save", default=None, help="write every dH to .npy or text")
    p.add_argument(
        "--approx",
        type=positive_int,
        default=None,
        metavar="N",
        help="dH from the N nearest references only (exact top-N, an upper bound of dH; "
        "upstream approx_dH); the exact dH is also computed, to record both times and the "
        "difference in the -o JSON (seconds_approx, seconds_exact); not sharded under "
        "torchrun (every rank computes it, rank 0 writes)",
    )
    p.add_argument(
        "--no-exact",
        action="store_true",
        help="with --approx: skip the exact dH (for inputs too large to time it)",
    )
    add_plot(p)
    add_common(p)
    p.set_defaults(func=run)


def exact_dh(args: argparse.Namespace, pair: Pair) -> torch.Tensor:
    """dH of every test environment against the reference (sharded under torchrun)."""
    from ..distributed import delta_entropy

    t0 = time.perf_counter()
    pairs = pair.test.x.shape[0] * pair.ref.x.shape[0]
    dh = delta_entropy(pair.test.x, pair.ref.x, args.bandwidth, progress=progress(args, pairs))
    pair.timings["kernel"] = round(time.perf_counter() - t0, 4)
    return dh


def dh_params(args: argparse.Namespace, k: int, cutoff: float) -> dict:
    """Parameters recorded in the JSON of the test-vs-reference commands (dh, overlap)."""
    return parameters(args, k, cutoff, "bandwidth", "threshold", "dtype")


def _approx_dh(args: argparse.Namespace, pair: Pair):
    """``dh --approx N``: dH from the N nearest references, timed beside the exact dH.

    Returns the approximate dH and a dict comparing it with the exact one (``None`` with
    ``--no-exact``).
    """
    from ..metrics import approx_delta_entropy

    n_ref = int(pair.ref.x.shape[0])
    if args.approx > n_ref:
        raise CLIError(f"--approx {args.approx}: the reference has only {n_ref} environments")
    t0 = time.perf_counter()
    pairs = pair.test.x.shape[0] * n_ref
    dh = approx_delta_entropy(
        pair.test.x, pair.ref.x, args.bandwidth, n=args.approx, progress=progress(args, pairs)
    )
    pair.timings["seconds_approx"] = round(time.perf_counter() - t0, 4)
    if args.no_exact:
        return dh, None
    exact = exact_dh(args, pair)
    pair.timings["seconds_exact"] = pair.timings.pop("kernel")
    diff = (dh - exact).detach().cpu().double().numpy()
    compare = {
        "dH_approx_minus_exact_max": float(diff.max()),
        "dH_approx_minus_exact_mean": float(diff.mean()),
        "novelty_exact": float(fraction_above(exact.detach().cpu().double(), args.threshold)),
    }
    return dh, compare


def dh_stats(dh: np.ndarray, threshold: float) -> dict:
    """Summary statistics of ``[n]`` dH values; novel: ``dH > threshold``."""
    q = np.quantile(dh, [0.05, 0.5, 0.95])
    return {
        "n": int(dh.size),
        "dH_min": float(dh.min()),
        "dH_max": float(dh.max()),
        "dH_mean": float(dh.mean()),
        "dH_median": float(q[1]),
        "dH_p05": float(q[0]),
        "dH_p95": float(q[2]),
        "novelty": float(fraction_above(torch.from_numpy(dh), threshold)),
        "overlap": float(np.mean(dh <= threshold)),
        "n_novel": int(np.sum(dh > threshold)),
    }


def _top(dh_np: np.ndarray, n_atoms, top: int) -> list[dict]:
    """The ``top`` largest dH, with their structure and atom."""
    order = np.argsort(-dh_np, kind="stable")[:top]
    bounds = np.concatenate([[0], np.cumsum(n_atoms)])
    struct = np.searchsorted(bounds, order, side="right") - 1
    return [
        {
            "environment": int(i),
            "structure": int(s),
            "atom": int(i - bounds[s]),
            "dH": float(dh_np[i]),
        }
        for i, s in zip(order, struct, strict=True)
    ]


def _write_dh(args: argparse.Namespace, dh_np: np.ndarray) -> list[str]:
    """``--save`` (.npy or text) and ``--plot``: the files written."""
    files = []
    if args.save:
        save = Path(args.save)
        if save.suffix == ".npy":

            def write_npy(p: Path) -> None:
                with open(p, "wb") as fh:
                    np.save(fh, dh_np)

            atomic_write(save, write_npy)
        else:
            atomic_write(save, lambda p: np.savetxt(p, dh_np, fmt="%.17g", header="dH"))
        files.append(str(save))
    if args.plot:
        from ..plots import plot_dh_histogram

        path = plot_path(args.plot, "dh-histogram")
        files.append(str(plot_dh_histogram(path, dh_np, args.threshold)))
    return files


def run(args: argparse.Namespace):
    if args.no_exact and args.approx is None:
        raise CLIError("--no-exact only applies with --approx N")
    pair = load_pair(args)
    compare = None
    if args.approx is None:
        dh = exact_dh(args, pair)
    else:
        dh, compare = _approx_dh(args, pair)
    dh_np = dh.detach().cpu().double().numpy()
    stats = dh_stats(dh_np, args.threshold)
    if args.approx is not None:
        stats["approx"] = args.approx
        if compare is not None:
            stats.update(compare)
    stats["top"] = _top(dh_np, pair.test.n_atoms, args.top)
    files = _write_dh(args, dh_np)
    return report(args, pair, stats, compare, files, str(dh.device))


def report(args, pair: Pair, stats: dict, compare, files, device: str):
    """The JSON document and summary lines of ``dh``."""
    params = dh_params(args, pair.k, pair.cutoff)
    if args.approx is not None:
        params.update(approx=args.approx, exact_timed=not args.no_exact)
    result = envelope(
        args,
        params,
        inputs={"test": input_info(pair.test), "reference": input_info(pair.ref)},
        timings=pair.timings,
        results=stats,
        files=files,
        device=device,
    )
    what = "dH" if args.approx is None else f"approximate dH ({args.approx} nearest references)"
    lines = [
        f"{what} of {args.input} ({stats['n']} environments) against {args.reference} "
        f"({pair.ref.x.shape[0]} environments), h={args.bandwidth:g}",
        f"  dH min {stats['dH_min']:.3f}  median {stats['dH_median']:.3f}  mean "
        f"{stats['dH_mean']:.3f}  p95 {stats['dH_p95']:.3f}  max {stats['dH_max']:.3f} nats",
        f"  novel (dH > {args.threshold:g}): {stats['n_novel']} = {100 * stats['novelty']:.2f} %",
    ]
    for t in stats["top"][: min(3, len(stats["top"]))]:
        lines.append(f"    structure {t['structure']} atom {t['atom']}: dH = {t['dH']:.3f}")
    if args.approx is not None:
        timings = pair.timings
        line = f"  time: approximate {timings['seconds_approx']:.3f} s"
        if compare is not None:
            line += (
                f", exact {timings['seconds_exact']:.3f} s; approximate - exact: max "
                f"{compare['dH_approx_minus_exact_max']:.3g}, mean "
                f"{compare['dH_approx_minus_exact_mean']:.3g} nats"
            )
        lines.append(line)
    lines += wrote(files)
    return result, lines
