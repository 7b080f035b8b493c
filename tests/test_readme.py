"""The README's Python examples run as shown and give what they say; its links resolve.

The README is the front page: one short example per area, which continue one another (one
namespace, page order; ``tests/_blocks.py``). The full examples live in the guide pages
(docs/), checked by ``tests/test_guide.py``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _blocks import python_blocks, run_page, runnable_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(README)
    assert len(blocks) >= 7
    assert runnable_blocks(README) == blocks  # every block of the front page runs
    monkeypatch.chdir(tmp_path)
    ns = run_page(README)
    qt = ns["qt"]

    # quick start: descriptors of the training set and of the hot configuration
    x, y = ns["x"], ns["y"]
    assert x.shape == (432, 63) and y.shape == (108, 63) and x.dtype == torch.float64

    # the descriptor store: every environment on disk, float32, the same entropy
    store = ns["store"]
    assert len(store) == 540 and store.n_atoms.tolist() == [108] * 5
    assert abs(float(ns["H_store"]) - float(qt.entropy(torch.cat([x, y])))) < 1e-6
    assert (Path("cu.qstore") / "descriptors.npy").exists()

    # entropy, diversity, dH; the estimate's interval holds the exact entropy
    H = float(ns["H"])
    assert 0 < H <= math.log(432)
    assert math.isfinite(float(ns["D"])) and float(ns["D"]) > 0
    dH = ns["dH"]
    assert dH.shape == (108,)
    novel = float(qt.novelty(y, x))
    assert 0.3 < novel < 0.9  # the hot cell is partly novel (62 %)
    est = ns["est"]
    assert est.rows == 200 and est.n == 432
    assert abs(float(est) - H) < 5 * est.stderr

    # the ASE wrapper: EMT's energy unchanged, the bank's dH equal to delta_entropy's
    hot = ns["hot"]
    assert np.abs(hot.calc.results["dH"] - dH.numpy()).max() < 1e-9
    assert hot.calc.results["max_dH"] == pytest.approx(float(dH.max()), rel=1e-10)
    assert hot.calc.results["max_dH"] > 5.0 and hot.calc.extrapolated
    bare = hot.copy()
    bare.calc = ns["EMT"]()
    assert ns["energy"] == pytest.approx(bare.get_potential_energy(), rel=1e-12)

    # screening: the training cell is covered and one solid-like cluster; the hot one is not
    covered, heated = ns["screened"]
    assert covered.novel_fraction == 0 and covered.largest_cluster == 108
    assert covered.dH_max < 0
    assert heated.dH_max == pytest.approx(float(dH.max()), rel=1e-10)
    assert heated.novel_fraction == pytest.approx(novel)
    assert heated.largest_cluster < 108

    # compression: 6 distinct structures, more informative than a random pick of 6
    sel = ns["sel"]
    picked = sel.indices.tolist()
    assert len(picked) == 6 and len(set(picked)) == 6
    xc = qt.get_descriptors(ns["cells"])
    sid = torch.arange(30).repeat_interleave(32)
    rnd = qt.compress(xc, sid, 6, "random", generator=0)
    assert sel.summary()["entropy"] > rnd.summary()["entropy"]

    # torch-sim: the model's outputs unchanged, its dH the bank's
    out = ns["out"]
    assert out["dH"].shape == (216,) and out["max_dH"].shape == (2,)
    assert float(out["max_dH"][0]) < 0  # a training configuration is covered
    assert float(out["max_dH"][1]) == pytest.approx(float(dH.max()), rel=1e-10)
    assert torch.allclose(out["energy"], ns["lj"](ns["state"])["energy"])

    # distributed: without a process group, the single-process value
    assert float(ns["H_all"]) == pytest.approx(H, rel=1e-12)


def _github_anchor(heading: str) -> str:
    """The anchor GitHub (and MkDocs' toc) gives a heading: lower case, punctuation dropped."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            anchors.add(_github_anchor(line.lstrip("#")))
    return anchors


def test_readme_links_resolve():
    """Relative links (to docs/ pages, as GitHub shows them) name files and headings that exist."""
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert len(local) >= 15
    for link in local:
        path, _, anchor = link.partition("#")
        target = (ROOT / path) if path else README
        assert target.is_file(), link
        if anchor:
            assert anchor in _anchors(target), link
