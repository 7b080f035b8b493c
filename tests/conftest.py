"""Fixtures and helpers shared by the test files (one copy each).

- Devices and dtypes: the ``device`` fixture (cpu, and cuda when present), the ``dtype``
  fixture (float64 and float32) and the ``cuda`` marker (the test is skipped without CUDA).
- Reference data in ``tests/data`` (upstream ``quests``; the generating scripts sit beside the
  files): :func:`load_reference`, :func:`descriptor_structures` and the ``ref`` / ``cu``
  fixtures (the thermal Cu descriptors of the kernel-sum and metrics tests).
- Structures: :func:`rattled_fcc`, :func:`random_rotation`, :func:`rotated_and_shifted`.
- Precision flags: the ``restore_precision_flags`` fixture.
- Gradients: the ``tiny`` fixture (small float64 leaves for ``gradcheck``),
  :func:`central_difference` and :func:`check_against_fd` (piecewise-smooth functions).
- The command line: :func:`cli` (the real entry point in a subprocess) and :func:`read_json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"

CUDA_AVAILABLE = torch.cuda.is_available()
if not CUDA_AVAILABLE:  # Triton kernels run on CPU tensors through its interpreter, which it
    # reads when triton.language is imported: before any test module imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        from _triton_interp import speed_up_interpreter

        speed_up_interpreter()  # tl.sort as numpy.sort (same values)
DEVICES = ["cpu"] + (["cuda"] if CUDA_AVAILABLE else [])
DTYPES = [torch.float64, torch.float32]


@pytest.fixture(autouse=True, scope="session")
def _user_cache(tmp_path_factory):
    """The user cache (the (ext)xyz frame index of quests_torch.readers) in a session folder
    unless a run chose one: tests write nothing under ~/.cache."""
    if "QUESTS_TORCH_CACHE" in os.environ:
        yield
        return
    os.environ["QUESTS_TORCH_CACHE"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    os.environ.pop("QUESTS_TORCH_CACHE", None)


# ------------------------------------------------------------------------ devices, dtypes


@pytest.fixture
def one_thread():
    """Ops run by the CPU chunk pool's threads are invisible to an op counter: one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=["float64", "float32"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


#: The ``slow`` tests, in one place: those that start processes (the command-line entry point,
#: torchrun, the two spawned gloo ranks, the notebooks, the README's examples) or take more
#: than ~20 s on the 2-core CPU (``pytest --durations``). ``make test-fast`` (``pytest -m "not
#: slow"``) skips them; ``make test`` and CI run everything. Per file: ``None`` marks every
#: test of the file, a set names the tests, a fixture name in the set marks its users.
SLOW: dict[str, set[str] | None] = {
    "test_cli.py": None,
    "test_cli_parity.py": None,
    "test_cli_compress.py": None,
    "test_readme.py": None,
    "test_guide.py": {"test_guide_page_examples_run"},  # the guide pages' examples
    "test_notebooks.py": {"test_notebook_runs"},
    "test_docs.py": {  # mkdocs builds of the site
        "site",
        "test_build_executes_a_notebook_with_its_figures",
        "test_a_failing_notebook_fails_the_build",
    },
    "test_distributed.py": {"runs"},  # the spawned ranks and the torchrun runs
    "test_torch_sim.py": {"test_import_quests_torch_does_not_import_torch_sim"},
    "test_cellgrid.py": {"test_grid_gradcheck_small"},
    "test_uncertainty.py": {"test_biased_md_reaches_higher_dh_than_unbiased"},
    "test_bench_scale.py": None,  # the scale pipeline in subprocesses (~40 s)
}


def _is_slow(item: pytest.Item) -> bool:
    if item.path.name not in SLOW:
        return False
    names = SLOW[item.path.name]
    if names is None:
        return True
    base = getattr(item, "originalname", item.name)
    return base in names or bool(names & set(getattr(item, "fixturenames", ())))


def _on_cuda(item: pytest.Item) -> bool:
    """A test parametrised with a CUDA device (the ``device`` fixture's ``"cuda"``)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, str) and v.startswith("cuda") for v in params.values())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the ``slow`` tests of :data:`SLOW` and the tests parametrised on a CUDA device as
    ``cuda``; skip the ``cuda`` ones without CUDA."""
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)
        if _on_cuda(item):  # `-m cuda` selects every test that runs on the GPU
            item.add_marker(pytest.mark.cuda)
        if not CUDA_AVAILABLE and item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# ------------------------------------------------------------------------ reference data


def load_reference(name: str) -> dict[str, np.ndarray]:
    """The arrays of ``tests/data/<name>_reference.npz`` (``name``: ``"kde"``,
    ``"descriptor"`` or ``"compression"``), read into memory and the file closed."""
    with np.load(DATA / f"{name}_reference.npz") as f:
        return {k: f[k] for k in f.files}


def descriptor_structures() -> dict:
    """The structures of ``tests/data/descriptor_structures.extxyz`` by ``info["name"]``
    (fresh copies on every call: tests may modify them)."""
    import ase.io

    return {a.info["name"]: a for a in ase.io.read(DATA / "descriptor_structures.extxyz", ":")}


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    """Upstream reference values for the KDE/metrics tests (tests/data/kde_reference.npz)."""
    return load_reference("kde")


@pytest.fixture(scope="module")
def cu(ref):
    """Thermal Cu descriptors: 300 K solid, 1500 K liquid, queries, and the solid's structures."""
    solid = torch.from_numpy(ref["x_solid"])
    liquid = torch.from_numpy(ref["x_liquid"])
    return {
        "solid": solid,
        "liquid": liquid,
        "query": torch.from_numpy(ref["x_query"]),
        "all": torch.cat([solid, liquid]),
        "system_idx": torch.from_numpy(ref["solid_system_idx"]),
    }


# ------------------------------------------------------------------------ structures


def rattled_fcc(reps=(2, 2, 2), a: float = 3.58, stdev: float = 0.05, seed: int = 0):
    """A rattled cubic FCC Cu supercell (no exact distance ties)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=a, cubic=True) * reps
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(0.0, stdev, atoms.positions.shape)
    return atoms


def random_rotation(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def rotated_and_shifted(atoms, seed: int):
    """A copy of ``atoms`` rotated by ``random_rotation(seed)`` (cell and positions) and
    translated by (1.3, -7.2, 40.0) Å: its descriptors must equal the original's."""
    q = random_rotation(seed)
    out = atoms.copy()
    out.set_cell(atoms.cell[:] @ q.T, scale_atoms=False)
    out.positions = atoms.positions @ q.T + np.array([1.3, -7.2, 40.0])
    return out


# ------------------------------------------------------------------------ precision flags


@pytest.fixture
def restore_precision_flags():
    """The caller's matmul precision flags (new and legacy API) are put back after the test."""
    saved = [
        (b, b.fp32_precision)
        for b in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
        if hasattr(b, "fp32_precision")
    ]
    legacy = torch.backends.cudnn.allow_tf32
    yield
    for b, v in saved:
        b.fp32_precision = v
    torch.backends.cudnn.allow_tf32 = legacy


# ------------------------------------------------------------------------ gradients


def _tiny(n: int, d: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g, dtype=torch.float64) * scale).requires_grad_()


@pytest.fixture
def tiny() -> Callable[..., torch.Tensor]:
    """``tiny(n, d, seed, scale=0.3)``: a seeded float64 leaf [n, d] in [0, scale) with
    ``requires_grad``, small enough for ``torch.autograd.gradcheck``."""
    return _tiny


def central_difference(f, x0: torch.Tensor, index, step: float):
    """``(f(x0 + step e) - f(x0 - step e)) / (2 step)``, ``e`` the unit tensor at ``index``."""
    d = torch.zeros_like(x0)
    d[index] = step
    return (f(x0 + d) - f(x0 - d)) / (2 * step)


def check_against_fd(f, x0, g, coords: Sequence, eps: float = 1e-7, rtol: float = 1e-6):
    """Central differences of ``f`` at ``x0`` along ``coords`` against the gradient ``g``.

    The QUESTS descriptor is only piecewise smooth: sorting the rows of R (and the x1 values)
    puts a kink wherever two entries cross, and on thermal Cu one atomic coordinate meets one
    every ~4e-5 Å (measured: 5.5 % of central differences with step 1e-6 Å straddle one,
    none of 108 at 1e-7 Å). A larger bandwidth does not help: the kinks are in the descriptor,
    and both the gradient of dH and its jumps scale like 1/h^2. So the step is 1e-7 Å (or
    1e-7 of strain), and a coordinate whose differences with steps ``eps`` and ``eps/2``
    disagree (a kink inside a stencil; smooth functions agree to ~1e-9 here) is skipped; at
    most half may be.
    """
    checked = 0
    for c in coords:
        fds = [float(central_difference(f, x0, c, e)) for e in (eps, eps / 2)]
        scale = max(1.0, abs(fds[0]))
        if abs(fds[0] - fds[1]) > rtol * scale:
            continue
        assert abs(fds[0] - float(g[c])) <= rtol * scale, (c, fds, float(g[c]))
        checked += 1
    assert checked >= 0.5 * len(coords)


# ------------------------------------------------------------------------ command line


def cli(*args, cwd: Path, env: dict | None = None, check: bool = True):
    """``python -m quests_torch *args`` in ``cwd`` (own cache folder there); raises on a
    non-zero exit unless ``check=False``. Returns the CompletedProcess (text output)."""
    full_env = {**os.environ, "QUESTS_TORCH_CACHE": str(cwd / "cache"), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "quests_torch", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
