"""docs/hooks/roles.py: the docstrings' reST roles and ``::`` blocks become the site's Markdown.

Unit tests of the converter on small packages (relative names, ``~``, leading dots, methods and
attributes, names outside the package, literal blocks, math), every docstring of quests_torch
converting without a problem, and a strict build of a tiny site failing on an unresolved
role. The built API reference itself is checked in ``tests/test_docs.py``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "roles.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("griffe") is None,
    reason="the docs extra is not installed (it needs Python >= 3.11)",
)


@pytest.fixture(scope="module")
def roles():
    spec = importlib.util.spec_from_file_location("_docs_hook_roles", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODULES = {
    "__init__.py": '''
        """The package: :mod:`.geometry` and :class:`~.geometry.Cell`."""
        from .geometry import Cell, volume
    ''',
    "geometry.py": '''
        """Cells."""
        import numpy as np
        import torch


        class Base:
            """A base."""

            def shared(self):
                """Inherited by :class:`Cell`."""


        class Cell(Base):
            """A cell; see :meth:`scaled` and :attr:`rows`.

            Attributes:
                rows: ``[3, 3]`` the rows.
                origin (tuple): where it starts.
            """

            def __init__(self, rows):
                self.rows, self.origin = rows, (0, 0, 0)  # a tuple: Griffe misses them

            def scaled(self, factor):
                """Scaled copy (:attr:`rows` times ``factor``); :meth:`shared` is inherited."""

            @property
            def size(self):
                """Rows."""


        class Layer(torch.nn.Module):
            """A module: :meth:`load_state_dict` is torch's."""


        def volume(cell):
            """Volume of a :class:`Cell` as :class:`np.ndarray`."""
    ''',
    "sub/__init__.py": '''"""Subpackage."""''',
    "sub/leaf.py": '''
        """Leaf: :mod:`.geometry` is two levels up, :func:`.sibling.helper` next door."""
    ''',
    "sub/sibling.py": '''
        """Sibling."""


        def helper():
            """Help."""
    ''',
}


@pytest.fixture(scope="module")
def pkg():
    import griffe

    modules = {name: textwrap.dedent(text).lstrip() for name, text in MODULES.items()}
    with griffe.temporary_visited_package("cellpkg", modules) as package:
        yield package


def _ref(path: str, title: str) -> str:
    return f'<autoref identifier="{path}" optional>`{title}`</autoref>'


def test_relative_names_tilde_and_leading_dots(roles, pkg):
    text, problems = roles.convert(pkg.docstring.value, pkg)
    assert problems == []
    assert _ref("cellpkg.geometry", "geometry") in text  # ":mod:`.geometry`" drops the dot
    assert _ref("cellpkg.geometry.Cell", "Cell") in text  # "~" keeps the last component
    leaf = pkg["sub.leaf"]
    text, problems = roles.convert(leaf.docstring.value, leaf)
    assert problems == []
    # looked up outwards: the module, its package, the top package
    assert _ref("cellpkg.geometry", "geometry") in text
    assert _ref("cellpkg.sub.sibling.helper", "sibling.helper") in text


def test_full_paths_titles_and_no_link(roles, pkg):
    leaf = pkg["sub.leaf"]
    cases = {
        ":func:`cellpkg.geometry.volume`": _ref(
            "cellpkg.geometry.volume", "cellpkg.geometry.volume"
        ),
        ":py:func:`~cellpkg.volume`": _ref("cellpkg.geometry.volume", "volume"),  # canonical
        ":class:`the cell <cellpkg.geometry.Cell>`": _ref("cellpkg.geometry.Cell", "the cell"),
        ":func:`cellpkg.volume()`": _ref("cellpkg.geometry.volume", "cellpkg.volume()"),
        ":func:`!not_checked`": "`not_checked`",
    }
    for role, markdown in cases.items():
        assert roles.convert(role, leaf) == (markdown, []), role


def test_methods_and_attributes(roles, pkg):
    cell = pkg["geometry.Cell"]
    text, problems = roles.convert(cell.docstring.value, cell)
    assert problems == []
    assert _ref("cellpkg.geometry.Cell.scaled", "scaled") in text  # the class's own method
    # an instance attribute Griffe does not see, named in the class's Attributes section
    assert _ref("cellpkg.geometry.Cell.rows", "rows") in text
    scaled = pkg["geometry.Cell.scaled"]
    text, problems = roles.convert(scaled.docstring.value, scaled)
    assert problems == []
    assert _ref("cellpkg.geometry.Cell.rows", "rows") in text  # from a method: its class
    assert _ref("cellpkg.geometry.Base.shared", "shared") in text  # inherited
    module = pkg["geometry"]
    for role, path in {
        ":meth:`Cell.scaled`": "cellpkg.geometry.Cell.scaled",
        ":attr:`Cell.size`": "cellpkg.geometry.Cell.size",
        ":attr:`Cell.origin`": "cellpkg.geometry.Cell.origin",
    }.items():
        text, problems = roles.convert(role, module)
        assert problems == [] and f'identifier="{path}"' in text, role


def test_names_outside_the_package(roles, pkg):
    module = pkg["geometry"]
    cases = {
        ":class:`torch.Tensor`": "`torch.Tensor`",
        ":class:`~torch.Tensor`": '<span title="torch.Tensor">`Tensor`</span>',
        ":mod:`torch.distributed`": "`torch.distributed`",  # a submodule
        ":exc:`ValueError`": "`ValueError`",  # a builtin
        ":func:`json.dumps`": "`json.dumps`",  # the standard library
        ":class:`np.ndarray`": '<span title="numpy.ndarray">`np.ndarray`</span>',  # an import
    }
    for role, markdown in cases.items():
        assert roles.convert(role, module) == (markdown, []), role
    layer = pkg["geometry.Layer"]
    text, problems = roles.convert(layer.docstring.value, layer)
    assert problems == [] and 'title="torch.nn.Module.load_state_dict"' in text  # a base's


@pytest.mark.parametrize(
    "role",
    [
        ":func:`cellpkg.geometry.volum`",  # a typo in a full path: no guessing
        ":func:`volum`",
        ":class:`.geometry.Cel`",
        ":meth:`Cell.scale`",
        ":attr:`Cell.rows.real`",  # documented attributes have no members
        ":class:`torch.Tensr`",  # outside names are checked where installed
        ":func:`json.dumpz`",
        ":class:`nowhere.Thing`",  # not a known outside package
        ":ref:`a-label`",  # not a Python role
    ],
)
def test_unresolved_roles_are_problems(roles, pkg, role):
    text, problems = roles.convert(f"See {role}.", pkg["geometry"])
    assert len(problems) == 1 and role.split("`")[1] in problems[0]
    assert text.startswith("See `") and ":" not in text.split("`")[0][4:]  # code, not verbatim


def test_literal_blocks_and_math(roles, pkg):
    module = pkg["geometry"]
    doc = textwrap.dedent(
        """\
        Summary with ``:class:`inline literal``` left alone and :math:`x^2`.

        The formula::

            H = -(1/n) sum_i log p_i
              indented :class:`NotARole`

        Expanded ::

            a = 1

        ::

            b = 2

        * an item whose block is indented::

              c = 3

          the item goes on.

        Example::

            >>> volume(cell)

        .. math::

            E = m c^2

        Args:
            cell: a :class:`Cell`.
        """
    )
    text, problems = roles.convert(doc, module)
    assert problems == []
    expected = textwrap.dedent(
        """\
        Summary with ``:class:`inline literal``` left alone and `x^2`.

        The formula:

        ```text
        H = -(1/n) sum_i log p_i
          indented :class:`NotARole`
        ```

        Expanded

        ```text
        a = 1
        ```

        ```text
        b = 2
        ```

        * an item whose block is indented:

          ```text
          c = 3
          ```

          the item goes on.

        Example:

        ```pycon
        >>> volume(cell)
        ```

        ```latex
        E = m c^2
        ```

        Args:
            cell: a <autoref identifier="cellpkg.geometry.Cell" optional>`Cell`</autoref>.
        """
    )
    assert text == expected
    # a Google section after the conversion is still a section
    import griffe

    sections = griffe.Docstring(text, parent=module).parse("google")
    assert [s.kind.value for s in sections] == ["text", "parameters"]
    # "::" with nothing indented after it is left as it is; unknown directives are reported
    assert roles.convert("Ends with::\n\nflush text", module) == ("Ends with::\n\nflush text", [])
    text, problems = roles.convert(".. note::\n\n    Careful.", module)
    assert problems == ["unknown directive .. note::"] and "Careful." in text


def test_package_conversion_reports_file_and_line_once(roles, pkg, caplog):
    import griffe

    source = '"""Fine."""\n\n\ndef f():\n    """First line.\n\n    See :func:`g`.\n    """\n'
    with griffe.temporary_visited_package("badpkg", {"mod.py": source}) as package:
        with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.roles"):
            roles.ReSTRoles().on_package(pkg=package)
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "badpkg/mod.py:7: :func:`g`: no such object (from badpkg.mod.f)" in caplog.text
        value = package["mod.f"].docstring.value
        assert value.endswith("See `g`.")
        assert roles.convert_package(package) == []  # converted once: not again
        assert package["mod.f"].docstring.value == value


def test_every_docstring_of_the_package_resolves(roles):
    """The roles of every docstring of quests_torch (on the site or not) name real objects."""
    import griffe

    package = griffe.load("quests_torch", search_paths=[str(ROOT)], docstring_parser="google")
    assert roles.convert_package(package) == []
    text = package["kde"].docstring.value
    assert ":mod:`" not in text and ":class:`" not in text
    assert _ref("quests_torch.kde.problem.Problem", "Problem") in text


def test_verbatim_roles_in_a_reference_page_warn(roles, caplog):
    class Page:
        class file:
            src_uri = "reference/kde.md"

    with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.roles"):
        roles.on_page_content("<p>See :class:<code>X</code>.</p>", page=Page)
        assert "reference/kde.md" in caplog.text and ":class:<code>" in caplog.text
        caplog.clear()
        roles.on_page_content("<p>See <code>X</code>.</p>", page=Page)
        assert caplog.text == ""


def test_strict_build_fails_on_an_unresolved_role(tmp_path):
    """End to end: mkdocstrings with the extension, a role naming nothing, ``--strict``."""
    (tmp_path / "typopkg").mkdir()
    (tmp_path / "typopkg" / "__init__.py").write_text(
        '"""A package."""\n\n\ndef f():\n    """Like :func:`g`, see :func:`h`."""\n\n\n'
        'def h():\n    """Documented."""\n'
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# API\n\n::: typopkg\n")
    (tmp_path / "mkdocs.yml").write_text(
        textwrap.dedent(
            f"""\
            site_name: t
            theme: mkdocs
            hooks: [{HOOK}]
            plugins:
              - mkdocstrings:
                  handlers:
                    python:
                      paths: [.]
                      options:
                        extensions: [{HOOK}]
                        docstring_style: google
            """
        )
    )
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", "site"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "typopkg/__init__.py:5: :func:`g`: no such object (from typopkg.f)" in run.stderr
    assert ":func:`h`" not in run.stderr  # the role that resolves is quiet
    # without --strict it builds, the unresolved role as code and the other one as a link
    run = subprocess.run(cmd[:4] + cmd[5:], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    html = (tmp_path / "site" / "index.html").read_text()
    assert "Like <code>g</code>" in html
    assert 'href="#typopkg.h"><code>h</code></a>' in html
