"""The ``quests-torch`` command line: thin wrappers that parse, call the API and write results.

Subcommands: ``descriptors``, ``entropy``, ``dh``, ``overlap``, ``learning-curve``,
``bandwidth``, ``screen``, ``compress``, ``generations``, ``generate`` and ``demo``. Inputs
are any file ASE can read (with ``-i`` an ASE index/slice) or a descriptor file
(``.npz``/``.pt`` written by ``descriptors``, which records ``k`` and the cutoff: comparing
descriptors made with different parameters is an error). Every command prints a readable
summary (``--quiet``: none), writes machine-readable JSON with ``-o`` (parameters, versions,
timings, results; atomically) and, where a picture helps, PNG figures with ``--plot PREFIX``.
Errors are one line on stderr and exit code 2, never a traceback (``QUESTS_TORCH_DEBUG=1``
re-raises for debugging).

``entropy`` and ``overlap`` take ``--rows N|auto|all`` (and ``--seed``): ``N`` sampled rows
with exact kernel sums against the whole set give estimates with error bars
(:mod:`quests_torch.estimates`); ``auto`` (the default) stays exact unless the exact sums
(``n^2 / 2`` pairs for ``entropy``, ``2 n_test n_ref`` for ``overlap``) would take over an
hour at the documented float64 pair rate (:data:`_PAIR_RATE`: 3e8 pairs/s on a CPU, 5e10 on a
GPU), then samples 20,000 rows and says so.

Upstream ``quests`` parity: ``dh --approx N`` (upstream ``approx_dH``) is dH from the ``N``
nearest references (:func:`quests_torch.metrics.approx_delta_entropy`, an upper bound of the
exact dH), timed beside the exact dH (``seconds_approx``, ``seconds_exact``; ``--no-exact``
skips the exact one); it is not sharded under ``torchrun`` (every rank computes it, rank 0
writes). ``entropy --per-environment FILE`` (upstream ``metrics``) writes every environment's
``dH_self_i = -log p(x_i | X)`` against its own dataset, self included, so that
``H = log n + mean_i dH_self_i``, as ``.npy``, ``.csv`` or (structure input) extxyz with a
per-atom ``dH_self`` array (8 decimals). ``generate`` (upstream ``mcmc``) moves a structure
of a dataset until the max or mean of its per-atom dH against the dataset reaches ``--target``
(:func:`quests_torch.sampling.generate_to_target` or
:func:`~quests_torch.sampling.random_walk_to_target`); a target not reached within ``--steps``
evaluations is an error (exit 2, nothing written) unless ``--best-effort``; it is not
distributed (under ``torchrun`` every rank runs it, rank 0 writes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .descriptors import DEFAULT_CUTOFF, DEFAULT_K, MAX_K
from .io import (
    DescriptorSet,
    atomic_write,
    cached_descriptors,
    is_descriptor_file,
    load_descriptors,
    save_descriptors,
)
from .io import read_structures as _read_structures
from .kde import DEFAULT_BANDWIDTH
from .structures import resolve_device

__all__ = ["CLIError", "atomic_write", "build_parser", "main", "read_structures"]

#: kernel passes with more pairs than this show a progress bar (about a second on a CPU)
_PROGRESS_PAIRS = 200_000_000
#: float64 kernel evaluations per second used by the ``--rows auto`` rule: measured 0.32-0.40
#: G/s on the 2-core CPU of the benchmarks (README, Benchmarks) and 5.4e10 on one H200
#: (exact entropy of 10^6 environments, 5e11 pairs, in 9.2 s; README, GPU readiness)
_PAIR_RATE = {"cpu": 3e8, "cuda": 5e10}
#: ``--rows auto`` samples rows when the exact kernel sums would take longer than this (s)
_EXACT_SECONDS = 3600.0


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def read_structures(path: str, index: str = ":") -> list:
    """Structures from any file ASE can read, with an ASE index/slice (``":"``, ``"0:10"``)."""
    try:
        return _read_structures(path, index)
    except (FileNotFoundError, IsADirectoryError, ValueError) as exc:
        raise CLIError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _k_option(text: str) -> int:
    v = _positive_int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"k must be at least 2, got {v}")
    if v > MAX_K:
        raise argparse.ArgumentTypeError(f"k must be at most {MAX_K}, got {v}")
    return v


def _rows_option(text: str) -> int | str:
    """``--rows``: a positive integer, ``auto`` (by the cost rule) or ``all`` (exact)."""
    if text in ("auto", "all"):
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, 'auto' or 'all', got {text!r}"
        ) from None
    if v < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, 'auto' or 'all', got {text!r}"
        )
    return v


def _dtype(name: str) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[name]


def _add_common(p: argparse.ArgumentParser, bandwidth: bool = True, json_out: bool = True) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("-i", "--index", default=":", help="ASE index/slice of frames (default ':')")
    g.add_argument(
        "-k",
        type=_k_option,
        default=None,
        help=f"nearest neighbours, 2..{MAX_K} (default {DEFAULT_K})",
    )
    g.add_argument(
        "-c",
        "--cutoff",
        type=_positive_float,
        default=None,
        help=f"descriptor cutoff in Å (default {DEFAULT_CUTOFF:g})",
    )
    if bandwidth:
        g.add_argument(
            "-b",
            "--bandwidth",
            type=_positive_float,
            default=DEFAULT_BANDWIDTH,
            help=f"kernel bandwidth h in 1/Å (default {DEFAULT_BANDWIDTH})",
        )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    g.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64", help="compute dtype"
    )
    if json_out:
        g.add_argument("-o", "--output", default=None, help="write results as JSON here")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no summary")


def _add_reference(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "-r",
        "--reference",
        required=required,
        help="reference structures (ASE-readable) or descriptor file (.npz/.pt)",
    )
    p.add_argument(
        "--reference-index", default=":", help="ASE index/slice of reference frames (default ':')"
    )


def _add_rows(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rows",
        type=_rows_option,
        default="auto",
        help="estimate from N uniformly sampled rows (exact log p against all) with an error "
        "bar; 'all': exact; 'auto' (default): exact unless that would take over an hour at the "
        "documented pair rate, then 20,000 rows",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled rows (default 0)")


def _add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plot", metavar="PREFIX", default=None, help="write PNG figures PREFIX*.png")


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _dist():
    """:mod:`quests_torch.distributed` (imported lazily): the API under ``torchrun``, the
    plain single-process functions otherwise."""
    from . import distributed

    return distributed


def _device(args: argparse.Namespace) -> torch.device:
    try:
        return resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        raise CLIError(f"--device {args.device}: {exc}") from None


def _params(args: argparse.Namespace, paths: Sequence[str]) -> tuple[int, float, dict]:
    """``k`` and cutoff for the inputs; descriptor files' stored values must agree."""
    stored: dict[str, DescriptorSet] = {}
    for path in paths:
        if path is not None and is_descriptor_file(path):
            try:
                stored[path] = load_descriptors(path)
            except (FileNotFoundError, IsADirectoryError, ValueError) as exc:
                raise CLIError(str(exc)) from None
    for a, b in zip(list(stored), list(stored)[1:], strict=False):
        da, db = stored[a], stored[b]
        if (da.k, da.cutoff) != (db.k, db.cutoff):
            raise CLIError(
                f"descriptor parameters differ: {a} has k={da.k}, cutoff={da.cutoff:g}; "
                f"{b} has k={db.k}, cutoff={db.cutoff:g}"
            )
    k, cutoff = args.k, args.cutoff
    if stored:
        first = next(iter(stored.values()))
        if k is not None and k != first.k:
            raise CLIError(f"-k {k} differs from k={first.k} stored in {first.source}")
        if cutoff is not None and cutoff != first.cutoff:
            raise CLIError(
                f"--cutoff {cutoff:g} differs from cutoff={first.cutoff:g} stored in {first.source}"
            )
        k, cutoff = first.k, first.cutoff
    return (k or DEFAULT_K), (cutoff or DEFAULT_CUTOFF), stored


def _load(
    path: str,
    index: str,
    k: int,
    cutoff: float,
    args: argparse.Namespace,
    stored: dict,
    timings: dict,
    label: str,
    cache: bool = False,
) -> DescriptorSet:
    """Descriptors of an input: read from a descriptor file or computed from structures."""
    t0 = time.perf_counter()
    device = _device(args)
    dtype = _dtype(args.dtype)
    if path in stored:
        ds = stored[path]
        if index != ":":
            raise CLIError(f"{path}: -i/--index selects frames of structure files only")
        ds.x = ds.x.to(device=device, dtype=dtype)
        timings[f"{label}_read"] = round(time.perf_counter() - t0, 4)
        return ds
    if cache:
        try:
            ds, hit = cached_descriptors(
                path,
                index=index,
                k=k,
                cutoff=cutoff,
                dtype=dtype,
                device=device,
                cache_dir=getattr(args, "cache_dir", None),
                use_cache=not getattr(args, "no_cache", False),
            )
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise CLIError(str(exc)) from None
        ds.x = ds.x.to(device=device, dtype=dtype)
        ds.meta["cache_hit"] = hit
        timings[f"{label}_descriptors"] = round(time.perf_counter() - t0, 4)
        return ds
    return _from_structures(path, index, k, cutoff, args, timings, label)[1]


def _from_structures(path, index, k, cutoff, args, timings, label):
    """(frames, DescriptorSet) of a structure file: read, then descriptors (split over ranks)."""
    t0 = time.perf_counter()
    frames = read_structures(path, index)
    t1 = time.perf_counter()
    dtype, device = _dtype(args.dtype), _device(args)
    x = _dist().get_descriptors(frames, k=k, cutoff=cutoff, dtype=dtype, device=device)
    timings[f"{label}_read"] = round(t1 - t0, 4)
    timings[f"{label}_descriptors"] = round(time.perf_counter() - t1, 4)
    counts = np.array([len(a) for a in frames], dtype=np.int64)
    return frames, DescriptorSet(x, counts, k, cutoff, args.dtype, path)


def _progress(args: argparse.Namespace, pairs: float) -> bool:
    return not args.quiet and pairs > _PROGRESS_PAIRS


def _auto_rows(
    args: argparse.Namespace, pairs: float, device: torch.device, what: str, n: int | None = None
):
    """``--rows`` resolved for a kernel pass of ``pairs`` exact pairs: ``(rows, message)``.

    ``all`` -> ``None`` (exact), an int -> itself (checked against ``n`` when given);
    ``auto`` -> exact unless ``pairs / _PAIR_RATE[device] > _EXACT_SECONDS`` (an hour), then
    :data:`quests_torch.estimates.AUTO_ROWS` sampled rows, with a message saying so.
    """
    from .estimates import AUTO_ROWS

    if args.rows == "all":
        return None, None
    if args.rows != "auto":
        if n is not None and not 2 <= args.rows <= n:
            raise CLIError(f"--rows {args.rows}: must lie in [2, {n:,}] (the rows of {what})")
        return args.rows, None
    rate = _PAIR_RATE.get(device.type, _PAIR_RATE["cpu"])
    seconds = pairs / rate
    if seconds <= _EXACT_SECONDS:
        return None, None
    rows = AUTO_ROWS if n is None else min(AUTO_ROWS, n)
    message = (
        f"{what}: the exact sums ({pairs:.2g} pairs) would take ~{seconds / 3600:.1f} h at "
        f"~{rate:.0e} pairs/s on {device.type}; estimating from {rows:,} sampled rows "
        "(--rows all: exact, --rows N: N rows)"
    )
    return rows, message


def _say(args: argparse.Namespace, message: str | None) -> None:
    """A note printed before a long computation (not with ``--quiet``)."""
    if message and not args.quiet:
        print(message, flush=True)


@contextlib.contextmanager
def _estimate_notes():
    """Collect :class:`quests_torch.estimates.EstimateWarning` texts as summary notes."""
    from .estimates import EstimateWarning

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EstimateWarning)
        yield notes
    notes += [str(w.message) for w in caught if issubclass(w.category, EstimateWarning)]
    for w in caught:  # anything else is shown as it would have been
        if not issubclass(w.category, EstimateWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _estimate_text(
    name: str, est, unit: str = " nats", scale: float = 1.0, decimals: int = 3
) -> str:
    """``H = 8.201 +- 0.004 nats (95 %: 8.193-8.209; 20,000 of 10,240,000 rows)``.

    At least ``decimals`` decimals, more when the error bar needs them to show its leading
    digit; ``name`` empty: no ``name =``.
    """
    se = est.stderr * scale
    dec = decimals if se <= 0 else min(8, max(decimals, -math.floor(math.log10(se))))
    low, high = (v * scale for v in est.interval(0.95))
    lead = f"{name} = " if name else ""
    return (
        f"{lead}{est.value * scale:.{dec}f} +- {se:.{dec}f}{unit} "
        f"(95 %: {low:.{dec}f}-{high:.{dec}f}; {est.rows:,} of {est.n:,} rows)"
    )


def _input_info(ds: DescriptorSet) -> dict:
    return {
        "path": ds.source,
        "kind": "descriptors" if is_descriptor_file(ds.source) else "structures",
        "n_structures": len(ds.n_atoms),
        "n_environments": int(ds.x.shape[0]),
    }


def _versions() -> dict:
    import ase

    return {
        "quests_torch": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ase": ase.__version__,
        "python": platform.python_version(),
    }


def _envelope(args: argparse.Namespace, parameters: dict, **rest) -> dict:
    return {
        "command": args.command,
        "versions": _versions(),
        "parameters": parameters,
        **rest,
    }


def _plot_path(prefix: str, name: str) -> str:
    return f"{prefix}{name}.png" if prefix.endswith(("/", "-", "_")) else f"{prefix}-{name}.png"


def _screen_table(args: argparse.Namespace) -> Path:
    """The per-frame table of ``screen``: ``--table`` or ``TRAJECTORY-STEM.screen.csv``."""
    return Path(args.table or f"{Path(args.trajectory).stem}.screen.csv")


def _check_writable(
    path: str | os.PathLike, option: str, folder: bool = False, given: str | None = None
) -> None:
    """Refuse an output that cannot be written, naming the option and the target.

    ``path`` is a file (``folder=False``) or a folder the command writes into; ``given`` is
    what the user typed when it differs (a ``--plot`` prefix). Missing folders are fine (they
    are created when writing, as :func:`atomic_write` does); the nearest existing one must be
    a folder this process may write in.
    """
    target = Path(path)
    name = f"{option} {path if given is None else given}"
    if not folder and target.is_dir():
        raise CLIError(f"{name}: is a folder, give a file name")
    existing = target if folder else target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{name}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{name}: cannot write in {existing} (permission denied)")


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path of a command, checked before it reads or computes anything."""
    files = [
        (getattr(args, name, None), flag)
        for name, flag in (
            ("output", "-o"),
            ("json", "--json"),
            ("save", "--save"),
            ("extxyz", "--extxyz"),
            ("checkpoint", "--checkpoint"),
            ("per_environment", "--per-environment"),
            ("write", "--write"),
        )
    ]
    files += [(out, "-o") for out in getattr(args, "outputs", None) or []]
    if args.command == "screen":
        files.append((_screen_table(args), "--table"))
    plot = getattr(args, "plot", None)
    for path, flag in files:
        if path is not None:
            _check_writable(path, flag)
    if plot is not None:
        _check_writable(Path(_plot_path(plot, "figure")).parent, "--plot", True, given=plot)
    if getattr(args, "outdir", None) is not None:
        _check_writable(args.outdir, "--outdir", folder=True)


# --------------------------------------------------------------------------------------------
# commands: each returns (result dict, summary lines)
# --------------------------------------------------------------------------------------------


def cmd_descriptors(args: argparse.Namespace):
    if is_descriptor_file(args.input):
        raise CLIError(f"{args.input}: already a descriptor file; give a structure file")
    out = Path(args.output)
    if not is_descriptor_file(out):
        raise CLIError(f"-o {out}: descriptor output must end in .npz or .pt")
    k, cutoff = args.k or DEFAULT_K, args.cutoff or DEFAULT_CUTOFF
    timings: dict = {}
    ds = _load(args.input, args.index, k, cutoff, args, {}, timings, "input")
    t0 = time.perf_counter()
    if _dist().rank() == 0:  # under torchrun every rank holds the rows; one writes them
        save_descriptors(out, ds.x, ds.n_atoms, k=k, cutoff=cutoff, dtype=args.dtype)
    timings["write"] = round(time.perf_counter() - t0, 4)
    result = _envelope(
        args,
        {"k": k, "cutoff": cutoff, "dtype": args.dtype, "index": args.index},
        inputs={"input": _input_info(ds)},
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


_PER_ENV_SUFFIXES = (".npy", ".csv", ".extxyz", ".xyz")


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


def cmd_entropy(args: argparse.Namespace):
    from .distributed import dataset_summary, delta_entropy

    k, cutoff, stored = _params(args, [args.input])
    per_env = _per_environment_kind(args, stored)
    timings: dict = {}
    frames = None
    if per_env == "extxyz":
        frames, ds = _from_structures(args.input, args.index, k, cutoff, args, timings, "input")
    else:
        ds = _load(args.input, args.index, k, cutoff, args, stored, timings, "input")
    t0 = time.perf_counter()
    n = ds.x.shape[0]
    if per_env is not None:
        args.rows = "all"  # every environment's log p is needed: exact
    rows, message = _auto_rows(args, n * n / 2, ds.x.device, args.input, n)
    _say(args, message)
    pairs = n * n / 2 if rows is None else min(rows, n) * n
    with _estimate_notes() as notes:
        summary = dataset_summary(
            ds.x, args.bandwidth, progress=_progress(args, pairs), rows=rows, generator=args.seed
        )
    h_val, d_val = float(summary.entropy), float(summary.diversity)
    timings["kernel"] = round(time.perf_counter() - t0, 4)
    res = {"n": n, "entropy": h_val, "log_n": math.log(n), "diversity": d_val}
    files = []
    if per_env is not None:
        # dH_self_i = dH(x_i | X) = -log p(x_i | X), self included: H = log n + mean dH_self
        t0 = time.perf_counter()
        dh_self = delta_entropy(ds.x, ds.x, args.bandwidth, progress=_progress(args, n * n / 2))
        dh_np = dh_self.detach().cpu().double().numpy()
        timings["per_environment"] = round(time.perf_counter() - t0, 4)
        if _dist().rank() == 0:
            _write_per_environment(Path(args.per_environment), per_env, dh_np, ds, frames)
        files.append(str(args.per_environment))
        order = np.argsort(-dh_np, kind="stable")[:5]
        res["per_environment"] = {
            "path": str(args.per_environment),
            "quantity": "dH_self = -log p(x_i | X), self included; H = log n + mean dH_self",
            "dH_self_min": float(dh_np.min()),
            "dH_self_mean": float(dh_np.mean()),
            "dH_self_max": float(dh_np.max()),
            "top": [{"environment": int(i), "dH_self": float(dh_np[i])} for i in order],
        }
    parameters = {"k": k, "cutoff": cutoff, "bandwidth": args.bandwidth, "dtype": args.dtype}
    if summary.estimates is not None:
        est = summary.estimates
        res["rows"] = est["entropy"].rows
        res["entropy_estimate"] = est["entropy"].as_dict()
        res["diversity_estimate"] = est["diversity"].as_dict()
        parameters.update(rows=args.rows, seed=args.seed)
        if message:
            res["rows_rule"] = message
        if notes:
            res["notes"] = notes
    result = _envelope(
        args,
        parameters,
        inputs={"input": _input_info(ds)},
        timings=timings,
        results=res,
        **({"files": files} if files else {}),
        device=str(ds.x.device),
    )
    lines = [
        f"{args.input}: {len(ds.n_atoms)} structures, {n} environments "
        f"(k={k}, cutoff={cutoff:g} Å, h={args.bandwidth:g})",
    ]
    if summary.estimates is None:
        lines += [
            f"  entropy   H = {h_val:.4f} nats   (max log n = {math.log(n):.4f})",
            f"  diversity D = {d_val:.4f} nats   (~{math.exp(d_val):.1f} distinct environments)",
        ]
    else:
        lines += [
            f"  entropy   {_estimate_text('H', summary.estimates['entropy'])}   "
            f"(max log n = {math.log(n):.4f})",
            f"  diversity {_estimate_text('D', summary.estimates['diversity'])}",
        ]
        lines += [f"  note: {t}" for t in notes]
    if per_env is not None:
        pe = res["per_environment"]
        lines.append(
            f"  per environment: dH_self = -log p(x_i | X) min {pe['dH_self_min']:.3f}  mean "
            f"{pe['dH_self_mean']:.3f}  max {pe['dH_self_max']:.3f} nats "
            "(H = log n + mean dH_self)"
        )
        lines += [f"  wrote {f}" for f in files]
    return result, lines


def _load_pair(args: argparse.Namespace):
    """``(k, cutoff, stored, timings, test, reference)`` of a test-vs-reference command."""
    k, cutoff, stored = _params(args, [args.input, args.reference])
    timings: dict = {}
    test = _load(args.input, args.index, k, cutoff, args, stored, timings, "test")
    ref = _load(args.reference, args.reference_index, k, cutoff, args, stored, timings, "reference")
    return k, cutoff, stored, timings, test, ref


def _dh_against(args: argparse.Namespace, loaded=None):
    from .distributed import delta_entropy

    k, cutoff, stored, timings, test, ref = loaded or _load_pair(args)
    t0 = time.perf_counter()
    pairs = test.x.shape[0] * ref.x.shape[0]
    dh = delta_entropy(test.x, ref.x, args.bandwidth, progress=_progress(args, pairs))
    timings["kernel"] = round(time.perf_counter() - t0, 4)
    return k, cutoff, stored, timings, test, ref, dh


def _dh_stats(dh: np.ndarray, threshold: float) -> dict:
    q = np.quantile(dh, [0.05, 0.5, 0.95])
    return {
        "n": int(dh.size),
        "dH_min": float(dh.min()),
        "dH_max": float(dh.max()),
        "dH_mean": float(dh.mean()),
        "dH_median": float(q[1]),
        "dH_p05": float(q[0]),
        "dH_p95": float(q[2]),
        "novelty": float(np.mean(dh > threshold)),
        "overlap": float(np.mean(dh <= threshold)),
        "n_novel": int(np.sum(dh > threshold)),
    }


def _approx_dh(args: argparse.Namespace):
    """``dh --approx N``: dH from the N nearest references, timed beside the exact dH.

    Returns what :func:`_dh_against` returns, with the approximate dH in place of the exact
    one, plus a dict of the comparison (``None`` with ``--no-exact``).
    """
    from .metrics import approx_delta_entropy

    loaded = _load_pair(args)
    k, cutoff, stored, timings, test, ref = loaded
    n_ref = int(ref.x.shape[0])
    if args.approx > n_ref:
        raise CLIError(f"--approx {args.approx}: the reference has only {n_ref} environments")
    t0 = time.perf_counter()
    pairs = test.x.shape[0] * n_ref
    dh = approx_delta_entropy(
        test.x, ref.x, args.bandwidth, n=args.approx, progress=_progress(args, pairs)
    )
    seconds = time.perf_counter() - t0
    timings["seconds_approx"] = round(seconds, 4)
    if args.no_exact:
        return k, cutoff, stored, timings, test, ref, dh, None
    exact = _dh_against(args, loaded)[-1]
    timings["seconds_exact"] = timings.pop("kernel")
    diff = (dh - exact).detach().cpu().double().numpy()
    compare = {
        "dH_approx_minus_exact_max": float(diff.max()),
        "dH_approx_minus_exact_mean": float(diff.mean()),
        "novelty_exact": float((exact.detach().cpu().double().numpy() > args.threshold).mean()),
    }
    return k, cutoff, stored, timings, test, ref, dh, compare


def cmd_dh(args: argparse.Namespace):
    if args.no_exact and args.approx is None:
        raise CLIError("--no-exact only applies with --approx N")
    compare = None
    if args.approx is None:
        k, cutoff, _stored, timings, test, ref, dh = _dh_against(args)
    else:
        k, cutoff, _stored, timings, test, ref, dh, compare = _approx_dh(args)
    dh_np = dh.detach().cpu().double().numpy()
    stats = _dh_stats(dh_np, args.threshold)
    if args.approx is not None:
        stats["approx"] = args.approx
        if compare is not None:
            stats.update(compare)
    order = np.argsort(-dh_np, kind="stable")[: args.top]
    bounds = np.concatenate([[0], np.cumsum(test.n_atoms)])
    struct = np.searchsorted(bounds, order, side="right") - 1
    stats["top"] = [
        {
            "environment": int(i),
            "structure": int(s),
            "atom": int(i - bounds[s]),
            "dH": float(dh_np[i]),
        }
        for i, s in zip(order, struct, strict=True)
    ]
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
        from .plots import plot_dh_histogram

        files.append(
            str(plot_dh_histogram(_plot_path(args.plot, "dh-histogram"), dh_np, args.threshold))
        )
    params = _dh_params(args, k, cutoff)
    if args.approx is not None:
        params.update(approx=args.approx, exact_timed=not args.no_exact)
    result = _envelope(
        args,
        params,
        inputs={"test": _input_info(test), "reference": _input_info(ref)},
        timings=timings,
        results=stats,
        files=files,
        device=str(dh.device),
    )
    what = "dH" if args.approx is None else f"approximate dH ({args.approx} nearest references)"
    lines = [
        f"{what} of {args.input} ({stats['n']} environments) against {args.reference} "
        f"({ref.x.shape[0]} environments), h={args.bandwidth:g}",
        f"  dH min {stats['dH_min']:.3f}  median {stats['dH_median']:.3f}  mean "
        f"{stats['dH_mean']:.3f}  p95 {stats['dH_p95']:.3f}  max {stats['dH_max']:.3f} nats",
        f"  novel (dH > {args.threshold:g}): {stats['n_novel']} = {100 * stats['novelty']:.2f} %",
    ]
    for t in stats["top"][: min(3, len(stats["top"]))]:
        lines.append(f"    structure {t['structure']} atom {t['atom']}: dH = {t['dH']:.3f}")
    if args.approx is not None:
        line = f"  time: approximate {timings['seconds_approx']:.3f} s"
        if compare is not None:
            line += (
                f", exact {timings['seconds_exact']:.3f} s; approximate - exact: max "
                f"{compare['dH_approx_minus_exact_max']:.3g}, mean "
                f"{compare['dH_approx_minus_exact_mean']:.3g} nats"
            )
        lines.append(line)
    lines += [f"  wrote {f}" for f in files]
    return result, lines


def _dh_params(args: argparse.Namespace, k: int, cutoff: float) -> dict:
    """Parameters recorded in the JSON of the test-vs-reference commands (dh, overlap)."""
    return {
        "k": k,
        "cutoff": cutoff,
        "bandwidth": args.bandwidth,
        "threshold": args.threshold,
        "dtype": args.dtype,
    }


def cmd_overlap(args: argparse.Namespace):
    from .distributed import delta_entropy

    loaded = _load_pair(args)
    test, ref = loaded[4], loaded[5]
    n_test, n_ref = int(test.x.shape[0]), int(ref.x.shape[0])
    pairs = 2.0 * n_test * n_ref
    rows, message = _auto_rows(args, pairs, test.x.device, f"{args.input} vs {args.reference}")
    _say(args, message)
    if rows is not None:
        return _overlap_estimates(args, loaded, rows, message)
    k, cutoff, _stored, timings, test, ref, dh = _dh_against(args, loaded)
    t0 = time.perf_counter()
    back = delta_entropy(ref.x, test.x, args.bandwidth)
    timings["kernel"] = round(timings["kernel"] + time.perf_counter() - t0, 4)
    ov = float((dh <= args.threshold).double().mean())
    ov_back = float((back <= args.threshold).double().mean())
    res = {
        "overlap": ov,
        "overlap_reverse": ov_back,
        "n_test": n_test,
        "n_reference": n_ref,
    }
    result = _envelope(
        args,
        _dh_params(args, k, cutoff),
        inputs={"test": _input_info(test), "reference": _input_info(ref)},
        timings=timings,
        results=res,
        device=str(dh.device),
    )
    lines = [
        f"overlap (fraction with dH <= {args.threshold:g}), h={args.bandwidth:g}:",
        f"  {args.input} covered by {args.reference}: {100 * ov:.2f} % of {res['n_test']}",
        f"  {args.reference} covered by {args.input}: {100 * ov_back:.2f} % of "
        f"{res['n_reference']}",
    ]
    return result, lines


def _overlap_estimates(args: argparse.Namespace, loaded, rows: int, message: str | None):
    """``overlap --rows``: both directions from at most ``rows`` sampled rows of each set
    (each sample drawn with ``--seed``).

    Under torchrun every rank computes the same estimates (same seed): ``m n`` pairs each.
    """
    from .metrics import estimate_overlap

    k, cutoff, _stored, timings, test, ref = loaded
    t0 = time.perf_counter()
    with _estimate_notes() as notes:
        est, back = [
            estimate_overlap(
                a.x,
                b.x,
                args.bandwidth,
                args.threshold,
                rows=min(rows, a.x.shape[0]),
                generator=args.seed,
                progress=_progress(args, min(rows, a.x.shape[0]) * b.x.shape[0]),
            )
            for a, b in ((test, ref), (ref, test))
        ]
    timings["kernel"] = round(time.perf_counter() - t0, 4)
    res = {
        "overlap": est.value,
        "overlap_reverse": back.value,
        "n_test": est.n,
        "n_reference": back.n,
        "overlap_estimate": est.as_dict(),
        "overlap_reverse_estimate": back.as_dict(),
    }
    if message:
        res["rows_rule"] = message
    if notes:
        res["notes"] = notes
    result = _envelope(
        args,
        {**_dh_params(args, k, cutoff), "rows": args.rows, "seed": args.seed},
        inputs={"test": _input_info(test), "reference": _input_info(ref)},
        timings=timings,
        results=res,
        device=str(test.x.device),
    )
    lines = [
        f"overlap (fraction with dH <= {args.threshold:g}), h={args.bandwidth:g}, "
        "from sampled rows:",
        f"  {args.input} covered by {args.reference}: {_estimate_text('', est, ' %', 100.0, 2)}",
        f"  {args.reference} covered by {args.input}: {_estimate_text('', back, ' %', 100.0, 2)}",
    ]
    lines += [f"  note: {t}" for t in notes]
    return result, lines


def cmd_learning_curve(args: argparse.Namespace):
    from .distributed import entropy_learning_curve
    from .metrics import fit_entropy_asymptote

    k, cutoff, stored = _params(args, [args.input])
    timings: dict = {}
    ds = _load(args.input, args.index, k, cutoff, args, stored, timings, "input")
    n = ds.x.shape[0]
    sizes = None
    if args.sizes:
        try:
            sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
        except ValueError:
            raise CLIError(
                f"--sizes must be comma-separated integers, got {args.sizes!r}"
            ) from None
        bad = [s for s in sizes if not 1 <= s <= n]
        if bad:
            raise CLIError(f"--sizes {bad} outside [1, {n}] (the environments of the input)")
    t0 = time.perf_counter()
    curve = entropy_learning_curve(
        ds.x, args.bandwidth, sizes=sizes, repeats=args.repeats, generator=args.seed
    )
    timings["kernel"] = round(time.perf_counter() - t0, 4)
    s_np = curve.sizes.numpy()
    mean = curve.mean.detach().cpu().double().numpy()
    std = curve.std.detach().cpu().double().numpy()
    fit = None
    fit_error = None
    try:
        f = fit_entropy_asymptote(s_np, mean)
        fit = {
            "h_inf": f.h_inf,
            "a": f.a,
            "b": f.b,
            "c": f.c,
            "rmse": f.rmse,
            "n_points": f.n_points,
        }
    except ValueError as exc:
        fit_error = str(exc)
    res = {
        "sizes": s_np.tolist(),
        "entropy_mean": mean.tolist(),
        "entropy_std": std.tolist(),
        "fit": fit,
        "information_gap": (fit["h_inf"] - float(mean[-1])) if fit else None,
        "entropy_full": float(mean[-1]) if s_np[-1] == n else None,
    }
    if fit_error:
        res["fit_error"] = fit_error
    files = []
    if args.plot:
        from .plots import plot_learning_curve

        files.append(
            str(plot_learning_curve(_plot_path(args.plot, "learning-curve"), s_np, mean, std, fit))
        )
    result = _envelope(
        args,
        {
            "k": k,
            "cutoff": cutoff,
            "bandwidth": args.bandwidth,
            "repeats": args.repeats,
            "seed": args.seed,
            "dtype": args.dtype,
        },
        inputs={"input": _input_info(ds)},
        timings=timings,
        results=res,
        files=files,
        device=str(ds.x.device),
    )
    lines = [f"entropy learning curve of {args.input} ({n} environments, h={args.bandwidth:g})"]
    lines.append(f"  {'N':>8s} {'H mean':>9s} {'H std':>8s}")
    for s, m, sd in zip(s_np, mean, std, strict=True):
        lines.append(f"  {int(s):8d} {m:9.4f} {sd:8.4f}")
    if fit:
        lines.append(
            f"  fit H(N) = a - b N^-c: a = H_inf = {fit['h_inf']:.4f}, b = {fit['b']:.4g}, "
            f"c = {fit['c']:.4g} (rmse {fit['rmse']:.2g}, {fit['n_points']} points)"
        )
        lines.append(f"  information gap at N = {int(s_np[-1])}: {res['information_gap']:.4f} nats")
    else:
        lines.append(f"  no asymptote fit: {fit_error}")
    lines += [f"  wrote {f}" for f in files]
    return result, lines


def cmd_bandwidth(args: argparse.Namespace):
    from .metrics import bandwidth

    if args.volume is not None:
        volumes = np.array([args.volume])
        source = "given"
    else:
        if args.input is None:
            raise CLIError("give a structure file or --volume V (Å^3/atom)")
        if is_descriptor_file(args.input):
            raise CLIError(
                f"{args.input}: bandwidth needs structures (cell volumes), not descriptors"
            )
        frames = read_structures(args.input, args.index)
        periodic = [a for a in frames if a.pbc.all()]
        if not periodic:
            raise CLIError(
                f"{args.input}: no fully periodic structure in the selection: the volume per atom "
                "is undefined (give --volume V)"
            )
        volumes = np.array([a.get_volume() / len(a) for a in periodic])
        source = f"{len(periodic)} periodic structures of {args.input}"
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
    result = _envelope(args, {"method": args.method}, results=res, source=source)
    lines = [
        f"volume per atom {v:.4f} Å^3/atom ({source})",
        f"  h (gaussian rule) = {res['bandwidth_gaussian']:.5f} 1/Å",
        f"  h (cutoff rule)   = {res['bandwidth_cutoff']:.5f} 1/Å",
        f"  -> -b {res['bandwidth']:.5f}  ({args.method})",
    ]
    return result, lines


def cmd_screen(args: argparse.Namespace):
    from .distributed import screen_trajectory

    if is_descriptor_file(args.trajectory):
        raise CLIError(
            f"{args.trajectory}: screen needs structures (a trajectory), not descriptors"
        )
    if not Path(args.trajectory).exists():
        raise CLIError(f"{args.trajectory}: no such file")
    k, cutoff, stored = _params(args, [args.reference])
    timings: dict = {}
    ref = _load(
        args.reference,
        args.reference_index,
        k,
        cutoff,
        args,
        stored,
        timings,
        "reference",
        cache=True,
    )
    table = _screen_table(args)
    try:
        out = screen_trajectory(
            args.trajectory,
            ref.x,
            table,
            index=args.index,
            extxyz=args.extxyz,
            h=args.bandwidth,
            threshold=args.threshold,
            k=k,
            cutoff=cutoff,
            cluster_cutoff=args.cluster_cutoff,
            dtype=_dtype(args.dtype),
            device=_device(args),
            batch_atoms=args.batch_atoms,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    timings.update({f"screen_{key}": v for key, v in out.timings.as_dict().items()})
    timings["screen_total"] = round(out.seconds, 4)
    s = out.summary
    files = [str(out.table)] + ([str(out.extxyz)] if out.extxyz else [])
    if args.plot:
        from .plots import plot_screening_timeline

        files.append(str(plot_screening_timeline(_plot_path(args.plot, "timeline"), out.frames)))
    n_screened_atoms = int(out.frames["n_atoms"][out.frames_resumed :].sum())
    rates = {}
    if out.frames_screened and out.seconds > 0:
        rates = {
            "frames_per_s": out.frames_screened / out.seconds,
            "atoms_per_s": n_screened_atoms / out.seconds,
        }
    result = _envelope(
        args,
        {
            "k": k,
            "cutoff": cutoff,
            "bandwidth": args.bandwidth,
            "threshold": args.threshold,
            "cluster_cutoff": args.cluster_cutoff,
            "dtype": args.dtype,
            "index": args.index,
            "batch_atoms": out.batch_atoms,
        },
        inputs={
            "trajectory": args.trajectory,
            "reference": {**_input_info(ref), "cache_hit": ref.meta.get("cache_hit")},
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
        f"environments{', cached' if ref.meta.get('cache_hit') else ''}), h={args.bandwidth:g}",
    ]
    if out.frames_resumed:
        lines.append(
            f"  resumed: {out.frames_resumed} frames were already done, {out.frames_screened} "
            "screened now"
        )
    if s.get("n_frames"):
        lines += [
            f"  {s['n_frames']} frames, {s['n_atoms']} atoms; dH max {s['dH_max']:.3f} (frame "
            f"{s['dH_max_frame']}), mean {s['dH_mean']:.3f} nats",
            f"  novel atoms (dH > {args.threshold:g}): {100 * s['novel_fraction']:.2f} %; frames "
            f"with novel atoms: {s['frames_with_novel_atoms']}",
            f"  largest covered cluster: {s['largest_cluster_min']}..{s['largest_cluster_max']} "
            "atoms; first frame below half the atoms: "
            f"{s['first_frame_largest_cluster_below_half']}",
        ]
    if rates:
        lines.append(
            f"  {rates['frames_per_s']:.2f} frames/s, {rates['atoms_per_s']:.0f} atoms/s "
            f"(io {out.timings.io:.2f} s, descriptors {out.timings.descriptors:.2f} s, "
            f"kernel {out.timings.kernel:.2f} s, clusters {out.timings.clusters:.2f} s)"
        )
    lines += [f"  wrote {f}" for f in files]
    return result, lines


def cmd_demo(args: argparse.Namespace):
    from .demo import run_demo

    result = run_demo(
        device=_device(args), quiet=args.quiet, outdir=args.outdir, plots=not args.no_plot
    )
    return result, []


def _size_option(text: str) -> int | float:
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


def _structures_and_descriptors(path, index, k, cutoff, args, stored, timings, label):
    """(frames or None, DescriptorSet): frames are kept for writing structures back."""
    if path in stored:
        return None, _load(path, index, k, cutoff, args, stored, timings, label)
    return _from_structures(path, index, k, cutoff, args, timings, label)


def _system_idx(ds: DescriptorSet) -> torch.Tensor:
    counts = torch.as_tensor(ds.n_atoms, device=ds.x.device)
    return torch.repeat_interleave(torch.arange(len(ds.n_atoms), device=ds.x.device), counts)


def cmd_compress(args: argparse.Namespace):
    from .compression import compress

    outputs = args.outputs or []
    for out in outputs:
        if not out.lower().endswith((".json", ".extxyz", ".xyz")):
            raise CLIError(f"-o {out}: write .extxyz/.xyz (structures) or .json (indices, metrics)")
    k, cutoff, stored = _params(args, [args.input, args.reference])
    timings: dict = {}
    frames, ds = _structures_and_descriptors(
        args.input, args.index, k, cutoff, args, stored, timings, "input"
    )
    if frames is None and any(not o.lower().endswith(".json") for o in outputs):
        raise CLIError(
            f"{args.input} is a descriptor file: writing structures needs the structures"
        )
    ref = None
    if args.reference is not None:
        ref = _load(
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
        _system_idx(ds),
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
    summary = res.summary()
    curve = res.curve.as_dict()
    indices = res.indices.tolist()
    files = []
    for out in outputs:
        if out.lower().endswith(".json"):
            continue  # the envelope below
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
    if args.plot:
        from .plots import plot_compression_curve

        title = f"{args.method} compression of {Path(args.input).name}"
        files.append(
            str(
                plot_compression_curve(_plot_path(args.plot, "compression"), curve, n_struct, title)
            )
        )
    params = {
        "k": k,
        "cutoff": cutoff,
        "bandwidth": args.bandwidth,
        "method": args.method,
        "size": args.size,
        "seed": args.seed,
        "threshold": args.threshold,
        "dtype": args.dtype,
    }
    inputs = {"input": _input_info(ds)}
    result = _envelope(
        args,
        params,
        inputs=inputs,
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
    for out in outputs:
        if out.lower().endswith(".json"):
            text = json.dumps(result, indent=2, default=_json_default) + "\n"
            atomic_write(Path(out), lambda p, t=text: p.write_text(t))
            files.append(out)
    m = summary["compressed_size"]
    lines = [
        f"{args.method}: selected {m} of {n_struct} structures "
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
    lines += [f"  wrote {f}" for f in files]
    return result, lines


def _generation_sets(args, k, cutoff, stored, timings):
    """(labels, descriptors, generation of each environment) from files or an info key."""
    if args.key is None:
        if len(args.inputs) < 2:
            raise CLIError("give one file per generation (two or more), or one file and --key")
        parts, labels = [], []
        for i, path in enumerate(args.inputs):
            ds = _load(path, args.index, k, cutoff, args, stored, timings, f"gen{i}")
            parts.append(ds.x)
            labels.append(Path(path).stem)
        gen = torch.repeat_interleave(
            torch.arange(len(parts)), torch.tensor([p.shape[0] for p in parts])
        )
        return labels, torch.cat(parts), gen.to(parts[0].device)
    if len(args.inputs) != 1 or args.inputs[0] in stored:
        raise CLIError("--key needs exactly one structure file (generation in atoms.info[KEY])")
    frames, ds = _structures_and_descriptors(
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
    gen = per_struct[_system_idx(ds)]
    return [v.item() if hasattr(v, "item") else v for v in labels], ds.x, gen


def cmd_generations(args: argparse.Namespace):
    from .compression import generation_report

    k, cutoff, stored = _params(args, list(args.inputs))
    timings: dict = {}
    labels, x, gen = _generation_sets(args, k, cutoff, stored, timings)
    t0 = time.perf_counter()
    rep = generation_report(
        x,
        gen,
        labels=labels,
        h=args.bandwidth,
        threshold=args.threshold,
        progress=_progress(args, float(x.shape[0]) ** 2),
    )
    timings["kernel"] = round(time.perf_counter() - t0, 4)
    rows = rep.rows()
    files = []
    if args.plot:
        from .plots import plot_generations

        files.append(str(plot_generations(_plot_path(args.plot, "generations"), rows)))
    result = _envelope(
        args,
        {
            "k": k,
            "cutoff": cutoff,
            "bandwidth": args.bandwidth,
            "threshold": args.threshold,
            "key": args.key,
            "dtype": args.dtype,
        },
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
    lines += [f"  wrote {f}" for f in files]
    return result, lines


def _write_format(path: str, option: str) -> str:
    """The ASE format of an output file, from its name; unknown names are refused."""
    from ase.io.formats import filetype, ioformats

    try:
        fmt = filetype(path, read=False)
    except (ValueError, OSError) as exc:
        raise CLIError(f"{option} {path}: {exc}") from None
    if fmt not in ioformats or not ioformats[fmt].can_write:
        raise CLIError(f"{option} {path}: ASE cannot write format {fmt!r} (try .extxyz)")
    return fmt


def _generation_starts(args: argparse.Namespace, n_frames: int) -> list[int]:
    """Start structure of each of the ``-n`` runs: ``-i`` for all, or drawn with ``--seed``."""
    if args.start is not None:
        start = args.start + n_frames if args.start < 0 else args.start
        if not 0 <= start < n_frames:
            raise CLIError(f"-i {args.start}: the dataset has {n_frames} structures")
        return [start] * args.count
    rng = np.random.default_rng(args.seed)
    return [int(i) for i in rng.integers(0, n_frames, size=args.count)]


def cmd_generate(args: argparse.Namespace):
    from .sampling import generate_to_target, random_walk_to_target
    from .uncertainty import UncertaintyBank

    fmt = _write_format(args.write, "--write")
    if is_descriptor_file(args.input):
        raise CLIError(f"{args.input}: generate needs structures to start from, not descriptors")
    k, cutoff = args.k or DEFAULT_K, args.cutoff or DEFAULT_CUTOFF
    timings: dict = {}
    frames, ds = _from_structures(args.input, ":", k, cutoff, args, timings, "input")
    starts = _generation_starts(args, len(frames))
    bank = UncertaintyBank(ds.x, k=k, cutoff=cutoff, h=args.bandwidth)
    common = {
        "statistic": args.statistic,
        "tolerance": args.tolerance,
        "max_step": args.max_step,
        "min_distance": args.min_distance,
    }
    if args.method == "gradient":
        steps = args.steps or 100
    else:
        steps = args.steps or 2000
    t0 = time.perf_counter()
    runs = []
    bar = None
    if not args.quiet and len(starts) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="generate", unit="structure", file=sys.stderr)
    try:
        for j, start in enumerate(starts):
            if args.method == "gradient":
                r = generate_to_target(
                    frames[start], bank, args.target, max_evaluations=steps, **common
                )
            else:
                r = random_walk_to_target(
                    frames[start],
                    bank,
                    args.target,
                    max_evaluations=steps,
                    step_std=args.step_std,
                    kT=args.kT,
                    seed=args.seed + j,
                    **common,
                )
            runs.append((start, args.seed + j, r))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(dH=f"{r.value:.3f}", reached="yes" if r.reached else "no")
    finally:
        if bar is not None:
            bar.close()
    timings["generate"] = round(time.perf_counter() - t0, 4)
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
    if _dist().rank() == 0:
        import ase.io

        atomic_write(Path(args.write), lambda p: ase.io.write(p, out, format=fmt))
    structures = [
        {
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
        for j, (start, seed, r) in enumerate(runs)
    ]
    results = {
        "n_structures": len(runs),
        "n_reached": sum(r.reached for *_, r in runs),
        "n_evaluations": sum(r.n_evaluations for *_, r in runs),
        "structures": structures,
    }
    result = _envelope(
        args,
        {
            "k": k,
            "cutoff": cutoff,
            "bandwidth": args.bandwidth,
            "dtype": args.dtype,
            "method": args.method,
            "target": args.target,
            "statistic": args.statistic,
            "tolerance": args.tolerance,
            "steps": steps,
            "max_step": args.max_step,
            "min_distance": args.min_distance,
            "seed": args.seed,
            "best_effort": args.best_effort,
        },
        inputs={"input": _input_info(ds)},
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


# --------------------------------------------------------------------------------------------
# parser and entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="quests-torch",
        description="QUESTS information entropy and uncertainty of atomistic data (PyTorch).",
        epilog="Inputs: any file ASE can read (extxyz, traj, POSCAR, LAMMPS dump, ...) or a "
        "descriptor file (.npz/.pt) written by `quests-torch descriptors`.",
    )
    parser.add_argument("--version", action="version", version=f"quests-torch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("descriptors", help="compute descriptors of structures, write .npz or .pt")
    p.add_argument("input", help="any file ASE can read")
    p.add_argument("-o", "--output", required=True, help="output descriptor file (.npz or .pt)")
    p.add_argument("--json", default=None, help="also write the run's results as JSON here")
    _add_common(p, bandwidth=False, json_out=False)
    p.set_defaults(func=cmd_descriptors)

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
    _add_rows(p)
    _add_common(p)
    p.set_defaults(func=cmd_entropy)

    p = sub.add_parser("dh", help="per-environment dH of test data against a reference")
    p.add_argument("input", help="test structures or descriptor file")
    _add_reference(p)
    p.add_argument("--threshold", type=_finite_float, default=0.0, help="novel if dH > this")
    p.add_argument("--top", type=_positive_int, default=10, help="report the N largest dH")
    p.add_argument("--save", default=None, help="write every dH to .npy or text")
    p.add_argument(
        "--approx",
        type=_positive_int,
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
    _add_plot(p)
    _add_common(p)
    p.set_defaults(func=cmd_dh)

    p = sub.add_parser("overlap", help="fraction of test data covered by a reference, both ways")
    p.add_argument("input", help="test structures or descriptor file")
    _add_reference(p)
    p.add_argument("--threshold", type=_finite_float, default=0.0, help="covered if dH <= this")
    _add_rows(p)
    _add_common(p)
    p.set_defaults(func=cmd_overlap)

    p = sub.add_parser(
        "learning-curve", help="entropy of random subsets, asymptote fit, information gap"
    )
    p.add_argument("input", help="structures or descriptor file")
    p.add_argument(
        "--sizes", default=None, help="comma-separated subset sizes (default 16 log-spaced)"
    )
    p.add_argument("--repeats", type=_positive_int, default=3, help="subsets per size")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_plot(p)
    _add_common(p)
    p.set_defaults(func=cmd_learning_curve)

    p = sub.add_parser("bandwidth", help="bandwidth rule h(volume per atom)")
    p.add_argument("input", nargs="?", default=None, help="periodic structures")
    p.add_argument("--volume", type=_positive_float, default=None, help="Å^3/atom instead")
    p.add_argument("--method", choices=["gaussian", "cutoff"], default="gaussian")
    p.add_argument("-i", "--index", default=":", help="ASE index/slice of frames (default ':')")
    p.add_argument("-o", "--output", default=None, help="write results as JSON here")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bandwidth)

    p = sub.add_parser(
        "screen", help="stream a trajectory: per-atom dH, novel atoms, solid-like clusters"
    )
    p.add_argument("trajectory", help="any ASE-readable trajectory (streamed, never loaded whole)")
    _add_reference(p)
    p.add_argument(
        "--table",
        default=None,
        help="per-frame table, .csv or .jsonl (default TRAJECTORY-STEM.screen.csv)",
    )
    p.add_argument("--extxyz", default=None, help="also write frames with per-atom dH (OVITO)")
    p.add_argument("--threshold", type=_finite_float, default=0.0, help="novel if dH > this")
    p.add_argument(
        "--cluster-cutoff", type=_positive_float, default=3.0, help="cluster edge length, Å"
    )
    p.add_argument(
        "--batch-atoms", type=_positive_int, default=None, help="atoms per batch (default auto)"
    )
    p.add_argument("--cache-dir", default=None, help="reference descriptor cache folder")
    p.add_argument("--no-cache", action="store_true", help="do not cache reference descriptors")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh over outputs of another screening (a changed trajectory, "
        "reference or parameter, or an edited table)",
    )
    _add_plot(p)
    _add_common(p)
    p.set_defaults(func=cmd_screen)

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
        type=_size_option,
        default=0.1,
        help="structures to keep: a count (200) or a fraction (0.3; default 0.1)",
    )
    p.add_argument(
        "-r",
        "--reference",
        default=None,
        help="msc_conditional: the dataset you already have (structures or descriptor file)",
    )
    p.add_argument(
        "--reference-index", default=":", help="ASE index/slice of reference frames (default ':')"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of random/k_means (default 0)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="msc/msc_conditional/fps: save the selection state here and resume from it "
        "when rerun (a larger -s extends it)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_float,
        default=60.0,
        help="seconds between checkpoint saves (default 60)",
    )
    p.add_argument(
        "--threshold", type=_finite_float, default=0.0, help="covered if dH <= this (overlap)"
    )
    p.add_argument(
        "-o",
        "--output",
        dest="outputs",
        action="append",
        default=None,
        help="selected structures (.extxyz/.xyz, info and arrays kept) or indices and metrics "
        "(.json); repeat for both",
    )
    _add_plot(p)
    _add_common(p, json_out=False)
    p.set_defaults(func=cmd_compress)

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
    p.add_argument("--threshold", type=_finite_float, default=0.0, help="novel if dH > this")
    _add_plot(p)
    _add_common(p)
    p.set_defaults(func=cmd_generations)

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
        type=_positive_int,
        default=1,
        help="structures to generate, each from its own start (drawn) or seed (default 1; "
        "a progress bar on stderr when more than one)",
    )
    p.add_argument("--target", type=_finite_float, required=True, help="target dH (nats)")
    p.add_argument("--statistic", choices=["max", "mean"], default="max", help="of per-atom dH")
    p.add_argument(
        "--tolerance",
        type=_positive_float,
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
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="descriptor evaluations per structure (default 100 gradient, 2000 random-walk)",
    )
    p.add_argument(
        "--max-step", type=_positive_float, default=0.05, help="largest move of an atom, Å"
    )
    p.add_argument(
        "--min-distance",
        type=_finite_float,
        default=1.5,
        help="smallest interatomic distance allowed, Å (default 1.5)",
    )
    p.add_argument(
        "--step-std", type=_positive_float, default=0.02, help="random-walk: displacement std, Å"
    )
    p.add_argument(
        "--kT", type=_positive_float, default=0.1, help="random-walk: Metropolis temperature"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="start structures and random-walk seed (default 0)"
    )
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
    g = p.add_argument_group("common options")
    g.add_argument("-k", type=_k_option, default=None, help=f"default {DEFAULT_K}")
    g.add_argument("-c", "--cutoff", type=_positive_float, default=None, help="Å (default 5)")
    g.add_argument(
        "-b",
        "--bandwidth",
        type=_positive_float,
        default=DEFAULT_BANDWIDTH,
        help=f"kernel bandwidth h in 1/Å (default {DEFAULT_BANDWIDTH})",
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    g.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    g.add_argument("-o", "--output", default=None, help="write results as JSON here")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the built-in example: EMT Cu solid reference, heated to melt")
    p.add_argument("--outdir", default="demo-output", help="results folder (default demo-output)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG figures")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
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
            started = _dist().init_from_env()
        except (RuntimeError, ValueError) as exc:
            print(f"{prog}: error: cannot join the torch.distributed group: {exc}", file=sys.stderr)
            return 2
        lead = _dist().rank() == 0
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
    try:
        _check_outputs(args)
        result, lines = args.func(args)
        out = getattr(args, "output", None) if args.command != "descriptors" else args.json
        if out and lead:
            text = json.dumps(result, indent=2, default=_json_default) + "\n"
            atomic_write(Path(out), lambda p: p.write_text(text))
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


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
