"""Citations in section titles read as citations in the navigation, never as bib keys.

A heading such as ``## Patchscopes {cite:p}`ghandeharioun2024patchscopes``` is rendered
properly in the page body by sphinxcontrib-bibtex, but Sphinx copies the *unresolved*
citation (its key) into the page's table of contents ("On this page"), the left
navigation and the HTML ``<title>``. After Sphinx has collected those copies
(``doctree-read``, priority 600, after its collectors at 500), this extension replaces
each citation in them by its text, e.g. "(Ghandeharioun et al., 2024)".
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes
from interpbook.citations import cite, load_bibliography
from sphinx.application import Sphinx

_STYLE_PREFIX = "cite-"


def bibliography(app: Sphinx) -> dict:
    """The book's references, parsed once per build."""
    if not hasattr(app, "_interpbook_refs"):
        app._interpbook_refs = {}
        for name in app.config.bibtex_bibfiles:
            app._interpbook_refs.update(load_bibliography(Path(app.srcdir) / name))
    return app._interpbook_refs


def citation_text(app: Sphinx, node: nodes.inline) -> str:
    """The text of an unresolved citation node (classes ``xref cite cite-STYLE``)."""
    style = next((c[len(_STYLE_PREFIX):] for c in node["classes"] if c.startswith(_STYLE_PREFIX)), "p")
    try:
        return cite(style, node.astext(), bibliography(app))
    except LookupError:  # sphinxcontrib-bibtex warns about the unknown key itself
        return node.astext()


def render_citations(app: Sphinx, tree: nodes.Node) -> None:
    """Replace every citation node below ``tree`` by its text."""
    for node in list(tree.findall(nodes.inline)):
        if "cite" in node["classes"] and "xref" in node["classes"]:
            node.parent.replace(node, nodes.Text(citation_text(app, node)))


def clean_title_copies(app: Sphinx, doctree: nodes.document) -> None:
    """Render the citations in the copies of the page's titles that Sphinx keeps."""
    env = app.env
    for store in (env.tocs, env.titles, env.longtitles):
        if env.docname in store:
            render_citations(app, store[env.docname])


def setup(app: Sphinx) -> dict:
    app.connect("doctree-read", clean_title_copies, priority=600)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
