"""The ``interpbook`` command: build the book, run or export a chapter, list the models.

::

    interpbook build                    # the whole book into _build/html
    interpbook build --chapter 01-introduction   # front matter + one chapter
    interpbook run 01-introduction      # execute a chapter's pages into .ipynb with outputs
    interpbook export 01-introduction   # starter notebooks (no solutions, no outputs)
    interpbook models                   # the model registry: installed, cached, how to install
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from . import starters

CHAPTERS_ENV = "INTERPBOOK_CHAPTERS"
"""Comma-separated chapter folders to build; unset builds every chapter (read by book/conf.py)."""

QUIET_WARNINGS = (
    "ignore:IProgress not found:Warning",  # transformers imports tqdm.auto
    "ignore:Glyph:UserWarning",  # matplotlib: "Glyph 12354 (...) missing from font(s) DejaVu Sans."
)
"""``PYTHONWARNINGS`` filters every book kernel starts with (stderr fails the build)."""


def kernel_environment() -> None:
    """Prepare ``os.environ`` for executing book pages (the kernels inherit it).

    * ``MPLBACKEND`` (e.g. ``Agg`` set by CI) makes the inline backend silently drop
      every figure, so it is removed.
    * tqdm's "IProgress not found" warning (transformers imports ``tqdm.auto``),
      progress bars, and matplotlib's missing-glyph warnings (a token in a CJK or Thai
      script drawn with DejaVu Sans shows as a box) would otherwise print onto the pages
      as stderr output: :data:`QUIET_WARNINGS` silences the warnings in every kernel.
    * ``PYTHONSTARTUP`` (unless set) runs :mod:`interpbook.kernel_startup`, which returns the
      memory a cell freed to the system after each cell, so two kernels side by side do not
      each keep their largest cell's memory.
    """
    os.environ.pop("MPLBACKEND", None)
    filters = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    filters += [f for f in QUIET_WARNINGS if f not in filters]
    os.environ["PYTHONWARNINGS"] = ",".join(filters)
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("PYTHONSTARTUP", str(Path(__file__).with_name("kernel_startup.py")))


BUILD_JOBS = 2
"""Pages a build executes at once (``sphinx -j``): two, not one per core, since every kernel
holds its own copy of the model."""


def strict_build(book_dir: Path, out: Path, jobs: int = BUILD_JOBS) -> list[str]:
    """The book's sphinx-build command: warnings are errors, every reference must resolve."""
    return [sys.executable, "-m", "sphinx", "-j", str(jobs), "-W", "--keep-going", "-n", "-b", "html",
            str(book_dir), str(out)]


def kernel_threads(jobs: int) -> None:
    """Give each of ``jobs`` concurrently executing book kernels its share of the cores.

    ``sphinx -j N`` executes N pages at once; torch in each would start one thread per
    core, and oversubscribed OpenMP threads wait on each other (measured under load 5 on
    2 cores: a 48-prompt forward pass 2.4x slower with 2 threads than with 1). Sets
    ``OMP_NUM_THREADS`` to ``cores // jobs`` unless the user has set it.
    """
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))


def _pages(target: str, book_dir: Path) -> list[Path]:
    """Pages named by a chapter folder name or a path to one ``.md`` page."""
    if target.endswith(".md"):
        page = Path(target)
        if not page.is_file():
            raise FileNotFoundError(f"page {target} does not exist")
        return [page]
    pages = starters.chapter_pages(target, book_dir)
    if not pages:
        raise LookupError(f"chapter {target!r} has no notebook pages yet")
    return pages


def cmd_build(args: argparse.Namespace) -> int:
    """Run sphinx-build with the book's strict settings; a chapter build goes to its own folder."""
    book_dir = starters.find_book_dir()
    env = dict(os.environ)
    out = Path(args.out) if args.out else book_dir.parent / "_build" / "html"
    if args.chapter:
        starters.chapter_pages(args.chapter, book_dir)  # unknown chapter: clear error
        env[CHAPTERS_ENV] = args.chapter
        out = Path(args.out) if args.out else book_dir.parent / "_build" / "chapters" / args.chapter
    cmd = strict_build(book_dir, out)
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc == 0:
        print(f"open {out / 'index.html'}")
    return rc


def cmd_run(args: argparse.Namespace) -> int:
    """Execute pages the way the book does (starter cells skipped) and save them with outputs."""
    import nbclient
    import nbformat

    book_dir = starters.find_book_dir()
    pages = _pages(args.chapter, book_dir)
    out = Path(args.output) if args.output else book_dir.parent / "_build" / "run" / Path(args.chapter).stem
    if out.suffix == ".ipynb" and len(pages) > 1:
        raise ValueError(
            f"{args.chapter} has {len(pages)} notebook pages; give -o a folder, not {out.name}"
        )
    kernel_environment()
    for page in pages:
        dest = out if out.suffix == ".ipynb" else out / page.with_suffix(".ipynb").name
        nb = starters.book_notebook(page)
        print(f"executing {page} ...", flush=True)
        client = nbclient.NotebookClient(
            nb, timeout=args.timeout, kernel_name="python3",
            resources={"metadata": {"path": str(page.parent)}},
        )
        client.execute()
        dest.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, dest)
        print(f"wrote {dest}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write starter notebooks of a chapter or page."""
    book_dir = starters.find_book_dir()
    _pages(args.chapter, book_dir)
    out = Path(args.output) if args.output else Path("starters") / Path(args.chapter).stem
    # A starter installs interpbook from the published book's wheel when the book's
    # address is known, else from this checkout.
    base = os.environ.get("INTERPBOOK_BASEURL", "").rstrip("/")
    install = args.install or (f"{base}/_static/{starters.wheel_name()}" if base else str(book_dir.parent))
    try:
        written = starters.export_starter(args.chapter, out, book_dir=book_dir, install=install)
    except OSError as exc:  # not a folder, read-only, disk full: say where, not a traceback
        print(f"interpbook export: error: cannot write the starters into {out} ({exc}); "
              "give -o a writable folder", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Print the model registry, then check the model ``INTERPBOOK_MODEL`` selects.

    Exits 2 when that model cannot be loaded here (an unknown name, a missing folder,
    a Hugging Face id that is not cached while offline), with the loader's message.
    The registry is imported lazily: it loads torch and transformers.
    """
    from . import models

    selected = os.environ.get("INTERPBOOK_MODEL")
    try:
        print(models.describe_models())
        if selected and selected not in models.REGISTRY:
            models._hf_source(selected)
    except (models.ModelNotInstalled, ValueError) as exc:  # ValueError: not a valid HF id
        print(f"interpbook models: error: INTERPBOOK_MODEL={selected!r} cannot be loaded: {exc}",
              file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``interpbook`` command."""
    parser = argparse.ArgumentParser(prog="interpbook", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="build the book (HTML) with the strict settings")
    p.add_argument("--chapter", help="build the front matter and this chapter only, e.g. 01-introduction")
    p.add_argument("--out", help="output folder (default _build/html, or _build/chapters/CHAPTER)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", help="execute a chapter's pages into .ipynb files with outputs")
    p.add_argument("chapter", help="chapter folder (e.g. 01-introduction) or path to one page .md")
    p.add_argument("-o", "--output", help="output folder, or an .ipynb file for a single page "
                   "(default _build/run/CHAPTER)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="write a chapter's starter notebooks (no solutions, no outputs)")
    p.add_argument("chapter", help="chapter folder (e.g. 01-introduction) or path to one page .md")
    p.add_argument("-o", "--output", help="output folder (default starters/CHAPTER)")
    p.add_argument("--install", help="what the starters' set-up cell pip-installs interpbook from "
                   "(default: $INTERPBOOK_BASEURL/_static/<wheel>, else this checkout)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("models", help="list the model registry: installed, cached, how to install")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``interpbook`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (LookupError, FileNotFoundError, ValueError) as exc:
        print(f"interpbook {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
