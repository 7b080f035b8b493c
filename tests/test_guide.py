"""The Python examples of the user's guide (docs/*.md) run as shown and give what they say.

Every page's blocks run in page order in one namespace (``tests/_blocks.py``, shared with
``tests/test_readme.py``); only blocks that read the user's own files are skipped. The
checks below assert on the variables the examples leave behind, so a page cannot keep an
example whose result has changed. The README's own examples are checked by
``tests/test_readme.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from _blocks import run_page, runnable_blocks

DOCS = Path(__file__).resolve().parents[1] / "docs"


def check_descriptors(ns: dict) -> None:
    assert ns["xm"].shape == (108, 189)  # [X_all, X_Au, X_Cu] of the alloy
    assert ns["x"].shape == (216, 63)  # the tensor-level batch of two cells
    assert ns["pos"].grad is not None and ns["pos"].grad.shape == (216, 3)
    # the MD loop reused its neighbour list (0.02 Å steps: no atom moved 0.5 Å)
    assert (ns["cache"].builds, ns["cache"].reuses, ns["cache"].searches) == (1, 8, 1)


def check_metrics(ns: dict) -> None:
    x, y = ns["x"], ns["y"]
    assert x.shape == (432, 63) and y.shape == (216, 63)
    assert 0 <= float(ns["H"]) <= math.log(432)
    assert (ns["dH"] > 0).any()  # the rattled-hot set is partly novel
    full = ns["kde"].log_kernel_sum(y, x)
    assert (ns["run"].log_k - full).abs().max() < 1e-10
    # estimates: the sampled entropy's interval holds the exact value here
    est, exact = ns["est"], ns["summary"].entropy
    assert est.rows == 300 and est.n == 864
    assert abs(float(est) - float(exact)) < 5 * est.stderr


def check_compression(ns: dict) -> None:
    sel = ns["sel"]
    assert sel.indices.numel() == 12
    assert len(set(sel.indices.tolist())) == 12
    assert sel.summary()["entropy"] > ns["rnd"].summary()["entropy"]
    assert ns["any_pick"]["compressed_size"] == 3
    rows = ns["report"].rows()
    assert len(rows) == 3 and rows[0]["novelty"] is None


def check_uncertainty(ns: dict) -> None:
    assert ns["dH"].shape == (216,)
    res = ns["res"]
    assert res.max_dH.shape == (2,)
    assert float(res.max_dH[1]) > float(res.max_dH[0])
    assert ns["gen"].reached
    # torch-sim: the two hottest of four systems leave the bank at step 0
    assert ns["ts_run"].systems == [0, 1]
    assert [d.system for d in ns["ts_run"].dropped] == [2, 3]


#: the checks of each page, by path under docs/; pages not listed still run
CHECKS: dict[str, Callable[[dict], None]] = {
    "guide/descriptors.md": check_descriptors,
    "guide/metrics.md": check_metrics,
    "guide/compression.md": check_compression,
    "guide/uncertainty.md": check_uncertainty,
}

PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if runnable_blocks(p))


@pytest.mark.parametrize("page", PAGES)
def test_guide_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace = run_page(DOCS / page)
    check = CHECKS.get(page)
    if check is not None:
        check(namespace)


def test_every_check_names_a_page_with_examples():
    """A renamed page or a removed example fails here, rather than silently losing checks."""
    assert set(CHECKS) <= set(PAGES), sorted(set(CHECKS) - set(PAGES))
