"""``quests-torch learning-curve``: entropy of random subsets, asymptote fit, information gap."""

from __future__ import annotations

import argparse
import time

from .inputs import load, params
from .options import CLIError, add_common, add_plot, add_seed, positive_int
from .report import envelope, input_info, parameters, plot_path, wrote


def register(sub) -> None:
    p = sub.add_parser(
        "learning-curve", help="entropy of random subsets, asymptote fit, information gap"
    )
    p.add_argument("input", help="structures or descriptor file")
    p.add_argument(
        "--sizes", default=None, help="comma-separated subset sizes (default 16 log-spaced)"
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="subsets per size")
    add_seed(p)
    add_plot(p)
    add_common(p)
    p.set_defaults(func=run)


def _sizes(args: argparse.Namespace, n: int) -> list[int] | None:
    """``--sizes``: sorted distinct subset sizes within ``[1, n]``, or ``None`` (default grid)."""
    if not args.sizes:
        return None
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        raise CLIError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    bad = [s for s in sizes if not 1 <= s <= n]
    if bad:
        raise CLIError(f"--sizes {bad} outside [1, {n}] (the environments of the input)")
    return sizes


def run(args: argparse.Namespace):
    from ..distributed import entropy_learning_curve
    from ..metrics import fit_entropy_asymptote

    k, cutoff, stored = params(args, [args.input])
    timings: dict = {}
    ds = load(args.input, args.index, k, cutoff, args, stored, timings, "input")
    n = ds.x.shape[0]
    sizes = _sizes(args, n)
    t0 = time.perf_counter()
    curve = entropy_learning_curve(
        ds.x, args.bandwidth, sizes=sizes, repeats=args.repeats, generator=args.seed
    )
    timings["kernel"] = round(time.perf_counter() - t0, 4)
    s_np = curve.sizes.numpy()
    mean = curve.mean.detach().cpu().double().numpy()
    std = curve.std.detach().cpu().double().numpy()
    fit = fit_error = None
    try:
        fit = dict(fit_entropy_asymptote(s_np, mean)._asdict())
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
        from ..plots import plot_learning_curve

        path = plot_path(args.plot, "learning-curve")
        files.append(str(plot_learning_curve(path, s_np, mean, std, fit)))
    return report(args, k, cutoff, ds, res, timings, files)


def report(args, k: int, cutoff: float, ds, res: dict, timings: dict, files: list):
    """The JSON document and summary lines of ``learning-curve``."""
    result = envelope(
        args,
        parameters(args, k, cutoff, "bandwidth", "repeats", "seed", "dtype"),
        inputs={"input": input_info(ds)},
        timings=timings,
        results=res,
        files=files,
        device=str(ds.x.device),
    )
    n, fit = ds.x.shape[0], res["fit"]
    lines = [f"entropy learning curve of {args.input} ({n} environments, h={args.bandwidth:g})"]
    lines.append(f"  {'N':>8s} {'H mean':>9s} {'H std':>8s}")
    for s, m, sd in zip(res["sizes"], res["entropy_mean"], res["entropy_std"], strict=True):
        lines.append(f"  {int(s):8d} {m:9.4f} {sd:8.4f}")
    if fit:
        lines.append(
            f"  fit H(N) = a - b N^-c: a = H_inf = {fit['h_inf']:.4f}, b = {fit['b']:.4g}, "
            f"c = {fit['c']:.4g} (rmse {fit['rmse']:.2g}, {fit['n_points']} points)"
        )
        lines.append(
            f"  information gap at N = {int(res['sizes'][-1])}: {res['information_gap']:.4f} nats"
        )
    else:
        lines.append(f"  no asymptote fit: {res['fit_error']}")
    lines += wrote(files)
    return result, lines
