"""Input loading shared by the commands: structures or descriptor files, reconciled parameters.

An input is any file ASE can read (with ``-i`` an ASE index/slice), a descriptor file
(``.npz``/``.pt`` written by ``descriptors``) or a descriptor store (``.qstore``, see
:mod:`quests_torch.store`) that records ``k`` and the cutoff: comparing descriptors made with
different parameters is an error. A store is memory-mapped: the commands whose kernels read
tile by tile (``entropy``, ``dh``, ``overlap``: ``load(..., stream=True)``) get the store
itself, read in ``--dtype`` tile by tile on the CPU; the others a tensor backed by its file
(a copy only when ``--dtype`` or ``--device`` differ from the store's).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..checks import DEFAULT_CUTOFF, DEFAULT_K
from ..io import (
    DescriptorSet,
    cached_descriptors,
    is_descriptor_file,
    load_descriptors,
)
from ..io import read_structures as _read_structures
from ..store import StoreInUseError
from ..structures import resolve_device
from .options import CLIError, dtype


def read_structures(path: str, index: str = ":", types: dict | None = None) -> list:
    """Structures from any file ASE can read, with an ASE index/slice (``":"``, ``"0:10"``)
    (``types``: of a LAMMPS dump, ``--types``)."""
    try:
        return _read_structures(path, index, types=types)
    except (FileNotFoundError, IsADirectoryError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def dist():
    """:mod:`quests_torch.distributed` (imported lazily): the API under ``torchrun``, the
    plain single-process functions otherwise."""
    from .. import distributed

    return distributed


def device(args: argparse.Namespace) -> torch.device:
    """The compute device of ``--device``."""
    try:
        return resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        raise CLIError(f"--device {args.device}: {exc}") from None


def params(args: argparse.Namespace, paths: Sequence[str]) -> tuple[int, float, dict]:
    """``(k, cutoff, stored)`` for the inputs: descriptor files' stored values must agree with
    each other and with ``-k``/``--cutoff``; ``stored`` maps each descriptor file to its set."""
    stored: dict[str, DescriptorSet] = {}
    for path in paths:
        if path is not None and is_descriptor_file(path):
            try:
                stored[path] = load_descriptors(path)
            except (FileNotFoundError, IsADirectoryError, ValueError, StoreInUseError) as exc:
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


def load(
    path: str,
    index: str,
    k: int,
    cutoff: float,
    args: argparse.Namespace,
    stored: dict,
    timings: dict,
    label: str,
    cache: bool = False,
    stream: bool = False,
) -> DescriptorSet:
    """Descriptors of an input: read from a descriptor file or computed from structures
    (``cache``: through the descriptor cache of ``--cache-dir``/``--no-cache``; ``stream``:
    a descriptor store on the CPU stays a :class:`~quests_torch.store.DescriptorStore` read
    tile by tile in ``--dtype``, for commands that only pass it to the kernels)."""
    t0 = time.perf_counter()
    dev, dt = device(args), dtype(args.dtype)
    if path in stored:
        ds = stored[path]
        if index != ":":
            raise CLIError(f"{path}: -i/--index selects frames of structure files only")
        store = ds.meta.get("store")
        if store is not None and stream and dev.type == "cpu":
            ds.x = store.as_dtype(dt)
        else:
            ds.x = (store.tensor() if store is not None else ds.x).to(device=dev, dtype=dt)
        timings[f"{label}_read"] = round(time.perf_counter() - t0, 4)
        return ds
    if cache:
        try:
            ds, hit = cached_descriptors(
                path,
                index=index,
                k=k,
                cutoff=cutoff,
                dtype=dt,
                device=dev,
                cache_dir=getattr(args, "cache_dir", None),
                use_cache=not getattr(args, "no_cache", False),
                types=getattr(args, "types", None),
            )
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise CLIError(str(exc)) from None
        ds.x = ds.x.to(device=dev, dtype=dt)
        ds.meta["cache_hit"] = hit
        timings[f"{label}_descriptors"] = round(time.perf_counter() - t0, 4)
        return ds
    return from_structures(path, index, k, cutoff, args, timings, label)[1]


def from_structures(path, index, k, cutoff, args, timings, label):
    """(frames, DescriptorSet) of a structure file: read, then descriptors (split over ranks)."""
    t0 = time.perf_counter()
    frames = read_structures(path, index, getattr(args, "types", None))
    t1 = time.perf_counter()
    x = dist().get_descriptors(
        frames, k=k, cutoff=cutoff, dtype=dtype(args.dtype), device=device(args)
    )
    timings[f"{label}_read"] = round(t1 - t0, 4)
    timings[f"{label}_descriptors"] = round(time.perf_counter() - t1, 4)
    counts = np.array([len(a) for a in frames], dtype=np.int64)
    return frames, DescriptorSet(x, counts, k, cutoff, args.dtype, path)


def structures_and_descriptors(path, index, k, cutoff, args, stored, timings, label):
    """(frames or None, DescriptorSet): frames are kept for writing structures back."""
    if path in stored:
        return None, load(path, index, k, cutoff, args, stored, timings, label)
    return from_structures(path, index, k, cutoff, args, timings, label)


class Pair(NamedTuple):
    """The inputs of a test-vs-reference command (``dh``, ``overlap``)."""

    k: int
    cutoff: float
    timings: dict
    test: DescriptorSet
    ref: DescriptorSet


def load_pair(args: argparse.Namespace) -> Pair:
    """Test (``input``, ``-i``) and reference (``-r``, ``--reference-index``) descriptors."""
    k, cutoff, stored = params(args, [args.input, args.reference])
    timings: dict = {}
    test = load(args.input, args.index, k, cutoff, args, stored, timings, "test", stream=True)
    ref = load(
        args.reference, args.reference_index, k, cutoff, args, stored, timings, "reference",
        stream=True,
    )  # fmt: skip
    return Pair(k, cutoff, timings, test, ref)


def system_idx(ds: DescriptorSet) -> torch.Tensor:
    """``[n_environments]`` structure index of each row of ``ds``."""
    counts = torch.as_tensor(ds.n_atoms, device=ds.x.device)
    return torch.repeat_interleave(torch.arange(len(ds.n_atoms), device=ds.x.device), counts)
