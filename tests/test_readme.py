"""The README's Python examples run as shown (so the user's guide cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    # every block runs except the ones that read the user's own files
    runnable = [code for code in blocks if "md.extxyz" not in code]
    for code in runnable[:2]:  # the descriptor and KDE tours share their variables
        exec(compile(code, str(README), "exec"), namespace)
    later: dict = {}
    for code in runnable[2:]:
        exec(compile(code, str(README), "exec"), later)
    x, y = namespace["x"], namespace["y"]
    assert x.shape == (432, 63) and y.shape == (216, 63)
    assert namespace["xm"].shape == (108, 189)
    assert 0 <= float(namespace["H"]) <= float(__import__("math").log(432))
    assert (namespace["dH"] > 0).any()  # the rattled-hot set is partly novel
    full = namespace["kde"].log_kernel_sum(namespace["y"], namespace["x"])
    assert (namespace["run"].log_k - full).abs().max() < 1e-10
    # compression example
    namespace = later
    assert namespace["sel"].indices.numel() == 12
    assert len(set(namespace["sel"].indices.tolist())) == 12
    assert namespace["sel"].summary()["entropy"] > namespace["rnd"].summary()["entropy"]
    assert namespace["any_pick"]["compressed_size"] == 3
    rows = namespace["report"].rows()
    assert len(rows) == 3 and rows[0]["novelty"] is None
    # uncertainty example
    assert namespace["dH"].shape == (216,)
    assert namespace["res"].max_dH.shape == (2,)
    assert float(namespace["res"].max_dH[1]) > float(namespace["res"].max_dH[0])
    # estimates: the sampled entropy's interval holds the exact value here
    est, exact = namespace["est"], namespace["summary"].entropy
    assert est.rows == 300 and est.n == 864
    assert abs(float(est) - float(exact)) < 5 * est.stderr
    # torch-sim example: the two hottest of four systems leave the bank at step 0
    assert namespace["ts_run"].systems == [0, 1]
    assert [d.system for d in namespace["ts_run"].dropped] == [2, 3]
    assert namespace["gen"].reached
