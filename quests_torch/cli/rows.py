"""The cost rule of ``--rows N|auto|all`` and of progress bars.

``--rows N`` sampled rows with exact kernel sums against the whole set give estimates with
error bars (:mod:`quests_torch.estimates`); ``auto`` (the default) stays exact unless the exact
sums would take over an hour at the documented float64 pair rate (:data:`PAIR_RATE`: 3e8
pairs/s on a CPU, 5e10 on a GPU), then samples 20,000 rows and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings

import torch

from .options import CLIError

#: kernel passes with more pairs than this show a progress bar (about a second on a CPU)
PROGRESS_PAIRS = 200_000_000
#: float64 kernel evaluations per second used by the ``--rows auto`` rule: measured 0.32-0.40
#: G/s on the 2-core CPU of the benchmarks (docs/guide/benchmarks.md) and 5.4e10 on one H200
#: (exact entropy of 10^6 environments, 5e11 pairs, in 9.2 s; docs/guide/gpu.md)
PAIR_RATE = {"cpu": 3e8, "cuda": 5e10}
#: ``--rows auto`` samples rows when the exact kernel sums would take longer than this (s)
EXACT_SECONDS = 3600.0


def progress(args: argparse.Namespace, pairs: float) -> bool:
    """Whether a kernel pass of ``pairs`` pairs shows a progress bar."""
    return not args.quiet and pairs > PROGRESS_PAIRS


def auto_rows(
    args: argparse.Namespace, pairs: float, device: torch.device, what: str, n: int | None = None
):
    """``--rows`` resolved for a kernel pass of ``pairs`` exact pairs: ``(rows, message)``.

    ``all`` -> ``None`` (exact), an int -> itself (checked against ``n`` when given);
    ``auto`` -> exact unless ``pairs / PAIR_RATE[device] > EXACT_SECONDS`` (an hour), then
    :data:`quests_torch.estimates.AUTO_ROWS` sampled rows, with a message saying so.
    """
    from ..estimates import AUTO_ROWS

    if args.rows == "all":
        return None, None
    if args.rows != "auto":
        if n is not None and not 2 <= args.rows <= n:
            raise CLIError(f"--rows {args.rows}: must lie in [2, {n:,}] (the rows of {what})")
        return args.rows, None
    rate = PAIR_RATE.get(device.type, PAIR_RATE["cpu"])
    seconds = pairs / rate
    if seconds <= EXACT_SECONDS:
        return None, None
    rows = AUTO_ROWS if n is None else min(AUTO_ROWS, n)
    message = (
        f"{what}: the exact sums ({pairs:.2g} pairs) would take ~{seconds / 3600:.1f} h at "
        f"~{rate:.0e} pairs/s on {device.type}; estimating from {rows:,} sampled rows "
        "(--rows all: exact, --rows N: N rows)"
    )
    return rows, message


def rows_record(message: str | None, notes: list[str]) -> dict:
    """``rows_rule`` (the ``--rows auto`` message) and ``notes`` of an estimate, when set."""
    return {**({"rows_rule": message} if message else {}), **({"notes": notes} if notes else {})}


def say(args: argparse.Namespace, message: str | None) -> None:
    """A note printed before a long computation (not with ``--quiet``)."""
    if message and not args.quiet:
        print(message, flush=True)


@contextlib.contextmanager
def estimate_notes():
    """Collect :class:`quests_torch.estimates.EstimateWarning` texts as summary notes."""
    from ..estimates import EstimateWarning

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EstimateWarning)
        yield notes
    notes += [str(w.message) for w in caught if issubclass(w.category, EstimateWarning)]
    for w in caught:  # anything else is shown as it would have been
        if not issubclass(w.category, EstimateWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
