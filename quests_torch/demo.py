"""The built-in example behind ``quests-torch demo`` / ``make demo``: melting of EMT copper.

Generated with ASE alone (EMT potential, seeded Langevin MD, 5 fs steps; about a minute on a
2-core CPU), then run through the same pipeline as ``quests-torch screen``:

1. *Reference*: a 256-atom FCC Cu cell (a = 3.61 Å) heated from 300 K to 900 K, well below
   melting, 20 snapshots (5,120 solid environments). Its entropy, diversity and entropy
   learning curve (with the asymptote fit and information gap) describe how much it covers.
2. *Trajectory*: the same cell heated from 300 K to 2,500 K at fixed volume (60 frames,
   6 ps), written to ``heating.extxyz`` and streamed frame by frame through
   :func:`quests_torch.screening.screen_trajectory`: per-atom dH against the reference,
   fraction of novel atoms (dH > 0) and the largest cluster of solid-like atoms (dH <= 0,
   joined within 3.0 Å across periodic images) per frame. The largest cluster spans the
   whole cell while the solid is heated, then collapses as the cell melts.

Outputs (``demo-output/`` by default): the two trajectories, the per-frame table
``heating.screen.csv``, ``heating-dH.extxyz`` (per-atom ``dH`` and ``cluster`` arrays, for
colouring in OVITO), ``demo.json`` and three figures: the entropy learning curve, the dH
histogram of the last frames and the screening timeline against temperature.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .descriptors import get_descriptors
from .io import atomic_write

__all__ = ["emt_copper_frames", "run_demo"]

REPS = 4  # 4 x 4 x 4 cubic cells: 256 atoms


def emt_copper_frames(
    t_start: float,
    t_end: float | None = None,
    n_frames: int = 8,
    steps_between: int = 10,
    equilibrate: int = 60,
    reps: int = REPS,
    seed: int = 0,
) -> list:
    """Snapshots of EMT Cu Langevin MD, the thermostat ramped linearly from ``t_start``.

    Cubic FCC, a = 3.61 Å, ``4 * reps^3`` atoms, fixed volume, 5 fs steps, friction 0.02.

    Args:
        t_start: thermostat temperature (K) of the equilibration and of the first snapshot.
        t_end: thermostat temperature of the last snapshot (default: ``t_start``, no ramp).
        n_frames: snapshots returned.
        steps_between: MD steps before each snapshot.
        equilibrate: MD steps at ``t_start`` before the first snapshot's steps.
        reps: cubic cells per direction.
        seed: random seed of the initial velocities and thermostat.

    Returns:
        list of ``ase.Atoms`` with ``info["temperature_K"]`` (thermostat target) and
        ``info["kinetic_temperature_K"]``.
    """
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.units import fs

    t_end = t_start if t_end is None else t_end
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (reps, reps, reps)
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        MaxwellBoltzmannDistribution(atoms, temperature_K=t_start, rng=rng)
        dyn = Langevin(atoms, 5 * fs, temperature_K=t_start, friction=0.02, fixcm=False, rng=rng)
    dyn.run(equilibrate)
    frames = []
    for i in range(n_frames):
        target = t_start + (t_end - t_start) * i / max(n_frames - 1, 1)
        dyn.set_temperature(temperature_K=target)
        dyn.run(steps_between)
        frame = atoms.copy()
        frame.calc = None
        frame.info["temperature_K"] = round(target, 3)
        frame.info["kinetic_temperature_K"] = round(float(atoms.get_temperature()), 3)
        frames.append(frame)
    return frames


def run_demo(
    device: torch.device | str = "cpu",
    quiet: bool = False,
    outdir: str | Path | None = "demo-output",
    plots: bool = True,
) -> dict:
    """Run the demo: build the data, screen the heating run, print a summary, write outputs.

    Args:
        device: where descriptors and kernel sums run.
        quiet: print nothing.
        outdir: output folder (default ``demo-output``); ``None`` uses a temporary folder
            that is removed afterwards (no plots then).
        plots: write the PNG figures.

    Returns:
        The results (also written to ``outdir/demo.json``).
    """
    import tempfile

    def say(msg: str = "") -> None:
        if not quiet:
            print(msg, flush=True)

    tmp = None
    if outdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="quests-torch-demo-")
        out = Path(tmp.name)
        plots = False
    else:
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    n_atoms = 4 * REPS**3
    say(f"quests-torch demo: melting of EMT copper ({n_atoms}-atom FCC cell, ASE Langevin MD)")
    ref_path, traj_path, temps = _write_data(out, timings, say)
    ref = _reference(ref_path, device, timings, say)
    screen = _screen(traj_path, ref["x"], out, temps, device, timings, say)
    files = [str(p) for p in (ref_path, traj_path, screen["table_path"], out / "heating-dH.extxyz")]
    dh_last = None
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            say("  (matplotlib is not installed: no figures; pip install matplotlib)")
            plots = False
    if plots:
        dh_last = _figures(out, ref, screen["table"], temps, files, timings)
    elapsed = time.perf_counter() - t_start
    result = _result(ref, screen, temps, timings, elapsed, files)
    if dh_last is not None:
        result["screening"]["dH_last10_mean"] = float(dh_last.mean())
    atomic_write(out / "demo.json", lambda p: p.write_text(json.dumps(result, indent=2)))
    say(f"  wrote {len(files) + 1} files to {out}/ in {elapsed:.1f} s")
    if tmp is not None:
        tmp.cleanup()
    return result


def _write_data(out: Path, timings: dict, say) -> tuple[Path, Path, np.ndarray]:
    """The reference (solid heated 300 -> 900 K) and the trajectory (heated 300 -> 2500 K until
    it melts), written as extxyz; returns their paths and the trajectory's temperatures."""
    import ase.io

    t0 = time.perf_counter()
    ref_frames = emt_copper_frames(300.0, 900.0, n_frames=20, steps_between=10, seed=1)
    timings["md_reference"] = time.perf_counter() - t0
    say(f"  reference   : solid 300 -> 900 K, 20 frames ({timings['md_reference']:.1f} s MD)")
    t0 = time.perf_counter()
    traj_frames = emt_copper_frames(
        300.0, 2500.0, n_frames=60, steps_between=20, equilibrate=20, seed=3
    )
    timings["md_trajectory"] = time.perf_counter() - t0
    say(f"  trajectory  : heated 300 -> 2500 K, 60 frames ({timings['md_trajectory']:.1f} s MD)")
    ref_path, traj_path = out / "reference.extxyz", out / "heating.extxyz"
    atomic_write(ref_path, lambda p: ase.io.write(p, ref_frames, format="extxyz"))
    atomic_write(traj_path, lambda p: ase.io.write(p, traj_frames, format="extxyz"))
    temps = np.array([f.info["temperature_K"] for f in traj_frames])
    return ref_path, traj_path, temps


def _reference(ref_path: Path, device, timings: dict, say) -> dict:
    """The reference's descriptors, H, D and entropy learning curve with its asymptote fit."""
    import ase.io

    from .metrics import dataset_summary, entropy_learning_curve, fit_entropy_asymptote

    t0 = time.perf_counter()
    x_ref = get_descriptors(ase.io.read(ref_path, ":"), device=device)
    timings["reference_descriptors"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = dataset_summary(x_ref)
    curve = entropy_learning_curve(x_ref, repeats=3, generator=0)
    sizes = curve.sizes.numpy()
    mean = curve.mean.detach().cpu().double().numpy()
    std = curve.std.detach().cpu().double().numpy()
    fit = fit_entropy_asymptote(sizes, mean)
    timings["reference_metrics"] = time.perf_counter() - t0
    say(
        f"  reference   : {x_ref.shape[0]} environments, H = {float(summary.entropy):.3f} "
        f"nats (log n = {summary.log_n:.3f}), D = {float(summary.diversity):.3f}"
    )
    gap = fit.h_inf - mean[-1]
    note = " (saturated: more of the same solid adds no information)" if gap < 0.05 else ""
    say(
        f"                learning curve H(N) -> H_inf = {fit.h_inf:.3f} nats, information gap "
        f"{gap:.3f} nats{note}"
    )
    return {"x": x_ref, "summary": summary, "sizes": sizes, "mean": mean, "std": std, "fit": fit}


def _screen(traj_path: Path, x_ref, out: Path, temps, device, timings: dict, say) -> dict:
    """Screen the heating run (the streaming, resumable pipeline of ``quests-torch screen``)
    and print every sixth frame of its table."""
    from .screening import read_frame_table, screen_trajectory

    table_path = out / "heating.screen.csv"
    res = screen_trajectory(
        traj_path,
        x_ref,
        table_path,
        extxyz=out / "heating-dH.extxyz",
        device=device,
        overwrite=True,
    )
    timings["screen"] = res.seconds
    table = read_frame_table(table_path)
    s = res.summary
    say(
        f"  screening   : {s['n_frames']} frames, {s['n_atoms']} atoms in {res.seconds:.1f} s "
        f"(descriptors {res.timings.descriptors:.2f} s, kernel {res.timings.kernel:.2f} s, "
        f"clusters {res.timings.clusters:.2f} s)"
    )
    say()
    say(
        f"  {'frame':>5s} {'T (K)':>7s} {'dH max':>8s} {'dH mean':>8s} {'novel':>7s} "
        f"{'largest solid cluster':>22s}"
    )
    for i in range(0, s["n_frames"], 6):
        say(
            f"  {i:5d} {temps[i]:7.0f} {table['dH_max'][i]:8.2f} {table['dH_mean'][i]:8.2f} "
            f"{100 * table['novel_fraction'][i]:6.1f}% {table['largest_cluster'][i]:15d} / "
            f"{table['n_atoms'][i]}"
        )
    below = s["first_frame_largest_cluster_below_half"]
    melt_t = float(temps[below]) if below is not None else None
    say()
    if below is not None:
        say(
            f"  the largest solid-like cluster falls below half of the cell at frame {below} "
            f"(thermostat {melt_t:.0f} K); at the end {table['largest_cluster'][-1]} atoms "
            f"remain solid-like and {100 * table['novel_fraction'][-1]:.0f} % are novel"
        )
    say("  dH = -log sum_j K(y, x_j) against the solid reference; dH > 0: not covered.")
    return {"summary": s, "table": table, "table_path": table_path, "melt_t": melt_t}


def _figures(out: Path, ref: dict, table, temps, files: list, timings: dict) -> np.ndarray:
    """The learning curve, the dH histogram and the screening timeline (appended to
    ``files``); returns the dH of the last ten frames."""
    import ase.io

    from .plots import plot_dh_histogram, plot_learning_curve, plot_screening_timeline

    t0 = time.perf_counter()
    fit = ref["fit"]
    fit_d = {"h_inf": fit.h_inf, "a": fit.a, "b": fit.b, "c": fit.c}
    path = plot_learning_curve(
        out / "learning-curve.png",
        ref["sizes"],
        ref["mean"],
        ref["std"],
        fit_d,
        title="entropy learning curve: solid reference 300-900 K",
    )
    files.append(str(path))
    dh_frames = ase.io.read(out / "heating-dH.extxyz", ":")
    dh_all = np.concatenate([f.arrays["dH"] for f in dh_frames])
    dh_last = np.concatenate([f.arrays["dH"] for f in dh_frames[-10:]])
    title = f"dH of all {dh_all.size} heating-run environments"
    files.append(str(plot_dh_histogram(out / "dh-histogram.png", dh_all, title=title)))
    path = plot_screening_timeline(
        out / "timeline.png",
        table,
        x=temps,
        xlabel="thermostat temperature (K)",
        title="EMT Cu heated at fixed volume, screened against the solid",
    )
    files.append(str(path))
    timings["plots"] = time.perf_counter() - t0
    return dh_last


def _result(ref: dict, screen: dict, temps, timings: dict, elapsed: float, files: list) -> dict:
    """The demo's JSON document (``demo.json``)."""
    x_ref, summary, fit, mean, table = (
        ref["x"],
        ref["summary"],
        ref["fit"],
        ref["mean"],
        screen["table"],
    )
    return {
        "command": "demo",
        "device": str(x_ref.device),
        "reference": {
            "n": int(x_ref.shape[0]),
            "entropy": float(summary.entropy),
            "log_n": summary.log_n,
            "diversity": float(summary.diversity),
            "learning_curve": {"sizes": ref["sizes"].tolist(), "mean": mean.tolist()},
            "h_inf": fit.h_inf,
            "information_gap": float(fit.h_inf - mean[-1]),
        },
        "screening": {
            **screen["summary"],
            "temperature_K": temps.tolist(),
            "largest_cluster": table["largest_cluster"].tolist(),
            "novel_fraction": table["novel_fraction"].tolist(),
            "melting_temperature_estimate_K": screen["melt_t"],
        },
        "timings": {key: round(v, 3) for key, v in timings.items()},
        "seconds": round(elapsed, 2),
        "files": files,
    }
