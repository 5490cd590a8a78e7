"""Book builds: the real book built cold and offline, and the pipeline fixture chapter.

The real book (``built_book``) is checked page by page: every source page is built, every
chapter notebook page has outputs and every chapter figures, no traceback appears
outside a ``raises-exception`` cell, no warning or progress bar leaks into an output,
every chapter page offers a valid starter notebook, and the Reproductions table lists
every card. The fixture chapter (``pipeline_book``) pins down each pipeline feature on
known content, and is rebuilt to check the execution cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from bs4 import BeautifulSoup
from conftest import BOOK, OFFLINE, PIPELINE_CHAPTER, book_env, sphinx_build
from interpbook import starters
from interpbook.records import HTML_CLASS

pytestmark = pytest.mark.book

NOISE = ("Warning", "IProgress", "tqdm", "it/s]")


def soup(build, docname: str) -> BeautifulSoup:
    return BeautifulSoup(build.html(docname), "html.parser")


def source_pages() -> list[str]:
    """Docnames of every page of the book source."""
    skip = {"_build", "_ext", "_static", ".ipynb_checkpoints"}
    return sorted(
        p.relative_to(BOOK).with_suffix("").as_posix()
        for p in BOOK.rglob("*.md")
        if not skip & set(p.relative_to(BOOK).parts)
    )


def chapter_notebook_pages() -> list[str]:
    return [
        p.relative_to(BOOK).with_suffix("").as_posix()
        for ch in starters.chapters(BOOK)
        for p in starters.chapter_pages(ch, BOOK)
    ]


def html_pages(build) -> list[str]:
    return sorted(
        p.relative_to(build.out).with_suffix("").as_posix()
        for p in build.out.rglob("*.html")
        if not {"_static", "_sources", "_modules"} & set(p.relative_to(build.out).parts)
    )


def check_starter(build, docname: str, page_path) -> nbformat.NotebookNode:
    """The page links its starter, which is valid, output-free and solution-free."""
    href = f"_sources/{docname}.ipynb"
    assert href in build.html(docname), f"{docname}: no download link to {href}"
    nb = nbformat.read(build.out / href, as_version=4)
    nbformat.validate(nb)
    authored = starters.read_page(page_path)
    solutions = [c.source for c in authored.cells if "solution" in c.metadata.get("tags", [])]
    starter_cells = [c.source for c in authored.cells if "starter" in c.metadata.get("tags", [])]
    sources = [c.source for c in nb.cells]
    for cell in nb.cells:
        assert not cell.get("outputs"), f"{href}: a cell has outputs"
        tags = set(cell.metadata.get("tags", []))
        assert not {"solution", "starter"} & tags, f"{href}: exercise tags left in"
        if cell.source in starter_cells:
            assert not {"remove-cell", "skip-execution"} & tags, f"{href}: a starter cell is hidden"
    assert not set(solutions) & set(sources), f"{href}: contains a solution cell"
    assert set(starter_cells) <= set(sources), f"{href}: lost a starter cell"
    return nb


def screenshot(url: str, tmp_path, name: str):
    """Headless Chromium screenshot of ``url``; returns the PNG as an RGB array."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    png = tmp_path / f"{name}.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={png}",
         "--window-size=1280,2000", url],
        check=True, capture_output=True, timeout=120,
    )
    import matplotlib.image

    return matplotlib.image.imread(png)[..., :3]


# -- the real book ---------------------------------------------------------------------

def test_every_source_page_is_built(built_book):
    missing = [d for d in source_pages() if not (built_book.out / f"{d}.html").is_file()]
    assert not missing, f"pages not built: {missing}"


def test_every_chapter_has_notebook_pages_with_outputs_and_figures(built_book):
    assert starters.chapters(BOOK), "the book has no chapters"
    for chapter in starters.chapters(BOOK):
        pages = starters.chapter_pages(chapter, BOOK)
        assert pages, f"chapter {chapter} has no notebook pages"
        figures = 0
        for path in pages:
            docname = path.relative_to(BOOK).with_suffix("").as_posix()
            page = soup(built_book, docname)
            assert page.select("div.cell_output"), f"{docname}: no cell outputs"
            figures += len(page.select("div.cell_output img"))
        assert figures, f"chapter {chapter}: no figure in any cell output"


def test_no_untagged_traceback(built_book):
    for docname in html_pages(built_book):
        for cell in soup(built_book, docname).select("div.cell"):
            output = " ".join(o.get_text() for o in cell.select("div.cell_output"))
            failed = cell.select("div.output.traceback, div.output.error") or "Traceback (most recent" in output
            if failed:
                assert "tag_raises-exception" in cell["class"], (
                    f"{docname}: a cell shows an error but is not tagged raises-exception:\n{output[:500]}"
                )


def test_no_warnings_or_progress_bars_in_outputs(built_book):
    for docname in html_pages(built_book):
        page = soup(built_book, docname)
        assert not page.select("div.cell_output div.stderr"), f"{docname}: stderr output on the page"
        for output in page.select("div.cell_output"):
            text = output.get_text()
            leaked = [word for word in NOISE if word in text]
            assert not leaked, f"{docname}: {leaked} in a cell output:\n{text[:500]}"


def test_every_chapter_page_offers_its_starter(built_book):
    for docname in chapter_notebook_pages():
        check_starter(built_book, docname, BOOK / f"{docname}.md")


def test_reproductions_table_lists_every_card(built_book):
    cards = 0
    for docname in html_pages(built_book):
        if docname != "appendix/reproductions":
            cards += len(soup(built_book, docname).select(f"script.{HTML_CLASS}"))
    page = soup(built_book, "appendix/reproductions")
    rows = page.select("table.interpbook-reproductions tbody tr")
    assert len(rows) == cards, f"{cards} reproduction cards in the book, {len(rows)} table rows"
    if not cards:
        assert "No reproductions are recorded" in page.get_text()


def test_screenshots_show_rendered_pages(built_book, tmp_path):
    pages = ["index", *chapter_notebook_pages()[:1]]
    for docname in pages:
        pixels = screenshot((built_book.out / f"{docname}.html").as_uri(), tmp_path, docname.replace("/", "_"))
        assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000, f"{docname}: tiny screenshot"
        flat = pixels.reshape(-1, 3)
        distinct = len({tuple(p) for p in (flat[:: max(1, len(flat) // 20000)] * 255).astype(int)})
        assert pixels.std() > 0.05 and distinct > 20, f"{docname}: screenshot looks blank"
        dark = (pixels.mean(axis=2) < 0.5).mean()
        assert 0.005 < dark < 0.6, f"{docname}: {dark:.1%} dark pixels, not a rendered text page"


@pytest.mark.integration
def test_offline_model_load_and_build(built_book):
    """The book above was built with the network blocked; the block is real, and the
    default model loads through it."""
    assert str(OFFLINE) in built_book.env["PYTHONPATH"] and built_book.env["HF_HUB_OFFLINE"] == "1"
    code = (
        "import socket\n"
        "try:\n"
        "    socket.getaddrinfo('huggingface.co', 443)\n"
        "except OSError as exc:\n"
        "    assert type(exc).__name__ == 'NetworkBlocked', exc\n"
        "else:\n"
        "    raise SystemExit('network not blocked')\n"
        "import interpbook\n"
        "model = interpbook.load_model()\n"
        "print('loaded', type(model).__name__)\n"
    )
    env = book_env(built_book.cache, offline=True)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loaded" in proc.stdout


# -- the pipeline fixture chapter --------------------------------------------------------

DEMO = f"{PIPELINE_CHAPTER}/demo"


def test_pipeline_page_outputs(pipeline_book):
    page = soup(pipeline_book, DEMO)
    text = page.get_text()
    assert "The mean square below is 11.00" in text, "glued number missing from the prose"
    assert page.select("div.cell_output img"), "figure dropped (MPLBACKEND=Agg must be popped)"
    assert "ValueError: an intended error, shown in one line" in text
    assert "Traceback" not in text, "%xmode Minimal should keep the intended error to one line"
    for word in NOISE:
        assert word not in " ".join(o.get_text() for o in page.select("div.cell_output")), word
    assert not page.select("div.cell_output div.stderr")


def test_pipeline_exercise_cells(pipeline_book):
    page = soup(pipeline_book, DEMO)
    html = str(page)
    assert "STARTER-MARKER" not in html, "starter cells must be hidden in the book"
    [solution] = page.select("div.cell.tag_solution")
    details = solution.select_one("details.hide")
    assert details is not None and "SOLUTION-MARKER" in details.get_text(), "solution input not collapsed"
    assert "Show solution" in details.get_text()
    assert "matches the reference" in solution.get_text(), "solution cell not executed"
    assert "SOLUTION-PROSE-MARKER" in html


def test_pipeline_starter_download(pipeline_book):
    nb = check_starter(pipeline_book, DEMO, pipeline_book.src / f"{DEMO}.md")
    text = "\n".join(c.source for c in nb.cells)
    assert "STARTER-MARKER" in text and "SOLUTION" not in text
    assert "Starter notebook" in nb.cells[0].source


def test_pipeline_reproductions_table(pipeline_book):
    rows = soup(pipeline_book, "appendix/reproductions").select("table.interpbook-reproductions tbody tr")
    cells = [[td.get_text(strip=True) for td in row.select("td")] for row in rows]
    assert cells == [
        ["Pipeline demo page", "mean square of 1..5", "11 (hewitt2019structural)", "11", "units^2",
         "reproduces", "exact arithmetic"],
        ["Pipeline demo page", "a qualitative finding", "all", "3/3", "", "partially", ""],
    ]
    assert rows[0].select_one("a")["href"] == f"../{DEMO}.html"


def test_rebuild_reuses_the_execution_cache(pipeline_book, tmp_path):
    assert "Executing notebook" in pipeline_book.stdout
    again = sphinx_build(pipeline_book.src, tmp_path / "html", pipeline_book.env, timeout=600)
    assert "Using cached notebook" in again.stdout
    assert "Executing notebook" not in again.stdout
    assert "The mean square below is 11.00" in soup(again, DEMO).get_text()
    assert len(soup(again, "appendix/reproductions").select("table.interpbook-reproductions tbody tr")) == 2


def test_editing_the_package_reexecutes(pipeline_book, tmp_path):
    """Point the build (and so its kernels) at a copy of the package with one edited
    file: the execution cache must miss."""
    import interpbook

    edited = tmp_path / "src"
    shutil.copytree(Path(interpbook.__file__).parent, edited / "interpbook",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(edited / "interpbook" / "records.py", "a", encoding="utf-8") as f:
        f.write("\n# an edit\n")
    env = book_env(pipeline_book.cache, pythonpath=edited, INTERPBOOK_CHAPTERS=PIPELINE_CHAPTER)
    build = sphinx_build(pipeline_book.src, tmp_path / "html", env, timeout=600)
    assert "Executing notebook" in build.stdout
    assert "Using cached notebook" not in build.stdout
