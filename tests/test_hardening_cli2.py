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
