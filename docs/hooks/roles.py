"""The docstrings' reStructuredText roles and literal blocks, as the site's Markdown.

The docstrings are written for ``help()`` and Sphinx habits: ``:func:`~quests_torch.kde.spans```,
``:mod:`.source``` and ``text::`` before an indented literal block. The API reference is
Markdown (mkdocstrings), which would print them verbatim, so this file rewrites them when the
package is loaded, leaving the sources as they are:

- ``:mod:``, ``:func:``, ``:class:``, ``:meth:``, ``:attr:``, ``:data:``, ``:exc:``,
  ``:obj:``, ``:const:`` (``:py:`` prefix allowed) become mkdocs-autorefs cross-references to
  the object's canonical path: a link where the object has a heading on the site, its name as
  code (with the full path as a tooltip) where it has none (a private helper). The target is
  resolved much as Sphinx would: a full path (``quests_torch.kde.spans``), or a name looked up
  from the docstring's own object outwards (the class, its module, the parent packages),
  a leading ``.`` meaning the same (``.problem.Problem`` in ``quests_torch.kde``).
  ``~`` shows only the last component, ``Title <target>`` shows the title, ``!`` no link.
- A target outside the package must be a builtin or under a known top-level package
  (``EXTERNAL_PACKAGES``: the standard library and the dependencies); it is imported and
  checked where it is installed, and printed as code (no objects inventory is reachable
  offline, so no link).
- ``:math:`...``` becomes inline code, ``.. math::`` a ``latex`` code block (no MathJax).
- ``text::`` + an indented block becomes ``text:`` + a fenced code block (``pycon`` for
  ``>>>`` sessions, ``text`` otherwise); ``text ::`` and a lone ``::`` drop the colons.

A role whose target does not exist, an unknown role or an unknown directive is a WARNING on
the ``mkdocs`` logger, so the strict build fails; it is printed as code meanwhile.

Wiring (mkdocs.yml): this file is a Griffe extension of the mkdocstrings Python handler
(``extensions: [docs/hooks/roles.py]``), converting every docstring of the loaded package
(rendered on the site or not), and an MkDocs hook (``hooks:``), whose ``on_page_content``
fails the build on any role still printed verbatim in an API reference page.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import logging
import re
import sys
from typing import NamedTuple

import griffe

log = logging.getLogger("mkdocs.hooks.roles")  # under "mkdocs": a warning fails --strict

# roles that name a Python object (Sphinx's Python domain)
OBJECT_ROLES = frozenset(
    {"mod", "func", "class", "meth", "attr", "data", "exc", "obj", "const", "type"}
)
# top-level packages a role may point into besides our own: the standard library and the
# dependencies (pyproject.toml). A name under one of them is imported and checked where the
# package is installed; one not installed here is taken on trust.
EXTERNAL_PACKAGES = frozenset(sys.stdlib_module_names) | {
    "torch",
    "numpy",
    "ase",
    "vesin",
    "tqdm",
    "matplotlib",
    "triton",
    "torch_sim",
    "mace",
    "nequip",
    "e3nn",
    "scipy",
    "quests",
}

_ROLE = re.compile(
    r"(?P<code>``(?:(?!\n[ \t]*\n).)+?``)"  # an inline literal (within a paragraph): left alone
    r"|(?<![\w`]):(?:py:)?(?P<role>[a-z]+):`(?P<content>[^`]+)`(?!`)",
    re.S,
)
_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\.\s+(?P<name>[\w-]+)::\s*(?P<arg>.*)$")
_LIST_ITEM = re.compile(r"^\s*(?:[*+-]|\d+[.)])\s+")
_FENCE = re.compile(r"^\s*(```|~~~)")
_EXPLICIT_TITLE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$", re.S)


class Target(NamedTuple):
    """A resolved role target: its canonical dotted path, and whether it is outside the package."""

    path: str
    external: bool = False


# ------------------------------------------------------------------ resolution
_ATTRIBUTES = re.compile(r"^Attributes:[ \t]*\n((?:[ \t]+\S.*\n|[ \t]*\n)+)", re.M)
_ATTRIBUTE_NAME = re.compile(r"^    (\w+)\b(?: \([^)]*\))?:", re.M)


def _documented_attributes(cls: griffe.Object) -> set[str]:
    """The names of a class docstring's ``Attributes:`` section.

    Griffe does not collect instance attributes assigned as a tuple
    (``self.path, self.x = path, x``); the class documents them there.
    """
    if cls.docstring is None:
        return set()
    section = _ATTRIBUTES.search(cls.docstring.value + "\n")
    return set(_ATTRIBUTE_NAME.findall(section[1])) if section else set()


def _class_member(cls: griffe.Object, name: str, rest: list[str]) -> Target | None:
    """``name`` on a class where it is not a member Griffe knows: documented or inherited."""
    if not rest and name in _documented_attributes(cls):
        return Target(f"{cls.path}.{name}")
    for base in cls.bases:  # a base outside the package: ``torch.nn.Module.load_state_dict``
        path = getattr(base, "canonical_path", None)
        if path and path.split(".")[0] != cls.package.name:
            found = _external(".".join([path, name, *rest]))
            if found is not None:
                return found
    return None


def _member(obj: griffe.Object, name: str):
    members = obj.members
    if name not in members and obj.is_class:
        try:
            members = obj.all_members  # inherited members too
        except Exception:  # unresolvable bases: own members only
            pass
    return members.get(name)


def _lookup(package: griffe.Module, path: str) -> Target | None:
    """The object at ``path`` (``package.name`` first), following aliases (imports)."""
    parts = path.split(".")
    if parts[0] != package.name:
        return None
    obj = package
    for i, part in enumerate(parts[1:], start=1):
        if obj.is_alias:
            try:
                obj = obj.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                # an import of an outside name: ``torch`` in ``quests_torch.kde.torch.Tensor``
                return _external(".".join([obj.target_path, *parts[i:]]))
        member = _member(obj, part)
        if member is None:
            return _class_member(obj, part, parts[i + 1 :]) if obj.is_class else None
        obj = member
    if obj.is_alias:
        try:
            obj = obj.final_target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return _external(obj.target_path)
    return Target(obj.path)


def _external(path: str) -> Target | None:
    """``path`` if it names something outside the package that exists (or cannot be checked)."""
    parts = path.split(".")
    top = parts[0]
    if top in EXTERNAL_PACKAGES:
        try:
            installed = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            installed = False
        if not installed:
            return Target(path, external=True)  # not here to check: trust the list
        try:
            obj = importlib.import_module(top)
        except Exception:  # installed but broken: cannot check
            return Target(path, external=True)
    elif hasattr(builtins, top):
        obj = getattr(builtins, top)
    else:
        return None
    for i in range(1, len(parts)):
        if hasattr(obj, parts[i]):
            obj = getattr(obj, parts[i])
            continue
        if not hasattr(obj, "__path__"):  # not a package: no submodule to import
            return None
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return None
    return Target(path, external=True)


def _scopes(obj: griffe.Object) -> list[griffe.Object]:
    """Where a name in ``obj``'s docstring is looked up: its class or module, then outwards."""
    scope = obj if (obj.is_module or obj.is_class) else obj.parent
    scopes = []
    while scope is not None:
        scopes.append(scope)
        scope = scope.parent
    return scopes


def resolve(target: str, obj: griffe.Object) -> Target | None:
    """The object a role's ``target`` names in the docstring of ``obj``, or None.

    A full path (it starts with the package's name) must exist as written. Otherwise the
    name (a leading ``.`` is dropped) is looked up in ``obj``'s class or module and their
    parents, innermost first, then as a name outside the package (``torch.Tensor``) and
    last as a builtin (``float``).
    """
    package = obj.package
    name = target.lstrip(".")
    if not name:
        return None
    if name.split(".")[0] == package.name and not target.startswith("."):
        return _lookup(package, name)
    for scope in _scopes(obj):
        found = _lookup(package, f"{scope.path}.{name}")
        if found is not None:
            return found
    return _external(name)


# ------------------------------------------------------------------ conversion
def _code(text: str) -> str:
    """``text`` as a Markdown code span."""
    text = " ".join(text.split())
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _role(role: str, content: str, obj: griffe.Object, problems: list[str]) -> str:
    """The Markdown for one role (``problems`` gets a message if it cannot be resolved)."""
    content = " ".join(content.split())
    if role == "math":
        return _code(content)
    if role not in OBJECT_ROLES:
        problems.append(f"unknown role :{role}:`{content}`")
        return _code(content)
    explicit = _EXPLICIT_TITLE.match(content)
    if explicit:
        title, target = explicit["title"], explicit["target"].strip()
    else:
        title = target = content
    no_link = target.startswith("!")
    target = target.lstrip("!~")
    if not explicit:
        title = title.lstrip("!")
        title = title[1:].rsplit(".", 1)[-1] if title.startswith("~") else title.lstrip(".")
    if no_link:
        return _code(title)
    found = resolve(target.removesuffix("()"), obj)
    if found is None:
        problems.append(f":{role}:`{content}`: no such object (from {obj.path})")
        return _code(title)
    if found.external:
        if title == found.path:
            return _code(title)
        return f'<span title="{found.path}">{_code(title)}</span>'
    return f'<autoref identifier="{found.path}" optional>{_code(title)}</autoref>'


def _convert_roles(text: str, obj: griffe.Object, problems: list[str]) -> str:
    def replace(match: re.Match) -> str:
        if match["code"]:
            return match["code"]
        return _role(match["role"], match["content"], obj, problems)

    return _ROLE.sub(replace, text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _fenced(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The indented block after line ``start - 1`` (deeper than ``base``) as a fenced block.

    Returns the fence's lines (empty when no block follows) and the index after the block.
    """
    j = start
    while j < len(lines) and not lines[j].strip():
        j += 1
    if j == len(lines) or j == start or _indent(lines[j]) <= base:
        return [], start
    end = j
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
        end += 1
    while not lines[end - 1].strip():
        end -= 1
    body = lines[j:end]
    cut = min(_indent(line) for line in body if line.strip())
    return [line[cut:] if line.strip() else "" for line in body], end


def _convert_blocks(text: str, problems: list[str]) -> list[tuple[bool, str]]:
    """Split ``text`` into (is_code, chunk) pieces, literal blocks and directives fenced."""
    lines = text.split("\n")
    pieces: list[tuple[bool, list[str]]] = [(False, [])]

    def add(code: bool, new: list[str]) -> None:
        if pieces[-1][0] != code:
            pieces.append((code, []))
        pieces[-1][1].extend(new)

    i, fence = 0, None
    while i < len(lines):
        line = lines[i]
        if fence is not None:  # inside a fence written in the docstring
            add(True, [line])
            if line.strip().startswith(fence):
                fence = None
            i += 1
            continue
        if match := _FENCE.match(line):
            fence = match[1]
            add(True, [line])
            i += 1
            continue
        pad = " " * _indent(line)
        directive = _DIRECTIVE.match(line)
        if directive:
            base = len(directive["indent"])
            body, end = _fenced(lines, i + 1, base)
            if directive["name"] != "math":
                problems.append(f"unknown directive .. {directive['name']}::")
            body = ([directive["arg"]] if directive["arg"] else []) + body
            lang = "latex" if directive["name"] == "math" else "text"
            add(True, [f"{pad}```{lang}", *(pad + b if b else "" for b in body), f"{pad}```"])
            i = max(end, i + 1)
            continue
        stripped = line.rstrip()
        if stripped.endswith("::"):
            if item := _LIST_ITEM.match(line):  # "* text::": the block belongs to the item
                pad = " " * len(item[0])
            body, end = _fenced(lines, i + 1, len(pad))
            if body:
                if stripped == pad + "::" or stripped[:-2].endswith(" "):
                    head = stripped[:-2].rstrip()  # "text ::" and a lone "::": no colon
                else:
                    head = stripped[:-1]  # "text::" reads "text:"
                if head.strip():
                    add(False, [head, ""])
                lang = "pycon" if body[0].lstrip().startswith(">>>") else "text"
                add(True, [f"{pad}```{lang}", *(pad + b if b else "" for b in body), f"{pad}```"])
                if end < len(lines) and lines[end].strip():
                    add(False, [""])  # text right after the block: a paragraph of its own
                i = end
                continue
        add(False, [line])
        i += 1
    return [(code, "\n".join(chunk)) for code, chunk in pieces if chunk]


def convert(text: str, obj: griffe.Object) -> tuple[str, list[str]]:
    """``text`` (the docstring of ``obj``) with its roles and literal blocks as Markdown.

    Returns the new text and the problems found (unresolved roles, unknown roles or
    directives), each a message; the text is usable either way.
    """
    problems: list[str] = []
    out = []
    for code, chunk in _convert_blocks(text, problems):
        out.append(chunk if code else _convert_roles(chunk, obj, problems))
    return "\n".join(out), problems


def _objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def convert_package(package: griffe.Module) -> list[str]:
    """Convert every docstring of ``package`` in place; the problems, with file and line."""
    problems: list[str] = []
    for obj in _objects(package):
        docstring = obj.docstring
        if docstring is None or getattr(docstring, "_quests_roles_done", False):
            continue
        original = docstring.value
        new, found = convert(original, obj)
        docstring.value = new
        docstring._quests_roles_done = True
        try:
            where = str(obj.relative_package_filepath)  # quests_torch/kde/fused.py
        except (ValueError, AttributeError, TypeError):
            where = obj.path
        for message in found:
            line = docstring.lineno or 0
            if match := re.match(r"(:[\w:]+:`[^`]+`)", message):  # where in the docstring
                words = [re.escape(w) for w in match[1].split()]
                if at := re.search(r"\s+".join(words), original):
                    line += original.count("\n", 0, at.start())
            problems.append(f"{where}:{line}: {message}")
    return problems


class ReSTRoles(griffe.Extension):
    """Griffe extension: converts the docstrings of each loaded package (see the module)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for problem in convert_package(pkg):
            log.warning("docstring role: %s", problem)


# ------------------------------------------------------------------ mkdocs hook
_VERBATIM = re.compile(r":(?:py:)?[a-z]+:<code>|::</p>|\.\. [\w-]+::")


def on_page_content(html: str, page, **kwargs) -> str:
    """Fails the strict build on reST (a role, ``::``, a directive) left in an API page."""
    if page.file.src_uri.startswith("reference/"):
        left = sorted(set(_VERBATIM.findall(html)))
        if left:
            log.warning(
                "%s: reStructuredText printed verbatim (%s): is the Griffe extension "
                "docs/hooks/roles.py in mkdocs.yml?",
                page.file.src_uri,
                ", ".join(left),
            )
    return html
