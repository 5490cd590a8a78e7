"""The Reproductions appendix's generated summary, and a card for every main paper.

The summary (``{reproductions-summary}``) counts verdicts from the records a build
collected; it is checked on hand-made records and on the pipeline fixture chapter's build.
The card check is static: every main paper of the schedule must be named by the
``paper_ref=`` of some ``record(`` call in a chapter page.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
from conftest import BOOK, PIPELINE_CHAPTER
from test_book import soup

sys.path.insert(0, str(BOOK / "_ext"))
import interpbook_reproductions as R  # noqa: E402


def card(name: str, verdict: str, paper_ref: str = "", note: str = "") -> dict:
    return {"name": name, "ours": 1.0, "paper": 2.0, "units": "", "verdict": verdict,
            "note": note, "paper_ref": paper_ref}


RECORDS = {
    "03-b/page": [card("x", "partially", "p3")],
    "02-a/one": [card("a", "reproduces", "p1"), card("b", "not at this scale", "p1", "too small")],
    "02-a/two": [card("c", "reproduces", "p2")],
}


def test_verdict_counts_by_chapter_in_book_order():
    counts = R.verdict_counts(RECORDS)
    assert list(counts) == ["02-a", "03-b"]
    assert counts["02-a"] == Counter({"reproduces": 2, "not at this scale": 1})
    assert counts["03-b"] == Counter({"partially": 1})
    assert sum(sum(c.values()) for c in counts.values()) == sum(len(v) for v in RECORDS.values())


def test_not_at_this_scale_lists_only_those_cards():
    found = R.not_at_this_scale(RECORDS)
    assert [(page, rec.name, rec.note) for page, rec in found] == [("02-a/one", "b", "too small")]
    assert R.not_at_this_scale({"02-a/two": RECORDS["02-a/two"]}) == []


@pytest.mark.book
def test_pipeline_reproductions_summary(pipeline_book):
    page = soup(pipeline_book, "appendix/reproductions")
    total = page.select_one("p.interpbook-summary-total").get_text(" ", strip=True)
    # the fixture chapter records two cards, one about a paper: one reproduces, one partially
    assert total == ("This build records 2 reproduction cards about 1 paper: "
                     "1 reproduce, 1 partially, 0 not at this scale. By chapter:")
    table = page.select_one("table.interpbook-reproductions-summary")
    assert [th.get_text(strip=True) for th in table.select("thead th")] == [
        "Chapter", "reproduces", "partially", "not at this scale"]
    rows = [[td.get_text(strip=True) for td in tr.select("td")] for tr in table.select("tbody tr")]
    assert rows == [["Pipeline fixture chapter", "1", "1", "0"]]
    assert table.select_one("tbody a")["href"] == f"../{PIPELINE_CHAPTER}/index.html"
    assert "Every recorded finding shows at least partially" in page.get_text()
    assert not page.select("ul.interpbook-not-at-this-scale")


def test_summary_lists_the_cards_not_at_this_scale(tmp_path):
    """A three-page Sphinx project (no notebooks, no model): records embedded as raw HTML."""
    from interpbook.records import Record
    from sphinx.cmd.build import build_main

    src = tmp_path / "src"
    (src / "02-a").mkdir(parents=True)
    (src / "conf.py").write_text(f"import sys\nsys.path.insert(0, {str(BOOK / '_ext')!r})\n"
                                 "extensions = ['interpbook_reproductions']\n")
    (src / "index.rst").write_text("Book\n====\n\n.. toctree::\n\n   02-a/index\n   02-a/one\n   summary\n")
    (src / "02-a" / "index.rst").write_text("Chapter A\n=========\n")
    cards = [Record("found", 1.0, 2.0, verdict="reproduces"),
             Record("missing", 0.1, 0.9, verdict="not at this scale", note="too few layers")]
    raw = "\n".join("   " + c._repr_html_() for c in cards)
    (src / "02-a" / "one.rst").write_text(f"Page one\n========\n\n.. raw:: html\n\n{raw}\n")
    (src / "summary.rst").write_text("Summary\n=======\n\n.. reproductions-summary::\n")
    assert build_main(["-q", "-W", "-b", "html", str(src), str(tmp_path / "html")]) == 0
    page = soup(SimpleNamespace(html=lambda d: (tmp_path / "html" / f"{d}.html").read_text()), "summary")
    assert page.select_one("p.interpbook-summary-total").get_text(" ", strip=True) == (
        "This build records 2 reproduction cards about 0 papers: "
        "1 reproduce, 0 partially, 1 not at this scale. By chapter:")
    rows = [[td.get_text(strip=True) for td in tr.select("td")]
            for tr in page.select("table.interpbook-reproductions-summary tbody tr")]
    assert rows == [["Chapter A", "1", "0", "1"]]
    [item] = page.select("ul.interpbook-not-at-this-scale li")
    assert item.get_text(" ", strip=True) == "missing ( Page one ): too few layers"
    assert item.select_one("a")["href"] == "02-a/one.html"


# -- a card for every main paper ------------------------------------------------------------

MAIN_RE = re.compile(r"^- Main: .*\{cite:p\}`([^`]+)`", re.MULTILINE)
WEEK_RE = re.compile(r"^## Week (\d+) ", re.MULTILINE)
PAPER_REF_RE = re.compile(r"""paper_ref\s*=\s*(['"])([^'"]+)\1""")


def main_papers() -> dict[str, int]:
    """Cite key -> week, from the schedule's "Main:" lines."""
    text = (BOOK / "schedule.md").read_text(encoding="utf-8")
    weeks = [(m.start(), int(m.group(1))) for m in WEEK_RE.finditer(text)]
    week_at = lambda pos: max(w for start, w in weeks if start <= pos)
    return {m.group(1): week_at(m.start()) for m in MAIN_RE.finditer(text)}


def record_calls(text: str) -> list[str]:
    """The argument text of every ``record(...)`` call in ``text`` (up to its closing parenthesis)."""
    calls = []
    for start in re.finditer(r"\brecord\(", text):
        depth = 1
        for end in range(start.end(), len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                calls.append(text[start.end():end])
                break
    return calls


def carded_papers() -> set[str]:
    """Every literal ``paper_ref=`` of a ``record(`` call in a chapter page."""
    return {m.group(2) for page in BOOK.glob("[0-9][0-9]-*/*.md")
            for call in record_calls(page.read_text(encoding="utf-8")) for m in PAPER_REF_RE.finditer(call)}


def test_record_calls_are_read_to_their_closing_parenthesis():
    text = 'record("a", ours=f(x), paper=1, verdict="partially",\n       paper_ref="k1")\nrecord("b", paper_ref=\'k2\')'
    assert [m.group(2) for c in record_calls(text) for m in PAPER_REF_RE.finditer(c)] == ["k1", "k2"]


def test_schedule_lists_two_main_papers_for_weeks_2_to_12():
    per_week = Counter(main_papers().values())
    assert per_week == Counter({w: 2 for w in range(2, 13)}), per_week


def test_every_main_paper_has_a_reproduction_card():
    missing = {key: week for key, week in main_papers().items() if key not in carded_papers()}
    assert not missing, (
        f"main papers of the course without a reproduction card (cite key: week): {missing}; "
        "end the paper's page with record(..., paper_ref=KEY)")
