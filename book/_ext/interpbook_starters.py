"""Sphinx side of the exercise convention (see :mod:`interpbook.starters`).

* ``source-read``: a MyST notebook page's ``starter``/``solution`` tags are expanded into
  the display tags myst-nb and nbclient act on (hidden and skipped / collapsed), before
  myst-nb reads and executes the page.
* ``doctree-read``: the toggle of a solution cell says "Show solution".
* ``html-page-context`` (priority 400, before sphinx-book-theme's handlers at 501):
  every notebook page gets its starter notebook written to ``_sources/<page>.ipynb``
  and ``context["ipynb_source"]`` set, so the theme's download menu offers it. The
  starter is built from the page source, never copied from an executed notebook (which
  has no outputs on a cache hit and would contain the solutions).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from docutils import nodes
from interpbook import starters
from sphinx.application import Sphinx


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
    nbformat.write(starters.starter_notebook(path, book_dir=app.srcdir), dest)
    context["ipynb_source"] = f"{pagename}.ipynb"


def setup(app: Sphinx) -> dict:
    app.connect("source-read", expand_exercise_tags)
    app.connect("doctree-read", label_solutions)
    app.connect("html-page-context", offer_starter, priority=400)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
