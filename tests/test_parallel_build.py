"""``sphinx -j N``: the pages that execute code are spread over Sphinx's reader chunks by their expected time."""

import json
import os
import random
import sqlite3
import time
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from sphinx.util.parallel import ParallelTasks, make_chunks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "book" / "_ext"))
from interpbook_parallel import (  # noqa: E402
    HEAVY_GIB,
    MEASURED,
    PEAKS,
    balance_pages,
    cached_seconds,
    dispatch_order,
    executes_code,
    create_execution_cache,
    expected_seconds,
    prepare,
)

from interpbook.cli import kernel_threads  # noqa: E402


def _finish(order: list[str], seconds: dict[str, float], nproc: int) -> float:
    """When a pool of ``nproc`` processes reading Sphinx's chunks is done."""
    chunks = make_chunks(order, nproc)
    free = [0.0] * nproc
    for i in dispatch_order(len(chunks), nproc):
        free[free.index(min(free))] += sum(seconds.get(d, 0) for d in chunks[i])
    return max(free)


def _started(arg):
    chunk, folder = arg
    (Path(folder) / f"{time.monotonic():.6f}-{chunk}").touch()
    time.sleep(0.2 + 0.15 * chunk)   # unequal, so no two chunks start at the same moment (their order is then a race)


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 5])
def test_dispatch_order_is_the_order_sphinx_starts_chunks(tmp_path, n_chunks):
    """Pins the pool behaviour the balancing relies on (fails if Sphinx changes it)."""
    tasks = ParallelTasks(2)
    for chunk in range(n_chunks):
        tasks.add_task(_started, (chunk, tmp_path))
    tasks.join()
    started = [int(p.name.split("-")[1]) for p in sorted(tmp_path.iterdir(), key=lambda p: float(p.name.split("-")[0]))]
    assert started == dispatch_order(n_chunks, 2)


@pytest.mark.parametrize("n_docs,n_code,nproc", [(45, 30, 2), (60, 40, 2), (7, 3, 2), (20, 20, 4), (30, 0, 2), (1, 1, 2)])
def test_chunks_carry_equal_time_heaviest_first(n_docs, n_code, nproc):
    rng = random.Random(n_docs)
    docs = [f"{i:02d}-doc" for i in range(n_docs)]
    seconds = {d: rng.uniform(10, 150) for d in docs[:n_code]}   # sorted names: a chapter's pages together
    order = balance_pages(docs, seconds, nproc)
    assert sorted(order) == docs                                   # a permutation
    chunks = make_chunks(order, nproc)
    assert [len(c) for c in chunks] == [len(c) for c in make_chunks(docs, nproc)]
    load = [sum(seconds.get(d, 0) for d in c) for c in chunks]
    assert sum(load) == pytest.approx(sum(seconds.values()))
    slack = max(seconds.values(), default=0)
    assert _finish(order, seconds, nproc) <= sum(seconds.values()) / nproc + slack


@pytest.mark.parametrize("n_docs,n_code,n_heavy", [(60, 40, 5), (45, 30, 1), (20, 20, 12)])
def test_heavy_pages_share_one_chunk(n_docs, n_code, n_heavy):
    rng = random.Random(n_heavy)
    docs = [f"{i:02d}-doc" for i in range(n_docs)]
    seconds = {d: rng.uniform(10, 150) for d in docs[:n_code]}
    heavy = set(rng.sample(docs[:n_code], n_heavy))
    order = balance_pages(docs, seconds, 2, heavy)
    assert sorted(order) == docs
    chunks = make_chunks(order, 2)
    assert [len(c) for c in chunks] == [len(c) for c in make_chunks(docs, 2)]
    holding = [c for c in chunks if heavy & set(c)]
    if n_heavy <= max(len(c) for c in chunks):
        assert len(holding) == 1                                      # never two heavy pages at once
    else:                                                             # more than a chunk holds: one chunk is all heavy
        assert any(set(c) <= heavy for c in holding)


def test_the_measured_book_finishes_sooner_than_in_name_order():
    """On the page times measured on a cold SmolLM2 build, the rearranged pages finish at
    least as soon as the sorted ones, within one page of the ideal, with the measured
    heavy pages in one chunk."""
    seconds = json.loads(MEASURED.read_text())
    heavy = {d for d, gib in json.loads(PEAKS.read_text()).items() if gib >= HEAVY_GIB}
    assert heavy <= set(seconds), "page_peaks.json names pages that page_seconds.json does not"
    docs = sorted(seconds) + [f"{c}/index" for c in {d.split("/")[0] for d in seconds}] + ["index", "schedule"]
    docs.sort()
    order = balance_pages(docs, seconds, 2, heavy)
    balanced = _finish(order, seconds, 2)
    assert balanced <= _finish(docs, seconds, 2)
    assert balanced <= sum(seconds.values()) / 2 + max(seconds.values())
    assert sum(bool(heavy & set(c)) for c in make_chunks(order, 2)) <= 1


def test_expected_seconds_prefer_the_cache_then_the_measurements_then_the_median():
    got = expected_seconds(["a", "b", "c", "d"], cached={"a": 5.0}, measured={"a": 50.0, "b": 20.0, "c": 30.0})
    assert got == {"a": 5.0, "b": 20.0, "c": 30.0, "d": 20.0}
    assert expected_seconds(["x", "y"], {}, {}) == {"x": 1.0, "y": 1.0}   # nothing known: by count


def test_cached_seconds_read_the_latest_run_of_each_page(tmp_path):
    src = tmp_path / "book"
    (src / "ch").mkdir(parents=True)
    cache = get_cache(tmp_path / "cache")
    for i, secs in enumerate([7.0, 3.0]):                        # two versions of one page
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"x = {i}")])
        cache.cache_notebook_bundle(CacheBundleIn(nb, str(src / "ch" / "page.md"), data={"execution_seconds": secs}), check_validity=False)
    elsewhere = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("y = 1")])
    cache.cache_notebook_bundle(CacheBundleIn(elsewhere, str(tmp_path / "other.md"), data={"execution_seconds": 9.0}), check_validity=False)
    assert cached_seconds(tmp_path / "cache", src) == {"ch/page": 3.0}
    assert cached_seconds(tmp_path / "missing", src) == {}


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


def test_a_page_executes_when_it_is_a_myst_notebook_with_code(tmp_path):
    notebook = ("---\njupytext:\n  text_representation:\n    format_name: myst\nkernelspec:\n  name: python3\n---\n\n"
                "# T\n\n```{code-cell} ipython3\n1\n```\n")
    shown = "# Writing\n\nA fence shows one:\n\n````\n```{code-cell} ipython3\n1\n```\n````\n\nkernelspec: in prose\n"
    for name, text, expected in [("nb.md", notebook, True), ("shown.md", shown, False),
                                 ("prose.md", notebook.split("# T")[0] + "# no code\n", False), ("x.rst", notebook, False)]:
        (tmp_path / name).write_text(text)
        assert executes_code(tmp_path / name) is expected, name
