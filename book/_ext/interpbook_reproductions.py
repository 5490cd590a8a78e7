"""The generated Reproductions appendix.

Every :func:`interpbook.records.record` call leaves a reproduction card in its cell
output, with a JSON copy of the record embedded in the card's HTML. This extension
collects those records from each page's doctree when the page is read (so records served
from the execution cache count too), keeps them in the build environment, and replaces
the ``{reproductions}`` directive with a table of all of them when pages are written.
"""

from __future__ import annotations

from docutils import nodes
from docutils.parsers.rst import Directive
from interpbook.records import HTML_CLASS, Record, format_value, records_in_html
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

COLUMNS = ("Page", "Finding", "Paper", "Ours", "Units", "Verdict", "Note")


class reproductions_table(nodes.General, nodes.Element):
    """Placeholder replaced by the table at ``doctree-resolved``."""


class ReproductionsDirective(Directive):
    """``{reproductions}``: where the table of every recorded reproduction goes."""

    def run(self) -> list[nodes.Node]:
        env = self.state.document.settings.env
        env.interpbook_table_pages = getattr(env, "interpbook_table_pages", set()) | {env.docname}
        return [reproductions_table()]


def _records(env: BuildEnvironment) -> dict[str, list[dict]]:
    if not hasattr(env, "interpbook_records"):
        env.interpbook_records = {}
    return env.interpbook_records


def collect_records(app: Sphinx, doctree: nodes.document) -> None:
    """Store the records embedded in the page's raw HTML outputs (duplicates once)."""
    found: list[dict] = []
    for node in doctree.findall(nodes.raw):
        if "html" in node.get("format", "").split() and HTML_CLASS in node.astext():
            for rec in records_in_html(node.astext()):
                if rec.to_dict() not in found:
                    found.append(rec.to_dict())
    if found:
        _records(app.env)[app.env.docname] = found


def purge_records(app: Sphinx, env: BuildEnvironment, docname: str) -> None:
    _records(env).pop(docname, None)
    getattr(env, "interpbook_table_pages", set()).discard(docname)


def merge_records(app: Sphinx, env: BuildEnvironment, docnames: set[str], other: BuildEnvironment) -> None:
    _records(env).update({d: r for d, r in _records(other).items() if d in docnames})
    env.interpbook_table_pages = getattr(env, "interpbook_table_pages", set()) | {
        d for d in getattr(other, "interpbook_table_pages", set()) if d in docnames
    }


def table_pages_outdated(app, env, added, changed, removed) -> list[str]:
    """Re-write the table pages whenever any page was re-read (its records may have changed)."""
    return sorted(getattr(env, "interpbook_table_pages", set())) if added | changed | removed else []


def _row(cells: list[nodes.Node]) -> nodes.row:
    row = nodes.row()
    for cell in cells:
        entry = nodes.entry()
        entry += cell if isinstance(cell, nodes.paragraph) else nodes.paragraph("", "", cell)
        row += entry
    return row


def _table(app: Sphinx, fromdocname: str) -> nodes.Node:
    records = _records(app.env)
    if not records:
        return nodes.paragraph("", "No reproductions are recorded in this build yet.")
    table = nodes.table(classes=["interpbook-reproductions"])
    group = nodes.tgroup(cols=len(COLUMNS))
    table += group
    group.extend(nodes.colspec(colwidth=1) for _ in COLUMNS)
    head = nodes.thead()
    head += _row([nodes.Text(c) for c in COLUMNS])
    body = nodes.tbody()
    for docname in sorted(records):
        title = app.env.titles[docname].astext() if docname in app.env.titles else docname
        for data in records[docname]:
            rec = Record.from_dict(data)
            link = nodes.reference("", title, internal=True,
                                   refuri=app.builder.get_relative_uri(fromdocname, docname))
            body += _row([
                link,
                nodes.Text(rec.name),
                nodes.Text(format_value(rec.paper) + (f" ({rec.paper_ref})" if rec.paper_ref else "")),
                nodes.Text(format_value(rec.ours)),
                nodes.Text(rec.units),
                nodes.strong("", rec.verdict),
                nodes.Text(rec.note),
            ])
    group += head
    group += body
    return table


def fill_tables(app: Sphinx, doctree: nodes.document, fromdocname: str) -> None:
    for node in list(doctree.findall(reproductions_table)):
        node.replace_self(_table(app, fromdocname))


def setup(app: Sphinx) -> dict:
    app.add_node(reproductions_table)
    app.add_directive("reproductions", ReproductionsDirective)
    app.connect("doctree-read", collect_records)
    app.connect("env-purge-doc", purge_records)
    app.connect("env-merge-info", merge_records)
    app.connect("env-get-outdated", table_pages_outdated)
    app.connect("doctree-resolved", fill_tables)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
