"""The README's Python examples run as shown (so the user's guide cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    # the screening example needs a trajectory file; the first two blocks are self-contained
    for code in blocks[:2]:
        exec(compile(code, str(README), "exec"), namespace)
    x, y = namespace["x"], namespace["y"]
    assert x.shape == (432, 63) and y.shape == (216, 63)
    assert namespace["xm"].shape == (108, 189)
    assert 0 <= float(namespace["H"]) <= float(__import__("math").log(432))
    assert (namespace["dH"] > 0).any()  # the rattled-hot set is partly novel
