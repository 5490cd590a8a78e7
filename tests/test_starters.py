"""The exercise convention: tag mapping for the book, and starter notebooks."""

from __future__ import annotations

import nbformat
import pytest
from conftest import FIXTURES
from interpbook import starters

PAGE = FIXTURES / "exercise_page.md"


def tags_of(nb, cell_type="code"):
    return [c.metadata.get("tags", []) for c in nb.cells if c.cell_type == cell_type]


def test_book_tags_adds_display_tags_once():
    assert starters.book_tags(["starter"]) == ["starter", "remove-cell", "skip-execution"]
    assert starters.book_tags(["solution", "hide-input"]) == ["solution", "hide-input"]
    assert starters.book_tags(["raises-exception"]) == ["raises-exception"]


def test_a_cell_cannot_be_both():
    with pytest.raises(ValueError, match="exactly one"):
        starters.book_tags(["starter", "solution"])


def test_book_source_rewrites_both_option_styles_and_markdown_cells():
    text = PAGE.read_text()
    out = starters.book_source(text)
    assert ":tags: [starter, remove-cell, skip-execution]" in out
    assert ":tags: [solution, hide-input]" in out
    assert "tags: [starter, remove-cell, skip-execution]" in out.split(":tags:")[-1]  # YAML block
    assert '+++ {"tags": ["solution", "hide-input"]}' in out
    # the ":tags:" style keeps every line where it was (warnings point at the right line)
    before, after = text.splitlines(), out.splitlines()
    first_yaml = next(i for i, line in enumerate(before) if line == "---" and i > 10)
    assert len(before[:first_yaml]) == len(after[:first_yaml])


def test_book_source_matches_book_notebook():
    """The text rewrite (Sphinx) and the notebook mapping (`interpbook run`) agree."""
    import jupytext

    via_text = jupytext.reads(starters.book_source(PAGE.read_text()), fmt="md:myst")
    assert tags_of(via_text) == tags_of(starters.book_notebook(PAGE))
    assert [c.source for c in via_text.cells] == [c.source for c in starters.book_notebook(PAGE).cells]


def test_book_source_leaves_plain_markdown_alone():
    text = "# Title\n\n```{code-cell} ipython3\n:tags: [starter]\nx = 1\n```\n"
    assert starters.book_source(text) == text


def test_starter_notebook_drops_solutions_and_outputs():
    nb = starters.starter_notebook(PAGE)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    text = "\n".join(c.source for c in nb.cells)
    assert "squares = ...  # your code here" in text and "total = ..." in text
    assert "[n * n for n in numbers]" not in text and "sum(squares)" not in text
    assert "Why this works" not in text, "markdown solution cells are dropped too"
    assert "Some prose that stays" in text
    for cell in nb.cells:
        assert not {"starter", "solution", "remove-cell", "skip-execution"} & set(cell.metadata.get("tags", []))
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    assert "jupytext" not in nb.metadata and nb.metadata["kernelspec"]["name"] == "python3"


def test_starter_notebook_says_where_it_came_from_and_is_stable():
    nb = starters.starter_notebook(PAGE, book_dir=FIXTURES)
    assert nb.cells[0].cell_type == "markdown"
    assert "Squares" in nb.cells[0].source and "fixtures/exercise_page.md" in nb.cells[0].source
    assert nbformat.writes(nb) == nbformat.writes(starters.starter_notebook(PAGE, book_dir=FIXTURES))


def test_read_page_refuses_plain_markdown(tmp_path):
    plain = tmp_path / "plain.md"
    plain.write_text("# Just prose\n")
    with pytest.raises(ValueError, match="format_name: myst"):
        starters.read_page(plain)


def make_book(tmp_path):
    book = tmp_path / "book"
    (book / "01-demo").mkdir(parents=True)
    (book / "conf.py").write_text("")
    (book / "01-demo" / "index.md").write_text("# Demo chapter\n")
    (book / "01-demo" / "squares.md").write_text(PAGE.read_text())
    (book / "appendix").mkdir()
    return book


def test_chapters_and_pages(tmp_path):
    book = make_book(tmp_path)
    assert starters.chapters(book) == ["01-demo"]
    assert starters.chapter_pages("01-demo", book) == [book / "01-demo" / "squares.md"]
    with pytest.raises(LookupError, match="01-demo"):
        starters.chapter_pages("02-missing", book)


def test_export_starter_writes_each_notebook_page(tmp_path):
    book = make_book(tmp_path)
    written = starters.export_starter("01-demo", tmp_path / "out", book_dir=book)
    assert written == [tmp_path / "out" / "squares.ipynb"]
    nb = nbformat.read(written[0], as_version=4)
    assert "book/01-demo/squares.md" in nb.cells[0].source


def test_find_book_dir_walks_up(tmp_path):
    book = make_book(tmp_path)
    assert starters.find_book_dir(book / "01-demo") == book
