"""Executing pages in parallel: ``sphinx -j N`` runs N page kernels at once.

Sphinx reads the documents in contiguous chunks of its sorted list (``make_chunks``), and
a pool of N processes reads the chunks, each chunk's pages one after another. Sorted by
name, a chapter's slow pages share a chunk, and the build waits at the end for the one
process still running them. Before reading, this extension rearranges the pages so that
the processes finish together:

* a page's expected seconds come from the execution cache (the last time it ran, for
  this model) or else from ``page_seconds.json`` beside this file (measured on a cold
  SmolLM2 build; ``bench/page_seconds.py`` rewrites it); a page in neither costs the
  median of the known ones, and pages without code cost nothing;
* each chunk gets a target time from a simulation of the pool (a process that will read
  more chunks gets smaller ones), and the pages are placed longest first, each into the
  chunk furthest below its target that still has room (chunk sizes stay as Sphinx made
  them);
* the memory-heavy pages (a peak of at least :data:`HEAVY_GIB` in ``page_peaks.json``,
  measured by ``bench/page_memory.py``) are placed first, all into one chunk, so that one
  process runs them one after another and two of them never run at once.

It also gives every kernel ``cores // N`` threads (two kernels with a thread per core each
beat one kernel with two; oversubscribed OpenMP threads wait on each other), and creates
the execution cache's database before the reader processes start: jupyter-cache creates
it on first use, and two processes that both find it missing race to create its tables.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from interpbook.cli import kernel_threads
from interpbook.starters import is_notebook_source
from jupyter_cache import get_cache
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util.parallel import make_chunks

MEASURED = Path(__file__).with_name("page_seconds.json")
PEAKS = Path(__file__).with_name("page_peaks.json")
HEAVY_GIB = 1.9
"""A page whose kernel peaks at this much resident memory or more (model included) is
heavy: two such kernels side by side, with Sphinx's own processes, would pass 4 GiB."""


def executes_code(path: Path) -> bool:
    """Whether a page is a MyST notebook with code cells (a page that only shows a code
    cell inside a fence is not)."""
    if path.suffix != ".md":
        return False
    text = path.read_text(encoding="utf-8")
    return is_notebook_source(text) and "```{code-cell}" in text


def dispatch_order(n_chunks: int, nproc: int) -> list[int]:
    """The order in which Sphinx's process pool starts the chunks: the first ``nproc`` at
    once, then, as processes finish, the waiting ones last-queued first
    (``ParallelTasks`` pops its waiting dict, which is last in, first out)."""
    first = list(range(min(nproc, n_chunks)))
    return first + list(range(n_chunks - 1, len(first) - 1, -1))


def chunk_targets(n_chunks: int, nproc: int, total: float) -> list[float]:
    """Seconds each chunk should carry so that all processes finish together: a process
    that will run more chunks gets smaller ones, so it frees up first and takes the next."""
    many, extra = divmod(n_chunks, nproc)
    per_chunk = [total / nproc / (many + (w < extra)) for w in range(min(nproc, n_chunks))]
    targets, free = [0.0] * n_chunks, [0.0] * len(per_chunk)
    for chunk in dispatch_order(n_chunks, nproc):
        worker = free.index(min(free))
        targets[chunk] = per_chunk[worker]
        free[worker] += per_chunk[worker]
    return targets


def balance_pages(docnames: list[str], seconds: dict[str, float], nproc: int,
                  heavy: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``docnames`` reordered so that the processes reading Sphinx's chunks
    (``make_chunks``) all finish at about the same time, given each page's expected
    ``seconds`` (pages missing from it cost nothing); a permutation of ``docnames``.
    The ``heavy`` pages go into one chunk (as many as it holds), the one with the most
    time to fill."""
    sizes = [len(chunk) for chunk in make_chunks(docnames, nproc)]
    costly = sorted((d for d in docnames if seconds.get(d, 0) > 0), key=lambda d: (d not in heavy, -seconds[d]))
    deficit = chunk_targets(len(sizes), nproc, sum(seconds[d] for d in costly))
    home = max(range(len(sizes)), key=lambda i: (deficit[i], -i))
    buckets: list[list[str]] = [[] for _ in sizes]
    for doc in costly:
        room = [i for i, b in enumerate(buckets) if len(b) < sizes[i]]
        best = home if doc in heavy and home in room else max(room, key=lambda i: (deficit[i], -i))
        buckets[best].append(doc)
        deficit[best] -= seconds[doc]
    rest = iter(d for d in docnames if seconds.get(d, 0) <= 0)
    for bucket, size in zip(buckets, sizes):
        bucket += [next(rest) for _ in range(size - len(bucket))]
    return [doc for bucket in buckets for doc in bucket]


def cached_seconds(cache_path: str | Path, srcdir: Path) -> dict[str, float]:
    """Each page's execution seconds in its latest run recorded in a jupyter-cache
    folder, by docname (empty when there is no cache yet)."""
    if not (Path(cache_path) / "global.db").is_file():
        return {}
    found: dict[str, tuple] = {}
    for record in get_cache(cache_path).list_cache_records():
        secs = (record.data or {}).get("execution_seconds")
        path = Path(record.uri)
        if secs is None or not path.is_relative_to(srcdir):
            continue
        doc = path.relative_to(srcdir).with_suffix("").as_posix()
        if doc not in found or record.created > found[doc][0]:
            found[doc] = (record.created, float(secs))
    return {doc: secs for doc, (_, secs) in found.items()}


def expected_seconds(executing: list[str], cached: dict[str, float], measured: dict[str, float]) -> dict[str, float]:
    """Expected seconds for each executing page: cached, else measured, else the median
    of the known ones (1 when nothing is known, which balances by count)."""
    known = [cached.get(d, measured.get(d)) for d in executing]
    default = statistics.median([k for k in known if k is not None] or [1.0])
    return {d: (k if k is not None else default) for d, k in zip(executing, known)}


def reorder(app: Sphinx, env: BuildEnvironment, docnames: list[str]) -> None:
    if app.parallel <= 1 or len(docnames) <= 1:
        return
    executing = [d for d in docnames if executes_code(Path(env.doc2path(d)))]
    cache = getattr(app.config, "nb_execution_cache_path", None)
    cached = cached_seconds(cache, Path(app.srcdir)) if cache else {}
    measured = json.loads(MEASURED.read_text()) if MEASURED.is_file() else {}
    peaks = json.loads(PEAKS.read_text()) if PEAKS.is_file() else {}
    heavy = {d for d in executing if peaks.get(d, 0) >= HEAVY_GIB}
    docnames[:] = balance_pages(docnames, expected_seconds(executing, cached, measured), app.parallel, heavy)


def create_execution_cache(path: str | Path) -> Path:
    """Create the jupyter-cache folder and database at ``path`` if missing (idempotent)."""
    cache = get_cache(path)
    cache.db  # noqa: B018 (creates the tables on first access)
    return cache.path


def prepare(app: Sphinx) -> None:
    kernel_threads(app.parallel)
    if app.parallel > 1 and getattr(app.config, "nb_execution_mode", None) == "cache":
        create_execution_cache(app.config.nb_execution_cache_path)


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", prepare)
    app.connect("env-before-read-docs", reorder)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
