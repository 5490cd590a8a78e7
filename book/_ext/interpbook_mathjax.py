"""MathJax served with the book, so its math is typeset offline.

Sphinx's MathJax extension points every page with math at a CDN by default; offline
(a laptop on a train, the headless browser of the tests) the pages would then show raw
TeX. The book's ``[book]`` extra installs ``django-static-mathjax``, a PyPI copy of
MathJax 3 (Apache-2.0, nothing Django-specific is used), and this extension copies the
parts the pages use into ``_static/mathjax/`` when the HTML is written; ``conf.py`` sets
``mathjax_path`` to the local ``tex-mml-chtml.js``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

ENTRY = "tex-mml-chtml.js"
"""The combined MathJax component the pages load (TeX and MathML in, CommonHTML out)."""

PARTS = (ENTRY, "input/tex/extensions", "input/mml", "output/chtml", "a11y", "ui", "adaptors")
"""What MathJax may load next to :data:`ENTRY`: TeX extensions on demand, fonts, menu."""


def mathjax_source() -> Path:
    """The ``es5`` folder of the installed MathJax 3 copy."""
    spec = importlib.util.find_spec("mathjax")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        es5 = Path(root) / "static" / "mathjax" / "es5"
        if (es5 / ENTRY).is_file():
            return es5
    raise ExtensionError(
        "MathJax 3 is not installed: the book serves MathJax itself so math renders offline. "
        "Install the book's extra (`pip install -e '.[book]'`), which brings django-static-mathjax."
    )


def ship_mathjax(app: Sphinx, exception: Exception | None) -> None:
    """Copy the MathJax parts into ``_static/mathjax/`` of an HTML build."""
    if exception is not None or app.builder.format != "html":
        return
    source, dest = mathjax_source(), Path(app.outdir) / "_static" / "mathjax"
    for part in PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, dest / part, dirs_exist_ok=True)
        else:
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / part, dest / part)


def check_installed(app: Sphinx) -> None:
    """Fail at the start of a build, not after executing every page."""
    if app.builder.format == "html":
        mathjax_source()


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", check_installed)
    app.connect("build-finished", ship_mathjax)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
