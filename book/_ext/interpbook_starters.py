"""Sphinx side of the exercise convention (see :mod:`interpbook.starters`).

* ``source-read``: a MyST notebook page's ``starter``/``solution`` tags are expanded into
  the display tags myst-nb and nbclient act on (hidden and skipped / collapsed), before
  myst-nb reads and executes the page.
* ``doctree-read``: the toggle of a solution cell says "Show solution".
* ``html-page-context`` (priority 400, before sphinx-book-theme's handlers at 501):
  every notebook page gets its starter notebook written to ``_sources/<page>.ipynb``
  and ``context["ipynb_source"]`` set, so the theme's download menu offers it. The
  starter is built from the page source, never copied from an executed notebook (which
  has no outputs on a cache hit and would contain the solutions). Its markdown is plain
  Markdown (citations as text, glued numbers from the executed pages, ``{doc}`` as links
  under ``html_baseurl`` or relative), and its first code cell installs interpbook from
  the wheel this extension ships in ``_static/``.
* ``builder-inited``: the wheel of the package the book was executed with is built
  (``pip wheel --no-deps``, in a copy of the sources, a couple of seconds), cached by a
  digest of the sources under ``interpbook_wheel_cache``, and copied into ``_static/``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from docutils import nodes
from interpbook import starters
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)


def imported_package() -> Path:
    """The folder of the interpbook package the kernels import (maybe not the installed one)."""
    return Path(next(iter(importlib.util.find_spec("interpbook").submodule_search_locations)))


def package_project(package: Path) -> Path:
    """The checkout holding ``pyproject.toml`` for ``package``: the folder above ``src/``,
    else the one the distribution was installed from (``pip install -e``)."""
    candidates = [package.parents[1]]
    direct_url = importlib.metadata.distribution("interpbook").read_text("direct_url.json")
    if direct_url:
        url = json.loads(direct_url).get("url", "")
        if url.startswith("file://"):
            candidates.append(Path(url.removeprefix("file://")))
    for project in candidates:
        if (project / "pyproject.toml").is_file():
            return project
    raise ExtensionError(
        f"interpbook is imported from {package}, not from a source checkout; the book ships "
        "a wheel of the package it executes with, so install it with `pip install -e .`"
    )


def package_wheel(cache: Path) -> Path:
    """A wheel of the imported interpbook sources, built once per source digest into ``cache``."""
    package = imported_package()
    project = package_project(package)
    files = [project / "pyproject.toml", project / "README.md"]
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    folder = cache / h.hexdigest()[:16]
    built = sorted(folder.glob("interpbook-*.whl"))
    if built:
        return built[0]
    with tempfile.TemporaryDirectory() as tmp:  # a clean copy: no stale build/ folder leaks in
        copy = Path(tmp) / "interpbook"
        shutil.copytree(package, copy / "src" / "interpbook", ignore=shutil.ignore_patterns("__pycache__"))
        for path in files:
            shutil.copy2(path, copy / path.name)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
             "-w", str(Path(tmp) / "dist"), str(copy)],
            capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0:
            raise ExtensionError(f"building the interpbook wheel failed:\n{proc.stdout}{proc.stderr}")
        [wheel] = (Path(tmp) / "dist").glob("interpbook-*.whl")
        folder.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheel, folder / wheel.name))


def ship_wheel(app: Sphinx) -> None:
    """Build (or reuse) the package wheel and put it in the output's ``_static/``."""
    if app.builder.format != "html":
        return
    wheel = package_wheel(Path(app.config.interpbook_wheel_cache or Path(app.outdir).parent / "wheels"))
    static = Path(app.outdir) / "_static"
    static.mkdir(parents=True, exist_ok=True)
    shutil.copy2(wheel, static / wheel.name)
    app.interpbook_wheel = wheel.name
    logger.info(f"interpbook: shipping {wheel.name} in _static/")


def wheel_url(app: Sphinx, pagename: str) -> str:
    """Where a starter downloaded from ``pagename`` finds the wheel."""
    if app.config.html_baseurl:
        return f"{app.config.html_baseurl.rstrip('/')}/_static/{app.interpbook_wheel}"
    starter_dir = os.path.dirname(f"_sources/{pagename}")
    return os.path.relpath(f"_static/{app.interpbook_wheel}", starter_dir)


def expand_exercise_tags(app: Sphinx, docname: str, source: list[str]) -> None:
    """Rewrite the page source so exercise tags carry their display tags."""
    source[0] = starters.book_source(source[0])


def label_solutions(app: Sphinx, doctree: nodes.document) -> None:
    """Name the collapsed input of solution cells for what it is."""
    for node in doctree.findall(nodes.container):
        if node.get("nb_element") == "cell_code" and f"tag_{starters.SOLUTION_TAG}" in node["classes"]:
            node["prompt_show"], node["prompt_hide"] = "Show solution", "Hide solution"


def offer_starter(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Write the page's starter notebook next to its source copy and point the theme at it."""
    if doctree is None or pagename not in app.env.all_docs:
        return
    path = Path(app.env.doc2path(pagename))
    if path.suffix != ".md" or not starters.is_notebook_source(path.read_text(encoding="utf-8")):
        return
    dest = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    dest.parent.mkdir(parents=True, exist_ok=True)
    links = starters.BookLinks(
        book_dir=Path(app.srcdir), base_url=app.config.html_baseurl,
        glue_dir=Path(app.env.mystnb_config.output_folder), starter_root="_sources",
    )
    starter = starters.starter_notebook(path, book_dir=app.srcdir, links=links,
                                        install=wheel_url(app, pagename))
    nbformat.write(starter, dest)
    context["ipynb_source"] = f"{pagename}.ipynb"


def setup(app: Sphinx) -> dict:
    app.add_config_value("interpbook_wheel_cache", "", "", types=[str])
    app.connect("builder-inited", ship_wheel)
    app.connect("source-read", expand_exercise_tags)
    app.connect("doctree-read", label_solutions)
    app.connect("html-page-context", offer_starter, priority=400)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
