"""The Python blocks of Markdown pages (README.md, docs/), extracted and run as tests.

One copy of the rule for tests/test_readme.py and tests/test_guide.py: a page's blocks run in
page order in one namespace (later blocks use the variables of earlier ones, as a reader
would), tracebacks point at the page's own line numbers, and only the blocks that read the
user's own files (:data:`USER_FILES`) are shown without being run.
"""

from __future__ import annotations

import re
from pathlib import Path

#: a fenced ```python block; group 1 is its code
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)

#: file names that stand for the user's own data in examples (such blocks are not run)
USER_FILES = ("md.extxyz",)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(first line, code)`` of every ```python block of ``path`` (lines 1-based)."""
    text = Path(path).read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def reads_user_files(code: str) -> bool:
    """Whether ``code`` reads one of the user's own files (:data:`USER_FILES`)."""
    return any(name in code for name in USER_FILES)


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """The blocks of ``path`` that :func:`run_page` runs, in page order."""
    return [(line, code) for line, code in python_blocks(path) if not reads_user_files(code)]


def run_page(path: Path) -> dict:
    """Run the runnable Python blocks of ``path`` in order in one namespace; return it.

    Each block is compiled under the page's file name and shifted to its own line, so a
    failing example is reported as ``README.md, line N``.
    """
    namespace: dict = {"__name__": "__main__"}
    for line, code in runnable_blocks(path):
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)
    return namespace
