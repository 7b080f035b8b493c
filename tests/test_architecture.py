"""The package's shape, checked mechanically (issue 15's criteria; fast, from the AST).

- no module of ``quests_torch`` over :data:`MAX_MODULE_LINES` lines;
- no function over :data:`MAX_FUNCTION_LINES` lines (its docstring not counted) except the
  hot numeric kernels of :data:`LONG_KERNELS`, each with the reason it stays whole;
- no module importing another module's ``_private`` name (private modules such as
  ``_precision`` are the package's own and may be imported; their public names only);
- no comment or docstring citing "SPEC section": comments cite the paper or the README;
- a parameter followed from the command line to the kernel enters the stages in order,
  structures -> neighbours -> descriptors -> kernel sums -> metrics, each once per batch.
"""

from __future__ import annotations

import ast
import io
import itertools
import re
import sys
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quests_torch"
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80

#: functions allowed over MAX_FUNCTION_LINES, each with its reason: only hot numeric kernels
#: whose steps share many block-local tensors, where a split would cost speed. None today:
#: the cell-grid kernel ``neighbors/grid.py::select_block`` was split (its sort keys are a
#: step of their own, one tensor in and out) at no measurable cost.
LONG_KERNELS: set[str] = set()


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the function without its docstring (decorators not counted)."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_module_over_the_limit():
    long = {
        _name(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (make a package): {long}"


def test_no_long_function_outside_the_hot_kernels():
    long, seen = {}, set()
    for path in _modules():
        for node in _functions(ast.parse(path.read_text())):
            key = f"{_name(path)}::{node.name}"
            if _function_lines(node) > MAX_FUNCTION_LINES:
                seen.add(key)
                if key not in LONG_KERNELS:
                    long[key] = _function_lines(node)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split into steps): {long}"
    stale = LONG_KERNELS - seen
    assert not stale, f"allowlisted kernels now short enough (drop them): {sorted(stale)}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _target_module(path: Path, node: ast.ImportFrom) -> Path | None:
    """The folder or module file of the package that ``node`` imports from, or ``None``
    for an import from outside the package."""
    if node.level == 0:
        if not (node.module or "").startswith("quests_torch"):
            return None
        base, parts = PACKAGE.parent, node.module.split(".")
    else:
        base = path.parent
        for _ in range(node.level - 1):
            base = base.parent
        parts = node.module.split(".") if node.module else []
    target = base.joinpath(*parts)
    return target if target.is_dir() else target.with_suffix(".py")


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _target_module(path, node)
        if target is None or target == path:
            continue
        for alias in node.names:
            if not _is_private(alias.name):
                continue
            # a private submodule (``from . import _memory``) is the package's own
            submodule = target / alias.name if target.is_dir() else None
            if submodule is not None and (
                submodule.with_suffix(".py").exists() or submodule.is_dir()
            ):
                continue
            found.append(f"{_name(path)}:{node.lineno} imports {alias.name}")
    return found


def test_no_private_name_imported_across_modules():
    found = [hit for path in _modules() for hit in _private_imports(path)]
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def test_the_private_import_check_sees_one(tmp_path):
    pkg = tmp_path / "quests_torch"
    pkg.mkdir()
    (pkg / "a.py").write_text("def _hidden():\n    return 1\n")
    (pkg / "b.py").write_text("from .a import _hidden\nfrom .a import __doc__\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        assert _private_imports(pkg / "b.py") == ["b.py:1 imports _hidden"]
    finally:
        PACKAGE = saved


_SPEC = re.compile(r"\bSPEC\b")


def _comments_and_strings(text: str):
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            yield tok.start[0], tok.string


def test_comments_cite_the_paper_or_the_readme_not_a_spec():
    hits = [
        f"{_name(p)}:{line}"
        for p in _modules()
        for line, text in _comments_and_strings(p.read_text())
        if _SPEC.search(text)
    ]
    assert not hits, f'comments or docstrings citing "SPEC": {hits}'


# ------------------------------------------------------------------ the data path, in order

#: the stages of the data path, by the package folder or module their code lives in
STAGES = {
    "structures.py": "structures",
    "neighbors": "neighbors",
    "descriptors.py": "descriptors",
    "kde": "kde",
    "metrics.py": "metrics",
    "metric_functions.py": "metrics",  # the functions that metrics.py re-exports
}


def _stage_of(filename: str) -> str | None:
    path = Path(filename)
    try:
        rel = path.resolve().relative_to(PACKAGE)
    except ValueError:
        return None
    return STAGES.get(rel.parts[0])


def test_a_parameter_from_the_cli_enters_each_stage_once_in_order(tmp_path, capsys):
    """``quests-torch entropy -k 12 -c 4.5 -b 0.02`` on a small file: the outermost call of
    each stage, in the order the calls return (the stage's work is done), is structures ->
    neighbours -> descriptors -> kernel sums -> metrics, each once for the one batch; ``k``
    and ``cutoff`` arrive unchanged at the neighbour search and ``h`` at the kernel's
    scales."""
    ase = pytest.importorskip("ase")
    from ase.build import bulk

    from quests_torch.cli import main

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    path = tmp_path / "cu.extxyz"
    ase.io.write(path, atoms)

    order: list[str] = []
    seen: dict[str, object] = {}

    def profile(frame, event, arg):
        stage = _stage_of(frame.f_code.co_filename)
        if stage is None:
            return
        if event == "call":  # the parameters as the kernels receive them
            name = frame.f_code.co_name
            if stage == "neighbors" and name == "find_k_nearest":
                seen.setdefault("k, cutoff", (frame.f_locals["k"], frame.f_locals["cutoff"]))
            if stage == "kde" and name == "_set_scales":
                seen.setdefault("h", list(frame.f_locals["hs"]))
            return
        if event != "return":
            return
        caller = frame.f_back
        if caller is not None and _stage_of(caller.f_code.co_filename) == stage:
            return  # an inner call of the same stage
        if not order or order[-1] != stage:
            order.append(stage)

    sys.setprofile(profile)
    try:
        main(["entropy", str(path), "-k", "12", "-c", "4.5", "-b", "0.02", "-q"])
    finally:
        sys.setprofile(None)
    capsys.readouterr()
    assert order == ["structures", "neighbors", "descriptors", "kde", "metrics"], order
    assert seen == {"k, cutoff": (12, 4.5), "h": [0.02]}


# ------------------------------------------------------------------ the import graph
# Nodes are the package's modules by dotted name (``io``, ``readers.index``, ``kde`` for
# ``kde/__init__.py``, ``""`` for the package itself); an edge is every ``import`` and
# ``from ... import`` anywhere in a module, function bodies included (a function-level import
# runs as soon as the function is called). Imports under ``if TYPE_CHECKING:`` are left out:
# they never run (annotations are strings under ``from __future__ import annotations``).
# Importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so that is an
# edge too, except from a module inside that package (its package is already importing).


def _dotted(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """``id`` of every node under an ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    skip = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None) if isinstance(node, ast.If) else None
        if getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
            skip.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return skip


def _targets(name: str, is_package: bool, node: ast.AST, modules: set[str]) -> list[str]:
    """The package's modules an import statement of module ``name`` loads."""
    if isinstance(node, ast.Import):
        bases = [a.name for a in node.names if a.name.split(".")[0] == "quests_torch"]
        found = [b.partition(".")[2] for b in bases]
    elif node.level == 0 and (node.module or "").split(".")[0] != "quests_torch":
        return []
    else:
        if node.level == 0:
            base = node.module.partition(".")[2]
        else:
            parts = name.split(".") if name else []
            parts = parts if is_package else parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else [])
            base = ".".join(parts)
        # `from pkg import sub` loads the submodule; `from mod import name` the module
        found = [f"{base}.{a.name}".lstrip(".") for a in node.names]
        found = [f if f in modules else base for f in found]
    out = []
    for target in found:
        while target not in modules:  # `import quests_torch.kde.engine.Source` and the like
            target = target.rpartition(".")[0]
        out.append(target)
        parent = target.rpartition(".")[0]
        while parent and not (name == parent or name.startswith(parent + ".")):
            out.append(parent)  # the package's __init__ runs first
            parent = parent.rpartition(".")[0]
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, str]]:
    """``{module: {imported module: "file:line" of the first import}}``, runtime imports."""
    files = {_dotted(p, package): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, dict[str, str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        edges = graph.setdefault(name, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skip:
                is_package = path.name == "__init__.py"
                for target in _targets(name, is_package, node, set(files)):
                    if target != name:
                        where = f"{path.relative_to(package).as_posix()}:{node.lineno}"
                        edges.setdefault(target, where)
    return graph


def _components(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _a_circle(graph: dict[str, dict[str, str]], component: list[str]) -> str:
    """One circle through the component's first module, each step with its import line."""
    start, members = component[0], set(component)
    came: dict[str, str] = {}
    frontier = [start]
    while start not in came:  # breadth first, back to the start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w in members and w not in came:
                    came[w] = v
                    nxt.append(w)
        frontier = nxt
    path, v = [start], came[start]
    while v != start:
        path.append(v)
        v = came[v]
    path.append(start)
    path.reverse()
    steps = [
        f"{a or '<package>'} -> {b or '<package>'} ({graph[a][b]})"
        for a, b in itertools.pairwise(path)
    ]
    return f"{len(component)} modules {component}:\n    " + "\n    ".join(steps)


def _circles(package: Path = PACKAGE) -> list[str]:
    graph = import_graph(package)
    return [_a_circle(graph, component) for component in _components(graph)]


def test_the_package_imports_form_no_circle():
    """No two modules need each other, through function-level imports included: a lazy
    import that dodges a circle means the two modules should share a lower one instead."""
    circles = _circles()
    assert not circles, "import circles among the package's modules:\n" + "\n".join(circles)


def test_the_circle_check_sees_function_level_and_package_imports(tmp_path):
    pkg = tmp_path / "quests_torch"
    (pkg / "p").mkdir(parents=True)
    files = {
        "__init__.py": "from . import a, e\n",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .a import g\n",  # a function-level import closes a -> b
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n",
        "d.py": "from . import c\n",  # c -> d only for the type checker: no circle
        "e.py": "def f():\n    from .p.q import f\n",  # runs p/__init__ first
        "p/__init__.py": "from .q import f\nfrom . import r\n",
        "p/q.py": "f = 1\n",
        "p/r.py": "from .. import e\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    circles = _circles(pkg)
    assert len(circles) == 2, circles
    assert circles[0].startswith("2 modules ['a', 'b']:\n    a -> b (a.py:1)\n    b -> a (b.py:2)")
    assert circles[1].startswith("3 modules ['e', 'p', 'p.r']:\n    e -> p (e.py:2)")


#: the lowest modules and all they may import from the package, directly or through others:
#: everything builds on them, so they must stay leaves (the one device rule lives in
#: ``devices``, the file helpers of every writer in ``_files``)
LEAVES: dict[str, set[str]] = {
    "_files": set(),
    "_version": set(),
    "checks": set(),
    "devices": set(),
    "structures": {"checks", "devices"},
    "resume": {"_files", "_version"},
}

#: the store and the frame readers sit below the generic I/O and the applications that use
#: them (a prefix covers a package's modules: every ``readers.*`` format)
BELOW_IO = ("store", "store_files", "resume", "readers")
ABOVE_THEM = ("io", "screen_io", "screening", "store_writer", "metrics", "")


def _reach(graph: dict[str, dict[str, str]], name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or (p and name.startswith(p + ".")) for p in prefixes)


def test_the_lower_layers_do_not_import_the_upper_ones():
    graph = import_graph()
    wrong = [
        f"{name} reaches {sorted(_reach(graph, name) - allowed)}"
        for name, allowed in LEAVES.items()
        if _reach(graph, name) - allowed
    ]
    for name in sorted(graph):
        if _in(name, BELOW_IO):
            above = sorted(n or "<package>" for n in _reach(graph, name) if _in(n, ABOVE_THEM))
            if above:
                wrong.append(f"{name} reaches {above}")
    # the readers are the store's peers, not its users
    wrong += [
        f"{name} reaches the store"
        for name in sorted(graph)
        if _in(name, ("readers",)) and _reach(graph, name) & {"store", "store_files"}
    ]
    assert not wrong, "lower layers importing upper ones:\n" + "\n".join(wrong)
