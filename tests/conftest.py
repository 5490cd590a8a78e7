"""Shared fixtures: paths, and the book builds that several tests inspect.

A book build executes notebooks (minutes for the real book), so each build is made once
per session and shared: ``built_book`` is a cold build of the real book with a fresh
execution cache and the network blocked; ``pipeline_book`` builds a copy of the book
with the small fixture chapter in ``tests/fixtures/pipeline-chapter`` that exercises
every pipeline feature without a model.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from interpbook.cli import strict_build

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "book"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFLINE = FIXTURES / "offline"  # sitecustomize.py that blocks the network
PIPELINE_CHAPTER = "90-pipeline"


@dataclasses.dataclass
class Build:
    """A finished sphinx-build: where its output went and what it printed."""

    src: Path
    out: Path
    cache: Path
    env: dict
    stdout: str
    seconds: float

    def html(self, docname: str) -> str:
        return (self.out / f"{docname}.html").read_text(encoding="utf-8")


def book_env(cache: Path, *, offline: bool = False, pythonpath: Path | None = None, **extra: str) -> dict:
    """Environment of a test build: its own execution cache, ``MPLBACKEND=Agg`` (the
    book must drop it or lose every figure), optionally the network blocked."""
    env = dict(os.environ, INTERPBOOK_EXECUTION_CACHE=str(cache), MPLBACKEND="Agg", **extra)
    paths = [str(p) for p in (OFFLINE if offline else None, pythonpath) if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def sphinx_build(src: Path, out: Path, env: dict, *, timeout: float = 3600) -> Build:
    """Build ``src`` into ``out`` as ``make book`` does (strict, two pages at a time); fail the
    test with the log."""
    import time

    start = time.monotonic()
    proc = subprocess.run(strict_build(src, out), env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"sphinx-build {src} failed ({proc.returncode}):\n{log[-6000:]}", pytrace=False)
    return Build(src, out, Path(env["INTERPBOOK_EXECUTION_CACHE"]), env, log, time.monotonic() - start)


def copy_book_with_pipeline_chapter(dest: Path) -> Path:
    """A copy of ``book/`` with the fixture chapter added as ``90-pipeline`` (the landing
    page's Chapters toctree globs ``NN-topic/index``, so it is listed automatically)."""
    src = dest / "book"
    shutil.copytree(BOOK, src, ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints", "__pycache__"))
    shutil.copytree(FIXTURES / "pipeline-chapter", src / PIPELINE_CHAPTER)
    assert "[0-9][0-9]-*/index" in (src / "index.md").read_text(encoding="utf-8"), (
        "book/index.md no longer globs the chapter folders; add the fixture chapter here"
    )
    return src


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> Build:
    """The real book, built cold (fresh execution cache) with the network blocked."""
    tmp = tmp_path_factory.mktemp("book")
    return sphinx_build(BOOK, tmp / "html", book_env(tmp / "cache", offline=True))


@pytest.fixture(scope="session")
def pipeline_book(tmp_path_factory) -> Build:
    """The book's front matter plus the fixture chapter only (no model needed)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    src = copy_book_with_pipeline_chapter(tmp)
    env = book_env(tmp / "cache", INTERPBOOK_CHAPTERS=PIPELINE_CHAPTER)
    return sphinx_build(src, tmp / "html", env, timeout=600)


@pytest.fixture(scope="session")
def real_model():
    """The default offline model, loaded once per test session for integration tests."""
    import interpbook as ib

    return ib.load_model()
