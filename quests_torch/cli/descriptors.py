"""``quests-torch descriptors``: compute descriptors of structures, write ``.npz``, ``.pt`` or a
descriptor store (``.qstore``: streamed frame by frame, resumable, memory-mapped by readers;
see :mod:`quests_torch.store`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..checks import DEFAULT_CUTOFF, DEFAULT_K
from ..io import is_descriptor_file, save_descriptors
from ..store import STORE_SUFFIX, StoreInUseError, is_store
from .inputs import dist, load
from .options import CLIError, add_common, add_readers, dtype, positive_int, readers_of
from .report import envelope, input_info


def register(sub) -> None:
    p = sub.add_parser(
        "descriptors", help="compute descriptors of structures, write .npz, .pt or a .qstore"
    )
    p.add_argument("input", help="any file ASE can read")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output descriptor file (.npz or .pt) or descriptor store (.qstore folder: "
        "streamed, resumable, memory-mapped; --dtype is its storage dtype)",
    )
    p.add_argument("--json", default=None, help="also write the run's results as JSON here")
    p.add_argument(
        "--batch-atoms",
        type=positive_int,
        default=None,
        help="atoms per batch written to a .qstore (default 100000)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a .qstore afresh (by default an interrupted run resumes; a store of "
        "another trajectory or parameters is refused)",
    )
    add_readers(p)
    add_common(p, bandwidth=False, json_out=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace):
    if is_descriptor_file(args.input):
        raise CLIError(f"{args.input}: already a descriptor file; give a structure file")
    out = Path(args.output)
    if not is_descriptor_file(out):
        raise CLIError(
            f"-o {out}: descriptor output must end in .npz or .pt, or be a {STORE_SUFFIX} store"
        )
    k, cutoff = args.k or DEFAULT_K, args.cutoff or DEFAULT_CUTOFF
    if is_store(out):
        return _run_store(args, out, k, cutoff)
    timings: dict = {}
    ds = load(args.input, args.index, k, cutoff, args, {}, timings, "input")
    t0 = time.perf_counter()
    if dist().rank() == 0:  # under torchrun every rank holds the rows; one writes them
        save_descriptors(out, ds.x, ds.n_atoms, k=k, cutoff=cutoff, dtype=args.dtype)
    timings["write"] = round(time.perf_counter() - t0, 4)
    return report(args, ds, out, k, cutoff, timings)


def _run_store(args: argparse.Namespace, out: Path, k: int, cutoff: float):
    """``-o name.qstore``: stream the frames into a store (resuming an interrupted run)."""
    from ..io import DescriptorSet
    from ..store_writer import write_descriptor_store
    from .inputs import device

    if dist().world_size() > 1:
        raise CLIError(
            f"-o {out}: a descriptor store is written by one process; run without torchrun"
        )
    before = _committed(out, args.overwrite)
    t0 = time.perf_counter()
    try:
        store = write_descriptor_store(
            args.input,
            out,
            index=args.index,
            k=k,
            cutoff=cutoff,
            dtype=dtype(args.dtype),
            device=device(args),
            batch_atoms=args.batch_atoms,
            overwrite=args.overwrite,
            progress=not args.quiet,
            readers=readers_of(args),
            types=args.types,
        )
    except (FileNotFoundError, ValueError, StoreInUseError) as exc:
        raise CLIError(str(exc)) from None
    timings = {"input_descriptors": round(time.perf_counter() - t0, 4)}
    ds = DescriptorSet(store, store.n_atoms, k, cutoff, store.dtype, args.input)
    result, lines = report(args, ds, out, k, cutoff, timings, where=device(args))
    result["results"].update(frames_resumed=before[0], already_complete=before[1])
    if before[1]:
        lines.append(f"{out}: already complete, nothing computed (--overwrite starts again)")
    elif before[0]:
        lines.append(f"{out}: resumed after {before[0]} committed structures")
    return result, lines


def _committed(out: Path, overwrite: bool) -> tuple[int, bool]:
    """``(structures committed, complete)`` of the store at ``out`` before this run."""
    from ..store import read_meta

    try:
        meta = read_meta(out)
    except (OSError, ValueError):
        return 0, False
    if overwrite:
        return 0, False
    frames = meta.get("frames")
    return (frames if isinstance(frames, int) else 0), meta.get("complete") is True


def report(args, ds, out: Path, k: int, cutoff: float, timings: dict, where=None):
    where = ds.x.device if where is None else where
    result = envelope(
        args,
        {"k": k, "cutoff": cutoff, "dtype": args.dtype, "index": args.index},
        inputs={"input": input_info(ds)},
        timings=timings,
        results={"output": str(out), "width": int(ds.x.shape[1])},
        device=str(where),
    )
    lines = [
        f"{args.input}: {len(ds.n_atoms)} structures, {ds.x.shape[0]} environments "
        f"-> {out} [{ds.x.shape[0]} x {ds.x.shape[1]}, k={k}, cutoff={cutoff:g} Å, {args.dtype}]",
        f"descriptors {timings['input_descriptors']:.2f} s on {where}",
    ]
    return result, lines
