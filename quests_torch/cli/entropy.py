"""``quests-torch entropy``: information entropy H and diversity D of a dataset.

``--per-environment FILE`` (upstream ``metrics``) writes every environment's
``dH_self_i = -log p(x_i | X)`` against its own dataset, self included, so that
``H = log n + mean_i dH_self_i``, as ``.npy``, ``.csv`` or (structure input) extxyz with a
per-atom ``dH_self`` array (8 decimals).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from ..io import atomic_write
from .inputs import dist, from_structures, load, params
from .options import CLIError, add_common, add_rows
from .report import envelope, estimate_text, input_info, parameters, wrote
from .rows import auto_rows, estimate_notes, progress, rows_record, say

_PER_ENV_SUFFIXES = (".npy", ".csv", ".extxyz", ".xyz")


def register(sub) -> None:
    p = sub.add_parser("entropy", help="information entropy H and diversity D of a dataset")
    p.add_argument("input", help="structures or descriptor file")
    p.add_argument(
        "--per-environment",
        metavar="FILE",
        default=None,
        help="write each environment's dH_self = -log p(x_i | X) against its own dataset (self "
        "included; H = log n + mean dH_self; upstream metrics) to .npy, .csv "
        "(environment,structure,atom,dH_self) or, for a structure input, .extxyz/.xyz with a "
        "per-atom dH_self array (OVITO); exact (one more kernel pass of the same cost)",
    )
    add_rows(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace):
    from ..distributed import dataset_summary

    k, cutoff, stored = params(args, [args.input])
    per_env = _per_environment_kind(args, stored)
    timings: dict = {}
    frames = None
    if per_env == "extxyz":
        frames, ds = from_structures(args.input, args.index, k, cutoff, args, timings, "input")
    else:
        ds = load(args.input, args.index, k, cutoff, args, stored, timings, "input", stream=True)
    t0 = time.perf_counter()
    n = ds.x.shape[0]
    if per_env is not None:
        args.rows = "all"  # every environment's log p is needed: exact
    rows, message = auto_rows(args, n * n / 2, ds.x.device, args.input, n)
    say(args, message)
    pairs = n * n / 2 if rows is None else min(rows, n) * n
    with estimate_notes() as notes:
        summary = dataset_summary(
            ds.x, args.bandwidth, progress=progress(args, pairs), rows=rows, generator=args.seed
        )
    timings["kernel"] = round(time.perf_counter() - t0, 4)
    res = {
        "n": n,
        "entropy": float(summary.entropy),
        "log_n": math.log(n),
        "diversity": float(summary.diversity),
    }
    files = []
    if per_env is not None:
        res["per_environment"] = _per_environment(args, per_env, ds, frames, timings)
        files.append(str(args.per_environment))
    return report(args, k, cutoff, ds, summary, res, timings, files, message, notes)


def _per_environment_kind(args: argparse.Namespace, stored: dict) -> str | None:
    """``entropy --per-environment FILE``: ``"npy"``, ``"csv"``, ``"extxyz"`` or ``None``."""
    path = args.per_environment
    if path is None:
        return None
    suffix = Path(path).suffix.lower()
    if suffix not in _PER_ENV_SUFFIXES:
        raise CLIError(
            f"--per-environment {path}: write .npy, .csv or .extxyz/.xyz (structures with a "
            "per-atom dH_self array)"
        )
    if suffix in (".extxyz", ".xyz") and args.input in stored:
        raise CLIError(
            f"--per-environment {path}: structures can be written only when the input is a "
            "structure file; write .npy or .csv for a descriptor file"
        )
    if isinstance(args.rows, int):
        raise CLIError(
            f"--rows {args.rows}: --per-environment needs every environment's log p; "
            "drop --rows (it is exact then)"
        )
    return {".npy": "npy", ".csv": "csv"}.get(suffix, "extxyz")


def _per_environment(args, kind: str, ds, frames, timings: dict) -> dict:
    """``dH_self_i = dH(x_i | X) = -log p(x_i | X)``, self included (so that
    ``H = log n + mean dH_self``): written to ``--per-environment``, summarised."""
    from ..distributed import delta_entropy

    n = ds.x.shape[0]
    t0 = time.perf_counter()
    dh_self = delta_entropy(ds.x, ds.x, args.bandwidth, progress=progress(args, n * n / 2))
    dh_np = dh_self.detach().cpu().double().numpy()
    timings["per_environment"] = round(time.perf_counter() - t0, 4)
    if dist().rank() == 0:
        _write_per_environment(Path(args.per_environment), kind, dh_np, ds, frames)
    order = np.argsort(-dh_np, kind="stable")[:5]
    return {
        "path": str(args.per_environment),
        "quantity": "dH_self = -log p(x_i | X), self included; H = log n + mean dH_self",
        "dH_self_min": float(dh_np.min()),
        "dH_self_mean": float(dh_np.mean()),
        "dH_self_max": float(dh_np.max()),
        "top": [{"environment": int(i), "dH_self": float(dh_np[i])} for i in order],
    }


def _write_per_environment(path: Path, kind: str, dh_self: np.ndarray, ds, frames) -> None:
    """Write ``dH_self`` (``[n]``, rows in input order) atomically as .npy, .csv or extxyz."""
    if kind == "npy":

        def write(p: Path) -> None:
            with open(p, "wb") as fh:
                np.save(fh, dh_self)

    elif kind == "csv":
        counts = np.asarray(ds.n_atoms, dtype=np.int64)
        struct = np.repeat(np.arange(len(counts)), counts)
        atom = np.arange(dh_self.size) - np.repeat(np.cumsum(counts) - counts, counts)

        def write(p: Path) -> None:
            with open(p, "w") as fh:
                fh.write("environment,structure,atom,dH_self\n")
                for i, (s_, a_, v) in enumerate(zip(struct, atom, dh_self, strict=True)):
                    fh.write(f"{i},{s_},{a_},{v:.17g}\n")

    else:
        import ase.io

        out, start = [], 0
        for atoms in frames:
            a = atoms.copy()
            a.calc = atoms.calc  # keep stored energies/forces
            a.arrays["dH_self"] = dh_self[start : start + len(a)].copy()
            start += len(a)
            out.append(a)

        def write(p: Path) -> None:
            ase.io.write(p, out, format="extxyz")

    atomic_write(path, write)


def report(args, k, cutoff, ds, summary, res, timings, files, message, notes):
    """The JSON document and summary lines of ``entropy``."""
    params_ = parameters(args, k, cutoff, "bandwidth", "dtype")
    est = summary.estimates
    if est is not None:
        res["rows"] = est["entropy"].rows
        res["entropy_estimate"] = est["entropy"].as_dict()
        res["diversity_estimate"] = est["diversity"].as_dict()
        params_.update(rows=args.rows, seed=args.seed)
        res.update(rows_record(message, notes))
    result = envelope(
        args,
        params_,
        inputs={"input": input_info(ds)},
        timings=timings,
        results=res,
        **({"files": files} if files else {}),
        device=str(ds.x.device),
    )
    n, h_val, d_val = res["n"], res["entropy"], res["diversity"]
    lines = [
        f"{args.input}: {len(ds.n_atoms)} structures, {n} environments "
        f"(k={k}, cutoff={cutoff:g} Å, h={args.bandwidth:g})",
    ]
    if est is None:
        lines += [
            f"  entropy   H = {h_val:.4f} nats   (max log n = {math.log(n):.4f})",
            f"  diversity D = {d_val:.4f} nats   (~{math.exp(d_val):.1f} distinct environments)",
        ]
    else:
        lines += [
            f"  entropy   {estimate_text('H', est['entropy'])}   (max log n = {math.log(n):.4f})",
            f"  diversity {estimate_text('D', est['diversity'])}",
        ]
        lines += [f"  note: {t}" for t in notes]
    if "per_environment" in res:
        pe = res["per_environment"]
        lines.append(
            f"  per environment: dH_self = -log p(x_i | X) min {pe['dH_self_min']:.3f}  mean "
            f"{pe['dH_self_mean']:.3f}  max {pe['dH_self_max']:.3f} nats "
            "(H = log n + mean dH_self)"
        )
        lines += wrote(files)
    return result, lines
