"""MkDocs hook: the generated reference pages and the docstring check.

- ``reference/index.md`` documents every name in ``quests_torch.__all__`` (one
  ``::: quests_torch.NAME`` block each; modules link to their own page), so a name added
  to ``__all__`` appears without editing the docs.
- ``reference/cli.md`` renders ``build_parser()`` (the top-level parser and every
  subcommand's ``--help``), so the CLI reference cannot drift from the code.
- A public name of the documented modules without a docstring fails the build (strict or
  not): see ``MISSING_DOCSTRING_ALLOWLIST``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
from pathlib import Path

import griffe
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.reference")

PACKAGE = "quests_torch"
# modules with a page of their own besides those named in ``quests_torch.__all__``
EXTRA_MODULES = ["quests_torch.integrations.torch_sim"]

# Public names documented on the site that may lack a docstring: none (emptied on
# 2026-12-01). The build fails on any public name without one; an entry that has gained its
# docstring is reported, so the list cannot go stale silently.
MISSING_DOCSTRING_ALLOWLIST: set[str] = set()

# Docstring problems that griffe reports (a parameter documented that is not in the
# signature: mostly several parameters on one line, ``k, cutoff: ...``, which the Google
# style does not allow) that the build would tolerate: none. Each entry would be griffe's
# message without file and line; an entry that no longer occurs is reported as a warning
# (which fails the strict build).
_NOT_IN_SIGNATURE = " does not appear in the function signature"
DOCSTRING_WARNING_ALLOWLIST: set[str] = set()

# dunder names in ``__all__`` that need no docstring of their own
EXEMPT = {"quests_torch.__version__"}


# ------------------------------------------------------------------ docstring check
def _documented_modules(root: griffe.Module) -> list[griffe.Module]:
    modules = [root]
    for name in root.exports or []:
        member = root.members.get(name)
        if member is not None and member.is_module:
            modules.append(member.final_target if member.is_alias else member)
    for path in EXTRA_MODULES:
        modules.append(root[path.removeprefix(PACKAGE + ".")])
    return modules


def _public_members(obj: griffe.Object) -> list[griffe.Object | griffe.Alias]:
    if obj.is_module and obj.exports is not None:
        names = [n for n in obj.exports if isinstance(n, str)]
        return [obj.members[n] for n in names if n in obj.members]
    return [m for m in obj.members.values() if m.is_public and not m.is_alias]


def _needs_docstring(path: str, obj: griffe.Object, in_class: bool) -> bool:
    if path in EXEMPT:
        return False
    if obj.is_attribute:
        # class fields are described by the class docstring's Attributes section;
        # module constants that are exported need their own attribute docstring
        return (not in_class) or "property" in obj.labels
    return obj.is_function or obj.is_class or obj.is_module


def missing_docstrings(search_path: str | os.PathLike) -> list[str]:
    """Dotted paths (as documented) of public objects without a docstring."""
    root = griffe.load(
        PACKAGE, search_paths=[str(search_path)], docstring_parser="google", resolve_aliases=True
    )
    missing: list[str] = []
    seen: set[str] = set()

    def visit(path: str, obj: griffe.Object | griffe.Alias, in_class: bool) -> None:
        target = obj.final_target if obj.is_alias else obj
        if target.path in seen:
            return
        seen.add(target.path)
        if _needs_docstring(path, target, in_class) and not (
            target.docstring and target.docstring.value.strip()
        ):
            missing.append(path)
        if target.is_class:
            for name, member in target.members.items():
                if member.is_alias or name.startswith("_"):
                    continue
                visit(f"{path}.{name}", member, in_class=True)

    for module in _documented_modules(root):
        visit(module.path, module, in_class=False)
        for member in _public_members(module):
            if member.is_alias and member.final_target.is_module:
                continue  # a module exported by its parent gets its own page
            visit(f"{module.path}.{member.name}", member, in_class=False)
    return sorted(missing)


# ------------------------------------------------------------------ generated pages
def _api_index() -> str:
    package = importlib.import_module(PACKAGE)
    lines = [
        "# `quests_torch`",
        "",
        "Every name of `quests_torch.__all__`, generated from the docstrings (Google style:",
        "arguments, returns and raises; shapes and units as the docstrings state them).",
        "",
        "Modules with their own page:",
        "",
    ]
    names = list(package.__all__)
    modules = [n for n in names if getattr(getattr(package, n), "__spec__", None)]
    for name in modules:
        lines.append(f"- [`quests_torch.{name}`]({name}.md)")
    for path in EXTRA_MODULES:
        short = path.rsplit(".", 1)[-1]
        lines.append(f"- [`{path}`]({short}.md)")
    lines.append("")
    for name in names:
        if name in modules or f"{PACKAGE}.{name}" in EXEMPT:
            continue
        lines += [
            f"::: quests_torch.{name}",
            "    options:",
            "      show_root_full_path: false",
            "",
        ]
    lines += ["", f"`quests_torch.__version__` is `{package.__version__!r}` in this build.", ""]
    return "\n".join(lines)


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse exposes subparsers only through _actions
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _cli_reference() -> str:
    from importlib import import_module

    build_parser = import_module(f"{PACKAGE}.cli").build_parser  # module or package
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: fix it
    try:
        parser = build_parser()
        prog = parser.prog
        parts = [
            "# Command-line reference",
            "",
            "Generated from `quests_torch.cli.build_parser()` at build time: these are the",
            f"`--help` texts of `{prog}` and of each of its subcommands.",
            "",
            "```text",
            parser.format_help().rstrip(),
            "```",
            "",
        ]

        def walk(p: argparse.ArgumentParser, level: int) -> None:
            for _name, sub in _subcommands(p):
                parts.extend([f"{'#' * level} `{sub.prog}`", "", "```text"])
                parts.extend([sub.format_help().rstrip(), "```", ""])
                walk(sub, level + 1)

        walk(parser, 2)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


# ------------------------------------------------------------------ griffe warnings
_GRIFFE_MESSAGE = re.compile(r"^griffe: (?P<where>\S+?):\d+: (?P<message>.*)$", re.S)
_seen_warnings: set[str] = set()


class _AllowlistFilter(logging.Filter):
    """Turns the allowlisted griffe warnings into INFO records (not counted by strict)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        match = _GRIFFE_MESSAGE.match(record.getMessage())
        if match and match["message"] in DOCSTRING_WARNING_ALLOWLIST:
            _seen_warnings.add(match["message"])
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = f"(allowlisted) {record.getMessage()}", ()
        return True


_filter = _AllowlistFilter()


# ------------------------------------------------------------------ hook events
def on_pre_build(config, **kwargs) -> None:
    _seen_warnings.clear()
    griffe_logger = logging.getLogger("mkdocs.plugins.griffe")  # as mkdocstrings names it
    if _filter not in griffe_logger.filters:
        griffe_logger.addFilter(_filter)
    root = Path(config["config_file_path"]).resolve().parent
    missing = set(missing_docstrings(root))
    fixed = sorted(MISSING_DOCSTRING_ALLOWLIST - missing)
    if fixed:
        log.warning(
            "these names have docstrings now: delete them from MISSING_DOCSTRING_ALLOWLIST "
            "in docs/hooks/reference.py: %s",
            ", ".join(fixed),
        )
    new = sorted(missing - MISSING_DOCSTRING_ALLOWLIST)
    if new:
        raise PluginError(
            "public names without a docstring (document them in quests_torch/):\n  "
            + "\n  ".join(new)
        )


def on_files(files, config, **kwargs):
    for uri, content in (
        ("reference/index.md", _api_index()),
        ("reference/cli.md", _cli_reference()),
    ):
        files.append(File.generated(config, uri, content=content))
    return files


def on_post_build(config, **kwargs) -> None:
    stale = sorted(DOCSTRING_WARNING_ALLOWLIST - _seen_warnings)
    if stale:
        log.warning(
            "these docstring warnings no longer occur: delete them from "
            "DOCSTRING_WARNING_ALLOWLIST in docs/hooks/reference.py:\n  %s",
            "\n  ".join(stale),
        )
