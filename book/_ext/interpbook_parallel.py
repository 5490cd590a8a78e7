"""Executing pages in parallel: ``sphinx -j N`` runs N page kernels at once.

Sphinx reads the documents in contiguous chunks of its sorted list, one process per chunk
and N processes at a time, so a chapter's pages would land in one chunk and still run one
after another. Before reading, this extension deals the pages that execute code
round-robin over the chunks (the pages without code fill the remaining places), and gives
every kernel ``cores // N`` threads: two kernels with a thread per core each beat one
kernel with two, and oversubscribed OpenMP threads wait on each other. It also creates the
execution cache's database before the reader processes start: jupyter-cache creates it on
first use, and two processes that both find it missing race to create the same tables.
"""

from __future__ import annotations

from pathlib import Path

from interpbook.cli import kernel_threads
from jupyter_cache import get_cache
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util.parallel import make_chunks


def executes_code(path: Path) -> bool:
    """Whether a page has code cells (a MyST notebook)."""
    return path.suffix == ".md" and "```{code-cell}" in path.read_text(encoding="utf-8")


def deal_pages(docnames: list[str], executes: set[str], nproc: int) -> list[str]:
    """``docnames`` reordered so that Sphinx's chunks (``make_chunks``) each get every
    n-th executing page, in the original order; a permutation of ``docnames``."""
    sizes = [len(chunk) for chunk in make_chunks(docnames, nproc)]
    buckets: list[list[str]] = [[] for _ in sizes]
    code = [d for d in docnames if d in executes]
    turn = 0
    for doc in code:
        while len(buckets[turn % len(sizes)]) >= sizes[turn % len(sizes)]:
            turn += 1
        buckets[turn % len(sizes)].append(doc)
        turn += 1
    rest = iter(d for d in docnames if d not in executes)
    for bucket, size in zip(buckets, sizes):
        bucket += [next(rest) for _ in range(size - len(bucket))]
    return [doc for bucket in buckets for doc in bucket]


def reorder(app: Sphinx, env: BuildEnvironment, docnames: list[str]) -> None:
    if app.parallel > 1 and len(docnames) > 1:
        executes = {d for d in docnames if executes_code(Path(env.doc2path(d)))}
        docnames[:] = deal_pages(docnames, executes, app.parallel)


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
