"""MkDocs hook: the notebooks of ``notebooks/``, executed at build time, as site pages.

The notebooks are committed without outputs (``tests/test_notebooks.py`` checks it). Each
build copies them to a temporary folder, runs them there with a Jupyter kernel of the
building Python (``nbclient``; files they write land in that folder, not in the checkout)
and hands the executed copies to mkdocs-jupyter, which renders them with their outputs.

``QUESTS_DOCS_EXECUTE=0`` renders them unexecuted (code only), for a quick build; any
other value, or none, executes them. A cell that raises fails the build.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.notebooks")

TIMEOUT_PER_CELL = 600  # seconds
_tmp: tempfile.TemporaryDirectory | None = None


def _execute(path: Path, workdir: Path) -> None:
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env = {
        # figures as inline PNGs whatever the caller's MPLBACKEND (pytest sets Agg)
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "QUESTS_TORCH_CACHE": str(workdir / "cache"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(
            nb,
            timeout=TIMEOUT_PER_CELL,
            kernel_name="python3",
            resources={"metadata": {"path": str(workdir)}},
        )
        client.execute()
    except Exception as err:  # CellExecutionError, DeadKernelError, timeouts
        raise PluginError(f"notebook {path.name} failed to run:\n{err}") from err
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nbformat.write(nb, path)


@event_priority(100)  # before mkdocs-jupyter's on_files picks up the .ipynb files
def on_files(files, config, **kwargs):
    global _tmp
    root = Path(config["config_file_path"]).resolve().parent
    sources = sorted((root / "notebooks").glob("*.ipynb"))
    execute = os.environ.get("QUESTS_DOCS_EXECUTE", "1") != "0"
    _tmp = tempfile.TemporaryDirectory(prefix="quests-docs-nb-")
    src_dir = Path(_tmp.name) / "src"
    (src_dir / "notebooks").mkdir(parents=True)
    total = time.perf_counter()
    for source in sources:
        target = src_dir / "notebooks" / source.name
        shutil.copyfile(source, target)
        if execute:
            workdir = Path(_tmp.name) / "run" / source.stem
            workdir.mkdir(parents=True)
            t0 = time.perf_counter()
            _execute(target, workdir)
            log.info("executed %s in %.1f s", source.name, time.perf_counter() - t0)
        files.append(
            File(
                f"notebooks/{source.name}",
                str(src_dir),
                config["site_dir"],
                config["use_directory_urls"],
            )
        )
    if execute:
        log.info("executed %d notebooks in %.1f s", len(sources), time.perf_counter() - total)
    return files


def on_post_build(config, **kwargs) -> None:
    global _tmp
    if _tmp is not None:
        _tmp.cleanup()
        _tmp = None
