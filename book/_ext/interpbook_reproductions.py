"""The generated Reproductions appendix.

Every :func:`interpbook.records.record` call leaves a reproduction card in its cell
output, with a JSON copy of the record embedded in the card's HTML. This extension
collects those records from each page's doctree when the page is read (so records served
from the execution cache count too), keeps them in the build environment, and replaces
the ``{reproductions}`` directive with a table of all of them when pages are written:
grouped by chapter and page, each paper named by its title and a citation linked to the
references page, values at the precision of :func:`interpbook.records.format_value`.
The ``{reproductions-summary}`` directive is replaced, from the same records, by counts of
the verdicts (in all and per chapter) and a list of the findings that did not show at this
scale, so that no verdict is ever typed into prose about the reproductions.
"""

from __future__ import annotations

from collections import Counter

from docutils import nodes
from docutils.parsers.rst import Directive
from interpbook.records import HTML_CLASS, VERDICTS, Record, format_value, records_in_html
from interpbook_titles import bibliography
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import ExtensionError

COLUMNS = ("Finding", "Paper", "Paper's value", "Ours", "Units", "Verdict", "Note")
"""The table's columns; rows are grouped under a row per chapter, then per page."""

class reproductions_table(nodes.General, nodes.Element):
    """Placeholder replaced by the table at ``doctree-resolved``."""


class reproductions_summary(nodes.General, nodes.Element):
    """Placeholder replaced by the verdict counts at ``doctree-resolved``."""


class ReproductionsDirective(Directive):
    """``{reproductions}``: where the table of every recorded reproduction goes."""

    placeholder = reproductions_table

    def run(self) -> list[nodes.Node]:
        env = self.state.document.settings.env
        env.interpbook_table_pages = getattr(env, "interpbook_table_pages", set()) | {env.docname}
        return [self.placeholder()]


class ReproductionsSummaryDirective(ReproductionsDirective):
    """``{reproductions-summary}``: where the counts of the verdicts go."""

    placeholder = reproductions_summary


def chapter_of(docname: str) -> str:
    """The chapter folder of a page (``"02-probing"`` for ``"02-probing/structural-probe"``)."""
    return docname.split("/")[0]


def verdict_counts(records: dict[str, list[dict]]) -> dict[str, Counter]:
    """Per chapter folder, how many cards have each verdict (chapters in order)."""
    counts: dict[str, Counter] = {}
    for docname in sorted(records):
        counts.setdefault(chapter_of(docname), Counter()).update(r["verdict"] for r in records[docname])
    return counts


def not_at_this_scale(records: dict[str, list[dict]]) -> list[tuple[str, Record]]:
    """``(page, record)`` for every card whose verdict is "not at this scale", in book order."""
    return [(docname, Record.from_dict(r)) for docname in sorted(records) for r in records[docname]
            if r["verdict"] == VERDICTS[-1]]


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


def _row(cells: list, classes: tuple[str, ...] = ()) -> nodes.row:
    """A table row; a cell is a node, or ``(node, class)`` for a styled cell."""
    row = nodes.row(classes=list(classes))
    for cell in cells:
        cell, cls = cell if isinstance(cell, tuple) else (cell, None)
        entry = nodes.entry(classes=[cls] if cls else [])
        entry += cell if isinstance(cell, nodes.paragraph) else nodes.paragraph("", "", cell)
        row += entry
    return row


def _value(value: float | int | str) -> tuple[nodes.Node, str]:
    """A paper's or the book's value: a number is right-aligned on one line (the column
    reads like figures), a sentence wraps like text."""
    kind = "interpbook-number" if isinstance(value, (int, float)) else "interpbook-text"
    return nodes.Text(format_value(value)), kind


def _group_row(content: nodes.Node, level: str) -> nodes.row:
    """A row spanning the table that names a chapter or a page."""
    entry = nodes.entry(morecols=len(COLUMNS) - 1)
    entry += nodes.paragraph("", "", content)
    row = nodes.row(classes=[f"interpbook-group-{level}"])
    row += entry
    return row


def _citation_target(app: Sphinx, fromdocname: str, key: str) -> str:
    """The URI of ``key``'s entry on the references page (the page itself if not listed)."""
    domain = app.env.get_domain("cite")
    for citation in domain.citations:
        if citation.key == key:
            uri = app.builder.get_relative_uri(fromdocname, citation.bibliography_key.docname)
            return f"{uri}#{citation.citation_id}"
    return app.builder.get_relative_uri(fromdocname, "references")


def _paper_cell(app: Sphinx, fromdocname: str, key: str) -> nodes.paragraph:
    """The paper's title and its "Author et al. (year)" linked to the references page."""
    para = nodes.paragraph()
    if not key:
        para += nodes.Text("\u2014")
        return para
    ref = bibliography(app).get(key)
    if ref is None:
        raise ExtensionError(f"a reproduction card names paper_ref={key!r}, which is not in the bibliography")
    para += nodes.emphasis("", ref.title)
    para += nodes.Text(" ")
    para += nodes.reference("", ref.textual(), internal=True, refuri=_citation_target(app, fromdocname, key))
    return para


def _title(app: Sphinx, docname: str) -> str:
    return app.env.titles[docname].astext() if docname in app.env.titles else docname


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
    chapter = None
    for docname in sorted(records):
        folder = docname.split("/")[0]
        if folder != chapter:
            chapter = folder
            index = f"{folder}/index"
            body += _group_row(nodes.strong("", _title(app, index) if index in app.env.titles else folder), "chapter")
        link = nodes.reference("", _title(app, docname), internal=True,
                               refuri=app.builder.get_relative_uri(fromdocname, docname))
        body += _group_row(link, "page")
        for data in records[docname]:
            rec = Record.from_dict(data)
            body += _row([
                nodes.Text(rec.name),
                _paper_cell(app, fromdocname, rec.paper_ref),
                _value(rec.paper),
                _value(rec.ours),
                nodes.Text(rec.units),
                nodes.strong("", rec.verdict),
                nodes.Text(rec.note),
            ], classes=("interpbook-record-row", f"verdict-{rec.verdict.replace(' ', '-')}"))
    group += head
    group += body
    return table


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _count_text(counter: Counter) -> str:
    """``"3 reproduce, 1 partially, 0 not at this scale"``."""
    words = {"reproduces": "reproduce", "partially": "partially", "not at this scale": "not at this scale"}
    return ", ".join(f"{counter[v]} {words[v]}" for v in VERDICTS)


def _summary(app: Sphinx, fromdocname: str) -> list[nodes.Node]:
    records = _records(app.env)
    if not records:
        return [nodes.paragraph("", "No reproductions are recorded in this build yet.")]
    counts = verdict_counts(records)
    total = sum(counts.values(), Counter())
    papers = {r["paper_ref"] for cards in records.values() for r in cards if r["paper_ref"]}
    intro = nodes.paragraph(classes=["interpbook-summary-total"])
    n_cards = sum(total.values())
    intro += nodes.Text(f"This build records {_plural(n_cards, 'reproduction card')} about "
                        f"{_plural(len(papers), 'paper')}: {_count_text(total)}. By chapter:")
    table = nodes.table(classes=["interpbook-reproductions-summary"])
    group = nodes.tgroup(cols=1 + len(VERDICTS))
    table += group
    group.extend(nodes.colspec(colwidth=1) for _ in range(1 + len(VERDICTS)))
    head = nodes.thead()
    head += _row([nodes.Text("Chapter"), *(nodes.Text(v) for v in VERDICTS)])
    body = nodes.tbody()
    for folder, counter in counts.items():
        index = f"{folder}/index"
        title = nodes.reference("", _title(app, index), internal=True,
                                refuri=app.builder.get_relative_uri(fromdocname, index)) \
            if index in app.env.titles else nodes.Text(folder)
        body += _row([title, *((nodes.Text(str(counter[v])), "interpbook-number") for v in VERDICTS)])
    group += head
    group += body
    missing = not_at_this_scale(records)
    if not missing:
        return [intro, table, nodes.paragraph("", "Every recorded finding shows at least partially on this model.")]
    lead = nodes.paragraph("", "The findings that did not show at this scale, with the reason each card gives:")
    items = nodes.bullet_list(classes=["interpbook-not-at-this-scale"])
    for docname, rec in missing:
        para = nodes.paragraph()
        para += nodes.strong("", rec.name)
        para += nodes.Text(" (")
        para += nodes.reference("", _title(app, docname), internal=True,
                                refuri=app.builder.get_relative_uri(fromdocname, docname))
        para += nodes.Text(")" + (f": {rec.note}" if rec.note else ""))
        items += nodes.list_item("", para)
    return [intro, table, lead, items]


def fill_tables(app: Sphinx, doctree: nodes.document, fromdocname: str) -> None:
    for node in list(doctree.findall(reproductions_table)):
        node.replace_self(_table(app, fromdocname))
    for node in list(doctree.findall(reproductions_summary)):
        node.replace_self(_summary(app, fromdocname))


def setup(app: Sphinx) -> dict:
    app.add_node(reproductions_table)
    app.add_node(reproductions_summary)
    app.add_directive("reproductions", ReproductionsDirective)
    app.add_directive("reproductions-summary", ReproductionsSummaryDirective)
    app.connect("doctree-read", collect_records)
    app.connect("env-purge-doc", purge_records)
    app.connect("env-merge-info", merge_records)
    app.connect("env-get-outdated", table_pages_outdated)
    app.connect("doctree-resolved", fill_tables)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
