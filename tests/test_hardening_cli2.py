"""Hardening, second round (issue 25), the command-line part: outputs that name an input,
``generate`` beyond the memory or without neighbours, integer options that name themselves,
and the approximate dH of duplicates.

The command-line tests call :func:`quests_torch.cli.main` in-process (no subprocess) and, where
the point is that a check runs before any work, replace the work by a function that fails
loudly (an exit code 2 then proves the check ran first).
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import pytest
import torch
from conftest import rattled_fcc

import quests_torch as qt
from quests_torch import cli
from quests_torch.metrics import approx_delta_entropy


def _main(capsys, *argv) -> tuple[int, str]:
    """Run the command line in-process: ``(exit code, stderr)``; argparse's exit is caught."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def structures(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hardening2")
    ase.io.write(d / "s.extxyz", [rattled_fcc(seed=s) for s in range(3)], format="extxyz")
    return d / "s.extxyz"


@pytest.fixture(scope="module")
def md(tmp_path_factory) -> Path:
    """The issue's reproducer: ten rattled 32-atom Cu cells."""
    from ase.build import bulk

    frames = []
    for i in range(10):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        a.rattle(0.05, seed=i)
        frames.append(a)
    path = tmp_path_factory.mktemp("md") / "md.xyz"
    ase.io.write(path, frames)
    return path


# --------------------------------------------------------------------------------------------
# 13. the approximate dH of a duplicate carries no positive rounding noise
# --------------------------------------------------------------------------------------------


def _near_duplicates(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every other entry moved by one ulp: what the descriptors of the same
    structures computed in another batch look like (they differ at the rounding level)."""
    up = torch.nextafter(x, torch.full_like(x, torch.inf))
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask.view(-1)[::2] = True
    return torch.where(mask, up, x)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_approx_dh_of_near_duplicates_is_not_novel(n, dtype):
    x = qt.get_descriptors([rattled_fcc(seed=s) for s in range(3)]).to(dtype)
    y = _near_duplicates(x[:64])
    assert not torch.equal(y, x[:64])
    approx = approx_delta_entropy(y, x, n=n)
    exact = qt.delta_entropy(y, x)
    assert int((exact > 0).sum()) == 0
    assert int((approx > 0).sum()) == 0  # none of the duplicates is novel at threshold 0
    assert (approx >= exact).all()  # still an upper bound of the exact dH
    # bit-identical duplicates: exactly the value of the nearest references' kernel sum
    same = approx_delta_entropy(x[:64], x, n=1)
    assert torch.equal(same, torch.zeros_like(same))


def test_approx_dh_far_rows_keep_the_shifted_sum():
    """Rows far from every reference: the log-sum-exp is shifted as before (finite, and equal
    to the direct formula where that does not underflow)."""
    x = qt.get_descriptors(rattled_fcc()).double()
    y = x[:4] + torch.tensor([1e-3, 0.01, 1.0, 50.0], dtype=x.dtype)[:, None]
    d, _ = (y[:, None] - x[None]).square().sum(-1).sqrt().topk(3, largest=False)
    expected = -torch.logsumexp(-d.square() / (2 * 0.015**2), dim=1)
    got = approx_delta_entropy(y, x, n=3)
    assert torch.isfinite(got).all() and (got[2:] > 100).all()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_cli_dh_approx_counts_no_duplicate_as_novel(md, tmp_path, capsys):
    """The reproducer: the first structures of a file against the whole file (their
    descriptors are computed in another batch, so they differ at the rounding level)."""
    out = tmp_path / "dh.json"
    code, err = _main(capsys, "dh", md, "-i", ":3", "-r", md, "--approx", 1, "-o", out, "-q")
    assert code == 0, err
    import json

    results = json.loads(out.read_text())["results"]
    assert results["n_novel"] == 0, results


# --------------------------------------------------------------------------------------------
# 13. integer options name themselves and their range
# --------------------------------------------------------------------------------------------

_SEED_USERS = [
    ["entropy", "{s}", "--rows", "5"],
    ["overlap", "{s}", "-r", "{s}", "--rows", "5"],
    ["learning-curve", "{s}", "--sizes", "2,3"],
    ["compress", "{s}", "-s", "1", "-m", "random"],
    ["generate", "{s}", "--target", "0", "-w", "{tmp}/g.extxyz", "-m", "random-walk"],
]


@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**70), "1.5", "x"])
@pytest.mark.parametrize("argv", _SEED_USERS, ids=lambda a: a[0])
def test_cli_seed_out_of_range_names_the_option_and_range(argv, seed, structures, tmp_path, capsys):
    argv = [a.format(s=structures, tmp=tmp_path) for a in argv] + ["--seed", seed, "-q"]
    code, err = _main(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert "argument --seed:" in err and f"from 0 to {2**63 - 1}" in err and repr(seed) in err


def test_cli_largest_seed_is_accepted(structures, capsys):
    code, err = _main(capsys, "entropy", structures, "--rows", 5, "--seed", 2**63 - 1, "-q")
    assert code == 0, err


def test_cli_generate_seeds_of_all_runs_must_be_seeds(structures, tmp_path, capsys, monkeypatch):
    from quests_torch.cli import generate

    def boom(*args, **kwargs):
        raise AssertionError("generated before the seeds were checked")

    monkeypatch.setattr(generate, "_generate_all", boom)
    top = 2**63 - 1
    code, err = _main(
        capsys, "generate", structures, "--target", 0, "-w", tmp_path / "g.extxyz",
        "--seed", top - 1, "-n", 3,
    )  # fmt: skip
    assert code == 2, err
    assert f"--seed {top - 1} with -n/--count 3" in err and f"at most {top - 2}" in err


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["dh", "{s}", "-r", "{s}", "--top", "0"], "--top"),
        (["dh", "{s}", "-r", "{s}", "--approx", "-1"], "--approx"),
        (["learning-curve", "{s}", "--repeats", "0"], "--repeats"),
        (["generate", "{s}", "--target", "0", "-w", "{tmp}/g.xyz", "-n", "0"], "-n/--count"),
        (["generate", "{s}", "--target", "0", "-w", "{tmp}/g.xyz", "--steps", "-3"], "--steps"),
        (["screen", "{s}", "-r", "{s}", "--batch-atoms", "0"], "--batch-atoms"),
        (["descriptors", "{s}", "-o", "{tmp}/d.npz", "--batch-atoms", "1e3"], "--batch-atoms"),
    ],
)
def test_cli_positive_int_names_option_and_range(argv, option, structures, tmp_path, capsys):
    argv = [a.format(s=structures, tmp=tmp_path) for a in argv]
    code, err = _main(capsys, *argv)
    assert code == 2
    assert f"argument {option}:" in err and "positive integer (1 or more)" in err


def test_generate_library_refuses_a_seed_numpy_or_torch_cannot_take():
    atoms = rattled_fcc()
    bank = qt.UncertaintyBank(qt.get_descriptors(atoms))
    for seed in (-2, 2**63, 1.0):
        with pytest.raises(ValueError, match=r"`seed` must be None or an int from 0 to 2\*\*63"):
            qt.random_walk_to_target(atoms, bank, 1.0, seed=seed, max_evaluations=2)


def test_cli_generate_start_index_out_of_range_names_the_range(structures, tmp_path, capsys):
    code, err = _main(
        capsys, "generate", structures, "--target", 0, "-w", tmp_path / "g.xyz", "-i", 2**70
    )
    assert (
        code == 2
        and f"-i {2**70}: the dataset has 3 structures (give an index from -3 to 2)" in err
    )


# --------------------------------------------------------------------------------------------
# 10. generate from a structure whose atoms have no neighbour
# --------------------------------------------------------------------------------------------


def _lonely() -> list:
    from ase import Atoms

    far = Atoms("Cu2", positions=[[0, 0, 0], [10, 0, 0]])  # 10 Å apart, no cell
    one = Atoms("Cu", positions=[[0, 0, 0]])  # one atom without a cell
    return [far, one]


@pytest.mark.parametrize("which", [0, 1], ids=["two-far-atoms", "one-atom"])
@pytest.mark.parametrize("method", ["gradient", "random_walk"])
def test_generate_without_neighbours_is_a_clear_value_error(which, method):
    atoms = _lonely()[which]
    bank = qt.UncertaintyBank(qt.get_descriptors(rattled_fcc()))
    run = qt.generate_to_target if method == "gradient" else qt.random_walk_to_target
    with pytest.raises(ValueError, match=r"no atom of the start structure .* within the cutoff"):
        run(atoms, bank, 3.0, max_evaluations=5)


def test_generate_gradient_of_a_structure_without_pairs_is_zero():
    """Moved out of every cutoff during a run: a stationary point, not a RuntimeError."""
    from quests_torch.sampling import _Objective

    bank = qt.UncertaintyBank(qt.get_descriptors(rattled_fcc()))
    obj = _Objective(bank, _lonely()[0], "max")
    value, grad = obj.value_and_grad(obj.positions0)
    assert value > 0 and torch.equal(grad, torch.zeros_like(obj.positions0))


@pytest.mark.parametrize("method", ["gradient", "random-walk"])
def test_cli_generate_without_neighbours_exits_2(method, tmp_path, capsys):
    far = tmp_path / "far.xyz"
    ase.io.write(far, _lonely()[0])
    out = tmp_path / "g.extxyz"
    code, err = _main(capsys, "generate", far, "--target", 3, "-w", out, "-m", method)
    assert code == 2, err
    assert "internal error" not in err and len(err.strip().splitlines()) == 1
    assert f"{far} structure 0 (start of run 0): no atom of the start structure" in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 8. generate -n beyond the memory is refused before generating
# --------------------------------------------------------------------------------------------


def test_cli_generate_count_beyond_memory_is_refused_before_allocating(
    structures, tmp_path, capsys, monkeypatch
):
    from quests_torch import _memory
    from quests_torch.cli import generate

    def boom(*args, **kwargs):
        raise AssertionError("allocated before the memory was checked")

    monkeypatch.setattr(_memory, "_available_ram", lambda: 50 << 20)  # 50 MiB
    monkeypatch.setattr(generate, "_starts", boom)  # -n start indices
    monkeypatch.setattr(generate, "_generate_all", boom)
    out = tmp_path / "g.extxyz"
    code, err = _main(capsys, "generate", structures, "--target", 3, "-w", out, "-n", 10**9)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "internal error" not in err
    need = generate.generation_bytes(10**9, 32, 32, False)
    assert f"-n/--count {10**9}: holding {10**9} generated structures of up to 32 atoms" in err
    assert f"about {need / 2**40:,.1f} TiB" in err and "0.049 GiB of memory available" in err
    assert not out.exists()


def test_cli_generate_count_that_fits_runs(structures, tmp_path, capsys, monkeypatch):
    from quests_torch import _memory

    monkeypatch.setattr(_memory, "_available_ram", lambda: 50 << 20)
    out = tmp_path / "g.extxyz"
    code, err = _main(
        capsys, "generate", structures, "--target", 3, "-w", out, "-n", 2, "--steps", 2,
        "--best-effort", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert len(ase.io.read(out, ":")) == 2


def test_generation_bytes_bounds_what_a_run_holds():
    """The estimate grows with -n, the structure size, --compare and k."""
    from quests_torch.cli.generate import generation_bytes

    base = generation_bytes(1000, 32, 32, False)
    assert generation_bytes(2000, 32, 32, False) > 1.9 * base
    assert generation_bytes(1000, 64, 32, False) > base
    assert generation_bytes(1000, 32, 32, True) > 1.9 * base
    assert generation_bytes(1000, 32, 64, False) > base
    assert base >= 1000 * 4300  # measured: ~4.3 KiB per 32-atom result


# --------------------------------------------------------------------------------------------
# 3. an output may not name an input, lie inside a store, or repeat another output
# --------------------------------------------------------------------------------------------

from quests_torch.cli import outputs as cli_outputs  # noqa: E402


def _subparsers() -> dict:
    import argparse

    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


#: options that take text but no path
_NOT_PATHS = {"index", "reference_index", "device", "dtype", "method", "statistic", "sizes", "key"}
#: path options that name several files or a folder read and written (checked elsewhere)
_FOLDERS = {"plot", "outdir", "cache_dir"}
_INPUTS = {attr: name for attr, name in cli_outputs.INPUT_OPTIONS}
_OUTPUTS = {attr for attr, _ in cli_outputs._FILE_OPTIONS} | {"outputs", "table"}


def test_every_path_option_of_every_command_is_an_input_or_an_output():
    """A new option that takes a path must be classified, or the alias check misses it."""
    for command, parser in _subparsers().items():
        for action in parser._actions:
            if action.type is not None or action.nargs == 0:
                continue  # numbers (typed values), flags, help
            dest = action.dest
            if dest in _NOT_PATHS or dest in _FOLDERS:
                continue
            assert dest in _INPUTS or dest in _OUTPUTS, (command, dest)


# minimal arguments of each command: {IN} the input (every input option gets a file), {OUT}
# a default output where the command requires one
_TEMPLATES = {
    "descriptors": ["{input}", "-o", "{tmp}/d.npz"],
    "entropy": ["{input}"],
    "dh": ["{input}", "-r", "{reference}"],
    "overlap": ["{input}", "-r", "{reference}"],
    "learning-curve": ["{input}"],
    "bandwidth": ["{input}"],
    "screen": ["{trajectory}", "-r", "{reference}"],
    "compress": ["{input}", "-s", "1", "-r", "{reference}"],
    "generations": ["{inputs}", "{tmp}/other.xyz"],
    "generate": ["{input}", "--target", "1", "-w", "{tmp}/g.extxyz"],
}


def _option(parser, dest: str) -> str:
    """The option string of ``dest`` that the messages use (the output table's flag)."""
    flags = dict(cli_outputs._FILE_OPTIONS) | {"outputs": "-o", "table": "--table"}
    strings = next(a.option_strings for a in parser._actions if a.dest == dest)
    assert flags[dest] in strings
    return flags[dest]


def _alias_cases() -> list:
    cases = []
    for command, parser in _subparsers().items():
        dests = {a.dest for a in parser._actions}
        for out in sorted(dests & _OUTPUTS):
            for inp in sorted(dests & set(_INPUTS)):
                cases.append((command, _option(parser, out), inp))
    return cases


_ALIAS_CASES = _alias_cases()


def test_alias_cases_cover_every_command_with_inputs_and_outputs():
    assert {c for c, _, _ in _ALIAS_CASES} == set(_TEMPLATES)
    assert len(_ALIAS_CASES) >= 25


def _alias_forms(tmp: Path) -> dict:
    """Ways of naming ``tmp/in.xyz`` (the cwd is ``tmp``)."""
    (tmp / "sub").mkdir(exist_ok=True)
    link = tmp / "link.xyz"
    if not link.exists():
        link.symlink_to(tmp / "in.xyz")
    hard = tmp / "hard.xyz"
    if not hard.exists():
        import os

        os.link(tmp / "in.xyz", hard)
    return {
        "same": "in.xyz",
        "dot": "./in.xyz",
        "dotdot": "sub/../in.xyz",
        "absolute": str(tmp / "in.xyz"),
        "symlink": "link.xyz",
        "hardlink": "hard.xyz",
    }


def _argv_with_output(command: str, flag: str, inp: str, alias: str, tmp: Path) -> list[str]:
    values = {"input": "in.xyz", "reference": "ref.xyz", "trajectory": "in.xyz"}
    values["inputs"] = "in.xyz"
    if inp == "reference":
        values = {**values, "input": "other.xyz", "trajectory": "other.xyz", "reference": "in.xyz"}
    argv = [command] + [a.format(tmp=tmp, **values) for a in _TEMPLATES[command]]
    if flag in argv:  # a required output given by the template: replace its value
        argv[argv.index(flag) + 1] = alias
    else:
        argv += [flag, alias]
    return argv


def _no_work(monkeypatch) -> None:
    def boom(args):
        raise AssertionError(f"{args.command} computed before its outputs were checked")

    for command in cli.COMMANDS:
        monkeypatch.setattr(command, "run", boom)


@pytest.fixture
def aliasing(structures, tmp_path, monkeypatch):
    """A folder (the cwd) with ``in.xyz``, ``ref.xyz``, ``other.xyz``; no command computes."""
    import shutil

    for name in ("in.xyz", "ref.xyz", "other.xyz"):
        shutil.copy(structures, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch)
    return tmp_path


@pytest.mark.parametrize("form", ["same", "dot", "dotdot", "absolute", "symlink", "hardlink"])
@pytest.mark.parametrize(("command", "flag", "inp"), _ALIAS_CASES)
def test_cli_output_naming_an_input_is_refused(command, flag, inp, form, aliasing, capsys):
    alias = _alias_forms(aliasing)[form]
    before = (aliasing / "in.xyz").read_bytes()
    argv = _argv_with_output(command, flag, inp, alias, aliasing)
    code, err = _main(capsys, *argv)
    assert code == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1
    assert f"{flag} {alias}: is the input {_INPUTS[inp]} (in.xyz); give another file name" in err
    assert (aliasing / "in.xyz").read_bytes() == before


def test_cli_input_given_by_another_path_than_the_output(aliasing, capsys):
    """The input named through a symlink, the output by the real name: the same file."""
    _alias_forms(aliasing)
    code, err = _main(capsys, "entropy", "link.xyz", "-o", "./in.xyz")
    assert code == 2 and "-o ./in.xyz: is the input INPUT (link.xyz)" in err


def test_cli_output_through_a_symlinked_folder_is_the_input(aliasing, capsys):
    (aliasing / "alias-dir").symlink_to(aliasing)
    code, err = _main(capsys, "dh", "in.xyz", "-r", "ref.xyz", "--save", "alias-dir/ref.xyz")
    assert code == 2 and "--save alias-dir/ref.xyz: is the input -r/--reference (ref.xyz)" in err


def test_cli_outputs_of_other_names_still_run(structures, tmp_path, capsys):
    """Near misses are not refused: a sibling file, a file of the same name elsewhere."""
    (tmp_path / "sub").mkdir()
    out = tmp_path / "sub" / structures.name  # same name, other folder
    code, err = _main(capsys, "entropy", structures, "-q", "--per-environment", out)
    assert code == 0, err
    assert out.exists()


@pytest.fixture(scope="module")
def store(structures, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "m.qstore"
    assert cli.main(["descriptors", str(structures), "-o", str(path), "-q"]) == 0
    return path


def _store_cases() -> list:
    cases = []
    for command, parser in _subparsers().items():
        dests = {a.dest for a in parser._actions}
        for out in sorted(dests & _OUTPUTS):
            cases.append((command, _option(parser, out)))
        if "plot" in dests:
            cases.append((command, "--plot"))
    return [*cases, ("demo", "--outdir")]


@pytest.mark.parametrize(("command", "flag"), _store_cases())
def test_cli_output_inside_a_store_is_refused(command, flag, store, aliasing, capsys):
    before = sorted(p.name for p in store.iterdir())
    target = f"{store}/x.out" if flag != "--outdir" else f"{store}/demo"
    if command == "demo":
        argv = ["demo", "--outdir", target]
    elif command == "descriptors" and flag == "-o":
        argv = ["descriptors", "in.xyz", "-o", target]
    else:
        argv = _argv_with_output(command, flag, "input", target, aliasing)
    code, err = _main(capsys, *argv)
    assert code == 2, (argv, err)
    assert f"{flag} {target}: lies inside the descriptor store {store}" in err
    assert sorted(p.name for p in store.iterdir()) == before


def test_cli_output_inside_the_input_store_names_it(store, tmp_path, capsys, monkeypatch):
    """The issue's case: entropy m.qstore --per-environment m.qstore/x.npy."""
    _no_work(monkeypatch)
    code, err = _main(capsys, "entropy", store, "--per-environment", f"{store}/x.npy")
    assert code == 2
    assert f"lies inside the descriptor store {store}, the input INPUT ({store})" in err


def test_cli_descriptors_json_inside_its_own_store_is_refused(structures, tmp_path, capsys):
    out = tmp_path / "new.qstore"
    code, err = _main(capsys, "descriptors", structures, "-o", out, "--json", f"{out}/r.json")
    assert code == 2
    assert f"the output -o ({out})" in err and not out.exists()


def test_cli_descriptors_store_holding_its_input_is_refused(structures, tmp_path, capsys):
    import shutil

    out = tmp_path / "d.qstore"
    out.mkdir()
    shutil.copy(structures, out / "in.xyz")
    code, err = _main(capsys, "descriptors", out / "in.xyz", "-o", out)
    assert code == 2 and f"-o {out}: the store would hold the input INPUT" in err


def test_cli_descriptors_resumes_its_own_store(structures, store, capsys):
    """The store output of descriptors is not 'inside a store': rerunning it resumes."""
    code, err = _main(capsys, "descriptors", structures, "-o", store, "-q")
    assert code == 0, err


_SCREEN = ["screen", "in.xyz", "-r", "ref.xyz", "--table", "t.csv"]


@pytest.mark.parametrize(
    ("argv", "first", "second"),
    [
        (["dh", "in.xyz", "-r", "ref.xyz", "-o", "a.out", "--save", "a.out"], "-o", "--save"),
        (["entropy", "in.xyz", "-o", "a", "--per-environment", "./a"], "-o", "--per-environment"),
        ([*_SCREEN, "--extxyz", "t.csv"], "--extxyz", "--table"),
        ([*_SCREEN, "-o", "t.csv"], "-o", "--table"),
        (["compress", "in.xyz", "-s", "1", "-o", "a.json", "-o", "sub/../a.json"], "-o", "-o"),
        (["compress", "in.xyz", "-s", "1", "-o", "c", "--checkpoint", "c"], "--checkpoint", "-o"),
        (["descriptors", "in.xyz", "-o", "d.npz", "--json", "d.npz"], "--json", "-o"),
        (["generate", "in.xyz", "--target", "1", "-w", "g.xyz", "-o", "g.xyz"], "--write", "-o"),
    ],
)
def test_cli_two_outputs_naming_one_file_are_refused(argv, first, second, aliasing, capsys):
    _alias_forms(aliasing)
    code, err = _main(capsys, *argv)
    assert code == 2, err
    assert "is also the output" in err and err.count(first) >= 1 and err.count(second) >= 1


def test_cli_resumed_checkpoint_is_not_an_alias(structures, tmp_path, capsys):
    """compress --checkpoint is read and written: running twice resumes, it is not refused."""
    ckpt = tmp_path / "c.pt"
    argv = ["compress", structures, "-s", 2, "--checkpoint", ckpt, "-q"]
    assert _main(capsys, *argv)[0] == 0 and ckpt.exists()
    code, err = _main(capsys, *argv)
    assert code == 0, err


# --------------------------------------------------------------------------------------------
# learning-curve --repeats beyond the memory (noticed while fixing item 8): it hung drawing
# 2**70 subsets one by one; now refused before drawing, with exit 2 naming --repeats
# --------------------------------------------------------------------------------------------


def test_learning_curve_repeats_beyond_the_memory_exit_2_at_once(structures, capsys):
    import time

    start = time.perf_counter()
    code, err = _main(capsys, "learning-curve", structures, "--repeats", 2**70, "-q")
    assert code == 2 and time.perf_counter() - start < 30
    assert "`repeats` = 1180591620717411303424" in err and "use fewer repeats" in err
    assert len(err.strip().splitlines()) == 1


def test_learning_curve_plan_refuses_before_drawing(monkeypatch):
    """The library refuses too, before one subset is drawn; a plan that fits is unchanged."""
    from quests_torch import _memory, learning_curve

    x = torch.rand(40, 5, dtype=torch.float64)
    plan = learning_curve.plan_learning_curve(x, [10, 20, 40], repeats=3, generator=0)
    assert len(plan.tasks) == 9
    per_repeat = 8 * (10 + 20) + 3 * learning_curve._TASK_BYTES
    monkeypatch.setattr(_memory, "_available_ram", lambda: 3 * per_repeat)
    again = learning_curve.plan_learning_curve(x, [10, 20, 40], repeats=3, generator=0)
    assert [t.rows is None or t.rows.tolist() for t in again.tasks] == [
        t.rows is None or t.rows.tolist() for t in plan.tasks
    ]

    def no_draw(*args, **kwargs):
        raise AssertionError("a subset was drawn before the refusal")

    monkeypatch.setattr(learning_curve, "sample_rows", no_draw)
    with pytest.raises(ValueError, match=r"`repeats` = 4 .* \(at most 3 here\)"):
        learning_curve.plan_learning_curve(x, [10, 20, 40], repeats=4, generator=0)
