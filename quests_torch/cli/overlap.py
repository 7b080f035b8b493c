"""``quests-torch overlap``: fraction of test data covered by a reference, both ways.

Exact by default; ``--rows N`` (or ``auto`` for passes longer than an hour) estimates both
directions from sampled rows with error bars (:func:`quests_torch.metrics.estimate_overlap`).
"""

from __future__ import annotations

import argparse
import time

from .dh import dh_params, exact_dh
from .inputs import Pair, load_pair
from .options import add_common, add_reference, add_rows, add_threshold
from .report import envelope, estimate_text, input_info
from .rows import auto_rows, estimate_notes, progress, rows_record, say


def register(sub) -> None:
    p = sub.add_parser("overlap", help="fraction of test data covered by a reference, both ways")
    p.add_argument("input", help="test structures or descriptor file")
    add_reference(p)
    add_threshold(p, "covered if dH <= this")
    add_rows(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace):
    from ..distributed import delta_entropy

    pair = load_pair(args)
    n_test, n_ref = int(pair.test.x.shape[0]), int(pair.ref.x.shape[0])
    pairs = 2.0 * n_test * n_ref
    rows, message = auto_rows(args, pairs, pair.test.x.device, f"{args.input} vs {args.reference}")
    say(args, message)
    if rows is not None:
        return _estimates(args, pair, rows, message)
    dh = exact_dh(args, pair)
    t0 = time.perf_counter()
    back = delta_entropy(pair.ref.x, pair.test.x, args.bandwidth)
    pair.timings["kernel"] = round(pair.timings["kernel"] + time.perf_counter() - t0, 4)
    res = {
        "overlap": float((dh <= args.threshold).double().mean()),
        "overlap_reverse": float((back <= args.threshold).double().mean()),
        "n_test": n_test,
        "n_reference": n_ref,
    }
    result = envelope(
        args,
        dh_params(args, pair.k, pair.cutoff),
        inputs={"test": input_info(pair.test), "reference": input_info(pair.ref)},
        timings=pair.timings,
        results=res,
        device=str(dh.device),
    )
    lines = [
        f"overlap (fraction with dH <= {args.threshold:g}), h={args.bandwidth:g}:",
        f"  {args.input} covered by {args.reference}: {100 * res['overlap']:.2f} % of {n_test}",
        f"  {args.reference} covered by {args.input}: {100 * res['overlap_reverse']:.2f} % of "
        f"{n_ref}",
    ]
    return result, lines


def _estimates(args: argparse.Namespace, pair: Pair, rows: int, message: str | None):
    """``overlap --rows``: both directions from at most ``rows`` sampled rows of each set
    (each sample drawn with ``--seed``).

    Under torchrun every rank computes the same estimates (same seed): ``m n`` pairs each.
    """
    from ..metrics import estimate_overlap

    t0 = time.perf_counter()
    with estimate_notes() as notes:
        est, back = [
            estimate_overlap(
                a.x,
                b.x,
                args.bandwidth,
                args.threshold,
                rows=min(rows, a.x.shape[0]),
                generator=args.seed,
                progress=progress(args, min(rows, a.x.shape[0]) * b.x.shape[0]),
            )
            for a, b in ((pair.test, pair.ref), (pair.ref, pair.test))
        ]
    pair.timings["kernel"] = round(time.perf_counter() - t0, 4)
    return _estimates_report(args, pair, est, back, message, notes)


def _estimates_report(args, pair: Pair, est, back, message, notes):
    res = {
        "overlap": est.value,
        "overlap_reverse": back.value,
        "n_test": est.n,
        "n_reference": back.n,
        "overlap_estimate": est.as_dict(),
        "overlap_reverse_estimate": back.as_dict(),
    }
    res.update(rows_record(message, notes))
    result = envelope(
        args,
        {**dh_params(args, pair.k, pair.cutoff), "rows": args.rows, "seed": args.seed},
        inputs={"test": input_info(pair.test), "reference": input_info(pair.ref)},
        timings=pair.timings,
        results=res,
        device=str(pair.test.x.device),
    )
    lines = [
        f"overlap (fraction with dH <= {args.threshold:g}), h={args.bandwidth:g}, "
        "from sampled rows:",
        f"  {args.input} covered by {args.reference}: {estimate_text('', est, ' %', 100.0, 2)}",
        f"  {args.reference} covered by {args.input}: {estimate_text('', back, ' %', 100.0, 2)}",
    ]
    lines += [f"  note: {t}" for t in notes]
    return result, lines
