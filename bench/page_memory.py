"""Peak memory of book pages, cell by cell: which cells set a build's memory peak.

``bench/book_build.py`` sees the build's whole process tree, and a kernel only by its
chapter folder, so it cannot say which page or cell holds the peak. This script executes
each page named, alone, in a fresh kernel prepared as the book build prepares it (the
threads of one of its two kernels, the same environment and ``PYTHONSTARTUP``), and before each cell resets the
kernel's high-water mark of resident memory (``/proc/<pid>/clear_refs`` <- 5). After the
cell it reads the high-water mark (``VmHWM``: the most the cell needed at once, model
included) and the resident memory left (``VmRSS``). Prints a table of the pages,
heaviest first, and each page's heaviest cells::

    .venv/bin/python bench/page_memory.py book/05-mlp-layers/key-value-memories.md
    .venv/bin/python bench/page_memory.py book/09-circuit-discovery book/05-mlp-layers --cells 3

Uses ``$INTERPBOOK_CACHE`` as it is: run it after a build, so that converted models and
trained artefacts are on disk, and training does not count as a page's memory (Linux only).
With ``--write``, each page's peak goes into ``book/_ext/page_peaks.json``, where the
parallel build reads which pages must not run beside each other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
from interpbook.cli import kernel_environment, kernel_threads  # noqa: E402
from interpbook.starters import book_notebook  # noqa: E402
from interpbook_parallel import PEAKS, executes_code  # noqa: E402

GIB = 2**30


def status_bytes(pid: int, field: str) -> int:
    """A ``VmHWM``/``VmRSS`` line of ``/proc/<pid>/status``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in /proc/{pid}/status")


class MeasuringClient(NotebookClient):
    """Executes a notebook and records, for each code cell, the kernel's peak and
    remaining resident memory and the cell's wall seconds."""

    def __init__(self, nb, **kwargs):
        super().__init__(nb, on_cell_execute=self._before, on_cell_executed=self._after, **kwargs)
        self.cells: list[dict] = []

    def _pid(self) -> int:
        return self.km.provisioner.process.pid

    def _before(self, cell, cell_index):
        Path(f"/proc/{self._pid()}/clear_refs").write_text("5")
        self._start = time.perf_counter()

    def _after(self, cell, cell_index, execute_reply):
        pid = self._pid()
        self.cells.append({"index": cell_index, "peak": status_bytes(pid, "VmHWM"), "left": status_bytes(pid, "VmRSS"),
                           "seconds": time.perf_counter() - self._start, "first_line": cell.source.splitlines()[0] if cell.source else ""})


def measure(page: Path) -> list[dict]:
    nb = book_notebook(page)  # exercise tags mapped as in the build (starter cells skipped)
    client = MeasuringClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(page.parent)}})
    client.execute()
    return client.cells


def pages(targets: list[str]) -> list[Path]:
    found = []
    for target in targets:
        path = Path(target).resolve()
        found += sorted(p for p in path.rglob("*.md") if executes_code(p)) if path.is_dir() else [path]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="pages (.md) or folders of pages")
    parser.add_argument("--cells", type=int, default=2, help="heaviest cells to show per page")
    parser.add_argument("--write", action="store_true",
                        help=f"record each page's peak in {PEAKS.relative_to(ROOT)} (keeps pages not measured)")
    args = parser.parse_args()
    kernel_threads(2)
    kernel_environment()
    results = []
    for page in pages(args.targets):
        start = time.perf_counter()
        cells = measure(page)
        results.append((page, cells, time.perf_counter() - start))
        top = max(cells, key=lambda c: c["peak"])
        if args.write:
            known = json.loads(PEAKS.read_text()) if PEAKS.is_file() else {}
            known[page.relative_to(ROOT / "book").with_suffix("").as_posix()] = round(top["peak"] / GIB, 2)
            PEAKS.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
        print(f"{page.relative_to(ROOT)}: peak {top['peak'] / GIB:.2f} GiB (cell {top['index']}), "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    print(f"\n| page | peak GiB | left after last cell GiB | seconds | heaviest cells (index: peak GiB, first line) |")
    print("|---|---:|---:|---:|---|")
    for page, cells, secs in sorted(results, key=lambda r: -max(c["peak"] for c in r[1])):
        heavy = sorted(cells, key=lambda c: -c["peak"])[: args.cells]
        said = "; ".join(f"{c['index']}: {c['peak'] / GIB:.2f}, `{c['first_line'][:50]}`" for c in heavy)
        print(f"| {page.relative_to(ROOT / 'book')} | {heavy[0]['peak'] / GIB:.2f} | {cells[-1]['left'] / GIB:.2f} | {secs:.0f} | {said} |")


if __name__ == "__main__":
    main()
