"""``quests-torch demo``: the built-in example (:func:`quests_torch.demo.run_demo`): an EMT Cu
solid reference, heated to melt and screened against it."""

from __future__ import annotations

import argparse

from .inputs import device
from .options import add_device


def register(sub) -> None:
    p = sub.add_parser("demo", help="the built-in example: EMT Cu solid reference, heated to melt")
    p.add_argument("--outdir", default="demo-output", help="results folder (default demo-output)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG figures")
    add_device(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace):
    from ..demo import run_demo

    result = run_demo(
        device=device(args), quiet=args.quiet, outdir=args.outdir, plots=not args.no_plot
    )
    return result, []
