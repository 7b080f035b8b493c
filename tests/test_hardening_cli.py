"""Hardening (issue 14): compression checkpoint keys, bounds on ``k``, output paths checked
before any computation.

The command-line tests call :func:`quests_torch.cli.main` in-process (no subprocess: torch is
imported once) and replace the command's work by a function that fails loudly, so an exit
code 2 proves that the check ran before anything was computed.
"""

from __future__ import annotations

import os
from pathlib import Path

import ase.io
import pytest
import torch
from conftest import rattled_fcc

import quests_torch as qt
from quests_torch import _memory, cli, descriptors

MAX_K = 1024  # the documented cap, quests_torch.descriptors.MAX_K

# --------------------------------------------------------------------------------------------
# 5. compression checkpoints are keyed on the data itself
# --------------------------------------------------------------------------------------------


def _same_moments_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two different datasets with equal shapes, counts, sums, sums of squares and row-weighted
    sums (exactly: dyadic values, 17 rows so that linspace(1, 2) weights are dyadic, zero
    column means so centring is exact): the moments the old checkpoint key was made of."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 9, (17, 4), generator=g).double()
    x[1, 1] += x[1:16, 0].sum() - x[1:16, 1].sum()  # columns 0 and 1: equal partial sums
    a = 3.0
    b = -float(x[1:16, 0].sum()) - a
    x[0, :2] = torch.tensor([a, b])
    x[16, :2] = torch.tensor([b, a])
    x[16, 2:] = -x[:16, 2:].sum(0)
    x1 = x / 4
    x2 = x1.clone()  # swap two entries in the first and the last row: moments unchanged
    x2[0, :2] = x1[0, :2].flip(0)
    x2[16, :2] = x1[16, :2].flip(0)
    sid = torch.arange(17) // 2
    return x1, x2, sid


def test_checkpoint_of_other_data_with_equal_moments_is_refused(tmp_path):
    x1, x2, sid = _same_moments_pair()
    assert not torch.equal(x1, x2)
    for m in (0, 1, 2):  # the moments agree exactly
        assert float((x1**m if m else x1).sum()) == float((x2**m if m else x2).sum())
    first = qt.compress(x1, sid, 9, "msc", h=0.5).indices.tolist()
    second = qt.compress(x2, sid, 9, "msc", h=0.5).indices.tolist()
    assert first != second  # resuming the first selection would be wrong
    ckpt = tmp_path / "sel.pt"
    assert qt.compress(x1, sid, 9, "msc", h=0.5, checkpoint=ckpt).indices.tolist() == first
    with pytest.raises(ValueError, match="other data"):
        qt.compress(x2, sid, 9, "msc", h=0.5, checkpoint=ckpt)
    # the same data (a copy: the key is of the values) still resumes
    assert qt.compress(x1.clone(), sid, 9, "msc", h=0.5, checkpoint=ckpt).indices.tolist() == first


def test_checkpoint_key_covers_structure_index_and_parameters(tmp_path):
    x1, _, sid = _same_moments_pair()
    ckpt = tmp_path / "sel.pt"
    qt.compress(x1, sid, 4, "msc", h=0.5, checkpoint=ckpt)
    regrouped = torch.arange(17) % 9  # the same rows, grouped into other structures
    with pytest.raises(ValueError, match="other data"):
        qt.compress(x1, regrouped, 4, "msc", h=0.5, checkpoint=ckpt)
    for change in ({"h": 0.25}, {"threshold": 0.1}, {"curve": False}):
        with pytest.raises(ValueError, match="other data"):
            qt.compress(x1, sid, 4, "msc", **{"h": 0.5, **change}, checkpoint=ckpt)


def test_checkpoint_key_hashes_large_tensors_in_chunks():
    from quests_torch.checkpoint import tensor_digest as _tensor_digest

    x = torch.randn(3000, 7, dtype=torch.float64)
    whole = _tensor_digest(x, chunk_bytes=1 << 30)
    assert _tensor_digest(x, chunk_bytes=1000) == whole  # chunking does not change the hash
    assert _tensor_digest(x.t().contiguous().t(), chunk_bytes=1000) == whole  # layout neither
    y = x.clone()
    y[1234, 5] = torch.nextafter(y[1234, 5], torch.tensor(float("inf"), dtype=y.dtype))
    assert _tensor_digest(y, chunk_bytes=1000) != whole
    assert _tensor_digest(x.float(), chunk_bytes=1000) != _tensor_digest(x, chunk_bytes=1000)


# --------------------------------------------------------------------------------------------
# 12. k is bounded: a cap and the memory of the output
# --------------------------------------------------------------------------------------------


def test_k_above_the_cap_is_refused_by_the_library():
    atoms = rattled_fcc((1, 1, 1))
    with pytest.raises(ValueError, match=rf"`k` must be <= {MAX_K}"):
        qt.get_descriptors(atoms, k=MAX_K + 1)
    batch = qt.AtomsBatch.from_ase(atoms)
    with pytest.raises(ValueError, match=rf"`k` must be <= {MAX_K}"):
        qt.descriptors_from_tensors(batch.positions, batch.cell, batch.pbc, k=10**9)
    assert qt.get_descriptors(atoms, k=MAX_K).shape == (4, 2 * MAX_K - 1)
    assert descriptors.MAX_K == MAX_K


def test_k_whose_descriptors_exceed_the_memory_is_refused(monkeypatch):
    atoms = rattled_fcc((1, 1, 1))
    monkeypatch.setattr(_memory, "_available_ram", lambda: 10_000)
    with pytest.raises(ValueError, match=r"`k` = 512 needs a \[4, 1023\] descriptor array"):
        qt.get_descriptors(atoms, k=512)
    assert qt.get_descriptors(atoms, k=32).shape == (4, 63)  # 4 x 63 x 8 bytes fit


@pytest.fixture(scope="module")
def structures(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hardening")
    ase.io.write(d / "s.extxyz", [rattled_fcc(seed=s) for s in range(3)], format="extxyz")
    return d / "s.extxyz"


def _main(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_k_above_the_cap_exits_2(structures, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["entropy", str(structures), "-k", str(10**8)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"at most {MAX_K}" in err and len(err.strip().splitlines()) == 1


def test_cli_k_over_the_memory_exits_2_before_allocating(structures, capsys, monkeypatch):
    monkeypatch.setattr(_memory, "_available_ram", lambda: 10_000)
    # the RAM is what is patched: the CPU's check (`--device auto` would take a GPU's memory)
    code, err = _main(capsys, "entropy", structures, "-k", 64, "-q", "--device", "cpu")
    assert code == 2
    assert "`k` = 64" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# 15. output paths are checked before computing, and the error names the target
# --------------------------------------------------------------------------------------------


def _no_work(monkeypatch) -> None:
    """Every command fails loudly if it runs (exit 1, an internal error)."""

    def boom(args):
        raise AssertionError(f"{args.command} computed before its outputs were checked")

    for command in cli.COMMANDS:  # each command module's run(), bound when the parser is built
        monkeypatch.setattr(command, "run", boom)


def _blocked(tmp_path: Path) -> Path:
    """A 'folder' that is a regular file: nothing can be written below it (even as root)."""
    f = tmp_path / "plain-file"
    f.write_text("not a folder")
    return f


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["entropy", "{s}", "-o", "{bad}/out.json"], "-o"),
        (["descriptors", "{s}", "-o", "{bad}/d.npz"], "-o"),
        (["descriptors", "{s}", "-o", "{tmp}/d.npz", "--json", "{bad}/r.json"], "--json"),
        (["dh", "{s}", "-r", "{s}", "--save", "{bad}/dh.npy"], "--save"),
        (["dh", "{s}", "-r", "{s}", "--plot", "{bad}/fig"], "--plot"),
        (["learning-curve", "{s}", "--plot", "{bad}/"], "--plot"),
        (["overlap", "{s}", "-r", "{s}", "-o", "{bad}/o.json"], "-o"),
        (["bandwidth", "--volume", "11", "-o", "{bad}/b.json"], "-o"),
        (["screen", "{s}", "-r", "{s}", "--table", "{bad}/t.csv"], "--table"),
        (["screen", "{s}", "-r", "{s}", "--extxyz", "{bad}/f.extxyz"], "--extxyz"),
        (["compress", "{s}", "-s", "1", "-o", "{tmp}/a.json", "-o", "{bad}/b.extxyz"], "-o"),
        (["compress", "{s}", "-s", "1", "--checkpoint", "{bad}/c.pt"], "--checkpoint"),
        (["generations", "{s}", "{s}", "-o", "{bad}/g.json"], "-o"),
        (["demo", "--outdir", "{bad}/demo"], "--outdir"),
    ],
)
def test_cli_unwritable_output_fails_before_computing(
    argv, option, structures, tmp_path, capsys, monkeypatch
):
    bad = _blocked(tmp_path)
    argv = [a.format(s=structures, bad=bad, tmp=tmp_path) for a in argv]
    target = next(a for a in argv if a.startswith(str(bad)))
    _no_work(monkeypatch)
    code, err = _main(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert f"{option} {target}" in err and "is not a folder" in err
    assert ".tmp" not in err and f"/.{Path(target).name}." not in err  # no temporary file


def test_cli_output_that_is_a_folder_fails_before_computing(
    structures, tmp_path, capsys, monkeypatch
):
    _no_work(monkeypatch)
    code, err = _main(capsys, "entropy", structures, "-o", tmp_path)
    assert code == 2 and f"-o {tmp_path}: is a folder" in err


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere"
)
def test_cli_read_only_folder_fails_before_computing(structures, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _no_work(monkeypatch)
        code, err = _main(capsys, "entropy", structures, "-o", ro / "out.json")
        assert code == 2 and f"-o {ro / 'out.json'}: cannot write in {ro}" in err
    finally:
        ro.chmod(0o700)


def test_cli_output_in_a_new_folder_is_still_created(structures, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "out.json"
    code, err = _main(capsys, "entropy", structures, "-q", "-o", out)
    assert code == 0, err
    assert out.exists()


def test_cli_folder_without_write_permission_fails_before_computing(
    structures, tmp_path, capsys, monkeypatch
):
    """The permission branch, also when the tests run as root (who may write anywhere)."""
    _no_work(monkeypatch)
    monkeypatch.setattr(cli.outputs.os, "access", lambda path, mode: Path(path) != tmp_path)
    code, err = _main(capsys, "dh", structures, "-r", structures, "--save", tmp_path / "dh.npy")
    assert code == 2 and f"--save {tmp_path / 'dh.npy'}: cannot write in {tmp_path}" in err
