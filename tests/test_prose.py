"""Prose that compares computed numbers is backed by a check on the same page.

A sentence that quotes two or more glued numbers and compares them ("beats", "higher
than", "peaks", "vs" ...) must have a ``claim(...)`` (:mod:`interpbook.claims`) in a
hidden cell of the page that names at least two of that sentence's keys. A rebuild on
another model then fails at the claim instead of printing a false sentence.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import BOOK
from interpbook import starters

GLUE_RE = re.compile(r"\{glue(?::\w+)?\}`([^`]+)`")
COMPARISON_RE = re.compile(
    r"\b(than|beats?|beat|exceeds?|outperforms?|above|below|higher|lower|larger|smaller|"
    r"greater|fewer|more|less|better|worse|best|worst|peaks?|vs\.?|versus|twice|"
    r"drops?|rises?|falls?|max(imum)?|min(imum)?|ahead|behind|closer?|far)\b",
    re.IGNORECASE,
)
HIDDEN_TAGS = {"remove-cell", "remove-input"}
CLAIM_RE = re.compile(r"\bclaim\((.*?)\)", re.DOTALL)
STRING_RE = re.compile(r"""(['"])([^'"]+)\1""")


def glue_key(ref: str) -> str | None:
    """The key of a glue reference, or None for a reference into another page."""
    if "::" in ref:
        return None
    return ref.split(":", 1)[0].strip()


def sentences(markdown: str) -> list[str]:
    """Sentences of the prose, paragraph by paragraph (headings and list items end one)."""
    out = []
    for block in re.split(r"\n\s*\n|\n(?=#|\s*[-*] |\s*\d+\. )", markdown):
        text = re.sub(r"\s+", " ", block).strip()
        out += [s for s in re.split(r"(?<=[.!?;])\s+(?=[A-Z({*])", text) if s]
    return out


def comparative_sentences(nb) -> list[tuple[str, set[str]]]:
    """(sentence, its glue keys) for every sentence that compares two or more glued numbers."""
    found = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for sentence in sentences(cell.source):
            keys = {k for k in (glue_key(r) for r in GLUE_RE.findall(sentence)) if k}
            if len(keys) >= 2 and COMPARISON_RE.search(GLUE_RE.sub("", sentence)):
                found.append((sentence, keys))
    return found


def claimed_pairs(nb) -> list[set[str]]:
    """The set of string arguments of every claim(...) call in a hidden cell."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code" or not HIDDEN_TAGS & set(cell.metadata.get("tags", [])):
            continue
        for args in CLAIM_RE.findall(cell.source):
            out.append({m.group(2) for m in STRING_RE.finditer(args)})
    return out


def notebook_pages() -> list[Path]:
    return [p for ch in starters.chapters(BOOK) for p in starters.chapter_pages(ch, BOOK)]


@pytest.mark.parametrize("page", notebook_pages(), ids=lambda p: p.relative_to(BOOK).as_posix())
def test_comparisons_in_prose_are_claimed(page):
    nb = starters.read_page(page)
    claims = claimed_pairs(nb)
    unbacked = [
        sentence for sentence, keys in comparative_sentences(nb)
        if not any(len(keys & c) >= 2 for c in claims)
    ]
    assert not unbacked, (
        f"{page.relative_to(BOOK)}: these sentences compare glued numbers without a "
        "claim(...) naming two of their keys in a hidden (remove-cell) cell:\n- "
        + "\n- ".join(unbacked)
    )


def test_detector_finds_a_comparison_and_its_claim():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("The probe scores {glue:text}`a:.2f`, higher than {glue:text}`b:.2f`. Fine."),
        nbformat.v4.new_markdown_cell("Layer {glue:text}`l` of {glue:text}`n` layers."),
    ]
    found = comparative_sentences(nb)
    assert [keys for _, keys in found] == [{"a", "b"}]
    assert claimed_pairs(nb) == []
    hidden = nbformat.v4.new_code_cell('claim("a", ">", "b")', metadata={"tags": ["remove-cell"]})
    visible = nbformat.v4.new_code_cell('claim("a", ">", "b")')
    nb.cells.append(visible)
    assert claimed_pairs(nb) == []
    nb.cells.append(hidden)
    assert claimed_pairs(nb) == [{"a", ">", "b"}]


@pytest.mark.parametrize("page", notebook_pages(), ids=lambda p: p.relative_to(BOOK).as_posix())
def test_reproduction_cards_are_in_cells_whose_output_is_shown(page):
    """A card is the cell's output, and the Reproductions appendix collects it from there:
    in a cell whose output is removed it would silently be left out of both."""
    hidden = [cell.source.split("\n")[0] for cell in starters.read_page(page).cells
              if cell.cell_type == "code" and re.search(r"\b(ib\.)?record\(", cell.source)
              and {"remove-cell", "remove-output"} & set(cell.metadata.get("tags", []))]
    assert not hidden, f"{page.relative_to(BOOK)}: record(...) in a cell whose output is removed: {hidden}"
