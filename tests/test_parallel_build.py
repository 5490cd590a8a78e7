"""``sphinx -j N``: the pages that execute code are spread over Sphinx's reader chunks."""

import os
import sqlite3
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from sphinx.util.parallel import make_chunks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book" / "_ext"))
from interpbook_parallel import create_execution_cache, deal_pages, prepare  # noqa: E402

from interpbook.cli import kernel_threads  # noqa: E402


@pytest.mark.parametrize("n_docs,n_code,nproc", [(45, 30, 2), (60, 40, 2), (7, 3, 2), (20, 20, 4), (30, 0, 2), (1, 1, 2)])
def test_pages_with_code_are_dealt_over_the_chunks(n_docs, n_code, nproc):
    docs = [f"{i:02d}-doc" for i in range(n_docs)]
    code = set(docs[:n_code])                      # sorted names put a chapter's pages together
    order = deal_pages(docs, code, nproc)
    assert sorted(order) == docs                   # a permutation
    chunks = make_chunks(order, nproc)
    counts = [sum(d in code for d in chunk) for chunk in chunks]
    assert sum(counts) == n_code
    # balanced: a chunk with fewer code pages than another is one that is all code already
    assert all(c >= max(counts) - 1 or c == len(chunk) for c, chunk in zip(counts, chunks))
    # dealt in order: chunk k starts with the k-th page that has code
    firsts = [next((d for d in chunk if d in code), None) for chunk in chunks]
    assert [f for f in firsts if f is not None] == docs[: sum(f is not None for f in firsts)]


def test_kernels_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    kernel_threads(1)
    assert "OMP_NUM_THREADS" not in os.environ      # one kernel at a time: torch's own default
    kernel_threads(2)
    assert os.environ["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    kernel_threads(2)
    assert os.environ["OMP_NUM_THREADS"] == "3"     # the user's choice wins


def _tables(folder: Path) -> set[str]:
    with sqlite3.connect(folder / "global.db") as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.mark.parametrize("parallel,mode,created", [(2, "cache", True), (1, "cache", False), (2, "off", False)])
def test_the_execution_cache_exists_before_parallel_readers_start(tmp_path, monkeypatch, parallel, mode, created):
    """Two reader processes that both find the cache database missing race to create its
    tables ("table nbproject already exists"): the main process creates it first."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    folder = tmp_path / "cache" / "digest"
    app = SimpleNamespace(parallel=parallel, config=SimpleNamespace(nb_execution_mode=mode,
                                                                    nb_execution_cache_path=str(folder)))
    prepare(app)
    assert (folder / "global.db").exists() is created
    if created:
        assert "nbproject" in _tables(folder)


def test_creating_the_execution_cache_is_idempotent(tmp_path):
    folder = create_execution_cache(tmp_path / "c")
    again = create_execution_cache(tmp_path / "c")
    assert folder == again and "nbproject" in _tables(folder)
