"""The documentation site builds in strict mode, and its generated pages are complete.

The build runs with ``QUESTS_DOCS_EXECUTE=0``: the notebooks are rendered without running
them here, because ``tests/test_notebooks.py`` already runs each of them (running them
twice would add about two minutes to the suite); ``make docs`` runs them. The kernel path
that runs them (nbclient + ipykernel) is tested on the shortest notebook. The Python
examples of the pages run in ``tests/test_guide.py``, those of the README in
``tests/test_readme.py``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("griffe") is None,
    reason="the docs extra is not installed (it needs Python >= 3.11)",
)


def _load_hook(name: str):
    spec = importlib.util.spec_from_file_location(
        f"_docs_hook_{name}", DOCS / "hooks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, QUESTS_DOCS_EXECUTE="0", NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    return out


@needs_mkdocs
def test_strict_build_documents_every_public_name(site):
    import quests_torch

    index = (site / "reference" / "index.html").read_text()
    for name in quests_torch.__all__:
        if name == "__version__":
            continue
        module = getattr(getattr(quests_torch, name), "__spec__", None) is not None
        if module:
            assert (site / "reference" / name / "index.html").is_file(), name
        else:
            assert f'id="quests_torch.{name}"' in index, name
    for page in ("kde", "metrics", "compression", "distributed", "torch_sim"):
        html = (site / "reference" / page / "index.html").read_text()
        assert 'class="doc doc-heading"' in html, page
    kde = (site / "reference" / "kde" / "index.html").read_text()
    assert 'id="quests_torch.kde.log_kernel_sum"' in kde


@needs_mkdocs
def test_api_reference_prints_no_rest_markup(site):
    """The docstrings' reST roles and ``::`` blocks are rendered (docs/hooks/roles.py).

    Before the conversion the reference pages printed 372 roles verbatim (``:func:`x```
    renders as ``:func:<code>x</code>``) and 11 paragraphs ending in ``::``.
    """
    import re

    pages = sorted((site / "reference").glob("**/index.html"))
    html = {page.parent.name: page.read_text() for page in pages}
    verbatim = {
        name: re.findall(r":(?:py:)?[a-z]+:<code>[^<]*</code>|::</p>|\.\. math::", text)
        for name, text in html.items()
    }
    assert {name: found for name, found in verbatim.items() if found} == {}
    # the roles became cross-references: a link where the object has a heading on the site,
    # its name as code (the full path as a tooltip) where it has none
    links = sum(t.count('<a class="autorefs autorefs-internal"') for t in html.values())
    assert links >= 200, links
    kde = html["kde"]
    assert 'href="#quests_torch.kde.log_kernel_sum"><code>log_kernel_sum</code></a>' in kde
    assert '<span title="quests_torch.kde.source"><code>source</code></span>' in kde  # .source
    anchors = {a for text in html.values() for a in re.findall(r'id="(quests_torch[\w.]*)"', text)}
    unlinked = {
        p for text in html.values() for p in re.findall(r'<span title="([\w.]+)"><code>', text)
    }
    assert unlinked and not (unlinked & anchors)  # no role left unlinked to a documented name


@needs_mkdocs
def test_cli_reference_lists_every_subcommand(site):
    from quests_torch.cli import build_parser

    html = (site / "reference" / "cli" / "index.html").read_text()
    hook = _load_hook("reference")
    names = [name for name, _ in hook._subcommands(build_parser())]
    assert len(names) >= 10
    for name in names:
        assert f"quests-torch {name}" in html, name
    assert "--checkpoint" in html  # an option of compress


@needs_mkdocs
def test_notebooks_and_guide_pages_are_in_the_site(site):
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    for stem in notebooks:
        assert (site / "notebooks" / stem / "index.html").is_file(), stem
    for page in sorted((DOCS / "guide").glob("*.md")):
        assert (site / "guide" / page.stem / "index.html").is_file(), page.name


@needs_mkdocs
def test_missing_docstring_fails_the_build(tmp_path, monkeypatch, caplog):
    from mkdocs.exceptions import PluginError

    hook = _load_hook("reference")
    config = {"config_file_path": str(ROOT / "mkdocs.yml")}
    assert not hook.MISSING_DOCSTRING_ALLOWLIST  # every public name has a docstring
    hook.on_pre_build(config)
    # a package with an exported function without a docstring is caught
    pkg = tmp_path / "undocumented_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        '"""A package."""\n\n__all__ = ["f", "g"]\n\n\ndef f():\n    return 1\n\n\n'
        'def g():\n    """Documented."""\n'
    )
    (tmp_path / "mkdocs.yml").write_text("")
    with monkeypatch.context() as m:
        m.setattr(hook, "PACKAGE", "undocumented_pkg")
        m.setattr(hook, "EXTRA_MODULES", [])
        assert hook.missing_docstrings(tmp_path) == ["undocumented_pkg.f"]
        with pytest.raises(PluginError, match=r"undocumented_pkg\.f"):
            hook.on_pre_build({"config_file_path": str(tmp_path / "mkdocs.yml")})
    # an allowlisted name that has a docstring is reported, so the list cannot go stale
    monkeypatch.setattr(hook, "MISSING_DOCSTRING_ALLOWLIST", {"quests_torch.entropy"})
    with caplog.at_level(logging.WARNING):
        hook.on_pre_build(config)
    assert "quests_torch.entropy" in caplog.text


@needs_mkdocs
def test_allowlisted_griffe_warnings_do_not_count(monkeypatch):
    hook = _load_hook("reference")
    allowed = "Parameter 'a, b' does not appear in the function signature"
    monkeypatch.setattr(hook, "DOCSTRING_WARNING_ALLOWLIST", {allowed})

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("mkdocs.plugins.griffe", logging.WARNING, "", 0, message, (), None)

    tolerated = record(f"griffe: quests_torch/x.py:12: {allowed}")
    assert hook._filter.filter(tolerated) and tolerated.levelno == logging.INFO
    other = record(
        "griffe: quests_torch/x.py:12: Parameter 'q' does not appear in the function signature"
    )
    assert hook._filter.filter(other) and other.levelno == logging.WARNING


@needs_mkdocs
def test_build_executes_a_notebook_with_its_figures(tmp_path):
    """The kernel path of ``make docs`` (nbclient + ipykernel) on the shortest notebook."""
    import nbformat

    hook = _load_hook("notebooks")
    copy = tmp_path / "nb.ipynb"
    copy.write_bytes((ROOT / "notebooks" / "05_differentiable_entropy.ipynb").read_bytes())
    workdir = tmp_path / "run"
    workdir.mkdir()
    hook._execute(copy, workdir)
    cells = [c for c in nbformat.read(copy, as_version=4).cells if c.cell_type == "code"]
    outputs = [o for c in cells for o in c.outputs]
    assert all(c.execution_count for c in cells)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # inline figures
    assert not any(o.output_type == "error" for o in outputs)


@needs_mkdocs
def test_a_failing_notebook_fails_the_build(tmp_path):
    import nbformat
    from mkdocs.exceptions import PluginError

    hook = _load_hook("notebooks")
    path = tmp_path / "bad.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('boom')")])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    with pytest.raises(PluginError, match=r"bad\.ipynb failed to run(.|\n)*boom"):
        hook._execute(path, tmp_path)
