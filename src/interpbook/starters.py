"""Exercises from one source: the same MyST page gives the book page and a starter notebook.

Chapter pages are MyST Markdown notebooks (jupytext ``format_name: myst``). Authors tag
exercise code cells with exactly one of two tags:

``starter``
    The reader's starting point (``...`` placeholders, a ``check_*`` call). Hidden in the
    book and not executed there; kept, visible, in the starter notebook.
``solution``
    The reference answer. Executed in the book and shown collapsed; dropped from the
    starter notebook.

The display tags myst-nb and nbclient understand are derived here (:data:`BOOK_TAGS`), so
authors never write ``remove-cell``/``skip-execution``/``hide-input`` for exercises. The
book applies the mapping to the page source when Sphinx reads it (:func:`book_source`),
``interpbook run`` applies it to the notebook (:func:`book_notebook`), and
:func:`starter_notebook` builds the download offered on every chapter page and written by
``interpbook export``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jupytext
import nbformat
import yaml

STARTER_TAG = "starter"
SOLUTION_TAG = "solution"
BOOK_TAGS: dict[str, tuple[str, ...]] = {
    STARTER_TAG: ("remove-cell", "skip-execution"),
    SOLUTION_TAG: ("hide-input",),
}
"""The tags each exercise tag implies in the book."""

_CODE_CELL_RE = re.compile(r"^(`{3,}|~{3,})\s*\{code-cell\}")
_CELL_BREAK_RE = re.compile(r"^\+\+\+[ \t]*(\{.*\})?[ \t]*$")
_TAGS_OPTION_RE = re.compile(r"^:tags:(.*)$")
_CHAPTER_RE = re.compile(r"^\d\d-[a-z0-9-]+$")


def book_tags(tags: list[str]) -> list[str]:
    """``tags`` plus the display tags that its exercise tags imply in the book (no duplicates)."""
    if STARTER_TAG in tags and SOLUTION_TAG in tags:
        raise ValueError(
            f"a cell is tagged both {STARTER_TAG!r} and {SOLUTION_TAG!r}; give it exactly one"
        )
    out = list(tags)
    for tag in tags:
        out.extend(t for t in BOOK_TAGS.get(tag, ()) if t not in out)
    return out


def _as_tag_list(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    raise ValueError(f"{where}: tags must be a list of strings, got {value!r}")


def is_notebook_source(text: str) -> bool:
    """Whether a Markdown text is a MyST notebook (a jupytext/mystnb top matter), as myst-nb decides."""
    if not text.startswith("---"):
        return False
    end = text.find("\n---", 3)
    if end < 0:
        return False
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return False
    if not isinstance(meta, dict):
        return False
    fmt = (meta.get("jupytext") or {}).get("text_representation", {}).get("format_name")
    return meta.get("file_format") == "mystnb" or fmt == "myst"


def book_source(text: str) -> str:
    """Rewrite a MyST notebook's cell tags for the book, keeping the line count where possible.

    Handles both option styles of a ``{code-cell}`` (``:tags: [...]`` lines and a ``---``
    YAML block) and markdown cell metadata (``+++ {"tags": [...]}``). Other text is
    returned unchanged; a text that is not a MyST notebook is returned as is.
    """
    if not is_notebook_source(text):
        return text
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        brk = _CELL_BREAK_RE.match(line.rstrip("\n"))
        if brk and brk.group(1):
            meta = json.loads(brk.group(1))
            if "tags" in meta:
                meta["tags"] = book_tags(_as_tag_list(meta["tags"], f"line {i + 1}"))
                line = "+++ " + json.dumps(meta) + "\n"
            out.append(line)
            i += 1
            continue
        out.append(line)
        i += 1
        if not _CODE_CELL_RE.match(line):
            continue
        if i < len(lines) and lines[i].strip() == "---":  # YAML option block
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "---"), None)
            if end is None:
                raise ValueError(f"line {i + 1}: the code cell's '---' option block is not closed")
            meta = yaml.safe_load("".join(lines[i + 1 : end])) or {}
            if "tags" in meta:
                meta["tags"] = book_tags(_as_tag_list(meta["tags"], f"line {i + 1}"))
                block = yaml.safe_dump(meta, default_flow_style=None, sort_keys=False)
                out += ["---\n", block, "---\n"]
            else:
                out += lines[i : end + 1]
            i = end + 1
            continue
        while i < len(lines) and lines[i].startswith(":"):  # ":key: value" options
            tags = _TAGS_OPTION_RE.match(lines[i].rstrip("\n"))
            if tags:
                value = yaml.safe_load(tags.group(1)) or []
                new = book_tags(_as_tag_list(value, f"line {i + 1}"))
                out.append(":tags: [" + ", ".join(new) + "]\n")
            else:
                out.append(lines[i])
            i += 1
    return "".join(out)


def read_page(path: str | Path) -> nbformat.NotebookNode:
    """Read a MyST notebook page as written by its author (no tag mapping)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not is_notebook_source(text):
        raise ValueError(
            f"{path} is not a MyST notebook: it needs a jupytext top matter with "
            "'format_name: myst' (run `jupytext --set-formats md:myst` on it)"
        )
    return jupytext.reads(text, fmt="md:myst")


def book_notebook(path: str | Path) -> nbformat.NotebookNode:
    """The page as the book executes it: exercise tags mapped to display tags."""
    nb = read_page(path)
    for cell in nb.cells:
        tags = cell.metadata.get("tags")
        if tags:
            cell.metadata["tags"] = book_tags(tags)
    return nb


def _title(nb: nbformat.NotebookNode, fallback: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return fallback


def starter_notebook(path: str | Path, *, book_dir: str | Path | None = None) -> nbformat.NotebookNode:
    """The starter notebook of a page: prose and code kept, solutions dropped, no outputs.

    Cells tagged ``solution`` are removed; cells tagged ``starter`` lose that tag and the
    book-only tags it implies, so they are plain visible cells. A first markdown cell says
    which page the notebook comes from. The result is a valid nbformat v4 notebook.
    """
    path = Path(path).resolve()
    nb = read_page(path)
    hidden = set(BOOK_TAGS[STARTER_TAG])
    cells = []
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if SOLUTION_TAG in tags:
            continue
        if STARTER_TAG in tags:
            book_tags(tags)  # refuses a cell tagged both ways
            kept = [t for t in tags if t != STARTER_TAG and t not in hidden]
            if kept:
                cell.metadata["tags"] = kept
            else:
                cell.metadata.pop("tags")
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cells.append(cell)
    try:
        source = path.relative_to(Path(book_dir).resolve().parent) if book_dir else path.name
    except ValueError:
        source = path.name
    header = nbformat.v4.new_markdown_cell(
        f"*Starter notebook for \u201c{_title(nb, path.stem)}\u201d, generated from "
        f"`{source}` of the interpbook textbook. Solutions are removed: fill in the cells "
        "marked `...` and run the `check_*` calls to grade your answers. Needs the "
        "`interpbook` package (`pip install -e .` in the book's repository).*"
    )
    out = nbformat.v4.new_notebook(cells=[header, *cells])
    for i, cell in enumerate(out.cells):  # stable ids: the same page gives the same file
        cell.id = f"cell-{i}"
    out.metadata = {k: v for k, v in nb.metadata.items() if k != "jupytext"}
    nbformat.validate(out)
    return out


def find_book_dir(start: str | Path | None = None) -> Path:
    """The book's source folder: ``book/`` above ``start`` (default: the working directory),
    else the one next to this package in a source checkout."""
    here = Path(start or Path.cwd()).resolve()
    candidates = [p / "book" for p in (here, *here.parents)]
    candidates.append(Path(__file__).resolve().parents[2] / "book")
    for candidate in candidates:
        if (candidate / "conf.py").is_file():
            return candidate
    raise FileNotFoundError(
        f"no book/conf.py found above {here} or next to the interpbook package; "
        "run this from a checkout of the interpbook repository"
    )


def chapters(book_dir: str | Path) -> list[str]:
    """Names of the chapter folders (``NN-topic`` with an ``index.md``), in order."""
    book_dir = Path(book_dir)
    return sorted(
        p.name for p in book_dir.iterdir() if _CHAPTER_RE.match(p.name) and (p / "index.md").is_file()
    )


def chapter_pages(chapter: str, book_dir: str | Path) -> list[Path]:
    """The notebook pages of one chapter, sorted by file name.

    Raises ``LookupError`` naming the known chapters when ``chapter`` is not one of them.
    """
    book_dir = Path(book_dir)
    known = chapters(book_dir)
    if chapter.rstrip("/") not in known:
        raise LookupError(
            f"unknown chapter {chapter!r}; the chapters in {book_dir} are: "
            + (", ".join(known) or "(none)")
        )
    folder = book_dir / chapter.rstrip("/")
    return sorted(
        p for p in folder.rglob("*.md")
        if ".ipynb_checkpoints" not in p.parts and is_notebook_source(p.read_text(encoding="utf-8"))
    )


def export_starter(
    chapter_or_page: str | Path, out_dir: str | Path, *, book_dir: str | Path | None = None
) -> list[Path]:
    """Write the starter notebook(s) of a chapter (``"01-introduction"``) or of one page
    (a path to its ``.md``) into ``out_dir``; return the written paths."""
    book_dir = Path(book_dir) if book_dir else find_book_dir()
    target = Path(chapter_or_page)
    if target.suffix == ".md":
        if not target.is_file():
            raise FileNotFoundError(f"page {target} does not exist")
        pages, base = [target], target.parent
    else:
        pages, base = chapter_pages(str(chapter_or_page), book_dir), book_dir / target
    out_dir = Path(out_dir)
    written = []
    for page in pages:
        dest = out_dir / page.relative_to(base).with_suffix(".ipynb")
        dest.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(starter_notebook(page, book_dir=book_dir), dest)
        written.append(dest)
    return written
