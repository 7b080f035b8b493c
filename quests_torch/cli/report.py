"""Formatting shared by the commands: the JSON envelope, input records, estimate texts.

Every command returns ``(result, lines)``: ``result`` is the JSON document written with ``-o``
(``command``, ``versions``, ``parameters``, then the command's ``inputs``, ``timings``,
``results``, ``files``, ``device``), ``lines`` the readable summary printed unless ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..io import DescriptorSet, atomic_write, is_descriptor_file


def input_info(ds: DescriptorSet) -> dict:
    """The ``inputs`` record of a loaded input."""
    return {
        "path": ds.source,
        "kind": "descriptors" if is_descriptor_file(ds.source) else "structures",
        "n_structures": len(ds.n_atoms),
        "n_environments": int(ds.x.shape[0]),
    }


def versions() -> dict:
    import ase

    return {
        "quests_torch": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ase": ase.__version__,
        "python": platform.python_version(),
    }


def parameters(args: argparse.Namespace, k: int, cutoff: float, *names: str) -> dict:
    """The ``parameters`` record: ``k``, ``cutoff``, then the options ``names`` in order."""
    return {"k": k, "cutoff": cutoff, **{name: getattr(args, name) for name in names}}


def envelope(args: argparse.Namespace, parameters: dict, **rest) -> dict:
    """The JSON document of a run: command, versions, parameters, then ``rest`` in order."""
    return {
        "command": args.command,
        "versions": versions(),
        "parameters": parameters,
        **rest,
    }


def estimate_text(name: str, est, unit: str = " nats", scale: float = 1.0, decimals: int = 3):
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


def plot_path(prefix: str, name: str) -> str:
    """The PNG path of figure ``name`` for ``--plot PREFIX``."""
    return f"{prefix}{name}.png" if prefix.endswith(("/", "-", "_")) else f"{prefix}-{name}.png"


def wrote(files) -> list[str]:
    return [f"  wrote {f}" for f in files]


def json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, result: dict) -> None:
    """``result`` as indented JSON, written atomically."""
    text = json.dumps(result, indent=2, default=json_default) + "\n"
    atomic_write(Path(path), lambda p: p.write_text(text))
