"""Time a cold build of the whole book, its peak memory, and a rebuild with nothing changed.

Runs the book's strict HTML build (the command of ``make book``) twice into a temporary
folder: first cold (empty execution cache and, unless ``--keep-artifacts``, an empty
``INTERPBOOK_CACHE``, so the model is converted and the SAE, tuned lens etc. are trained
again), then again with nothing changed. While a build runs, the resident memory of
its whole process tree (Sphinx, its reader processes and their kernels) is sampled
twice a second. Prints wall times, the peaks of the tree's summed RSS and PSS and of the
machine's memory in use (MemTotal - MemAvailable, above where it stood before), the
largest processes, and each chapter's page seconds from the execution cache::

    .venv/bin/python bench/book_build.py                   # SmolLM2, -j 2
    .venv/bin/python bench/book_build.py --model gemma-3-270m
    .venv/bin/python bench/book_build.py --chapters 09-circuit-discovery --keep-artifacts
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
from interpbook_parallel import cached_seconds  # noqa: E402


def tree_memory(proc: psutil.Process) -> list[tuple[int, int, int, str]]:
    """(pid, RSS, PSS, what) of a process and each of its descendants, in bytes. PSS counts
    a page shared by n processes as 1/n in each, so the PSS sum is the memory the tree
    holds; the RSS sum counts the pages Sphinx's forked readers share with it more than
    once. ``what`` is "kernel <chapter>" for a notebook kernel (it runs in its page's
    folder), else "sphinx"."""
    rows = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            mem = p.memory_full_info()
            kernel = "ipykernel" in " ".join(p.cmdline())
            what = f"kernel {Path(p.cwd()).relative_to(ROOT / 'book')}" if kernel else "sphinx"
        except (psutil.Error, ValueError):
            continue
        rows.append((p.pid, mem.rss, mem.pss, what))
    return rows


def machine_in_use() -> int:
    """Memory the whole machine cannot hand out (MemTotal - MemAvailable), in bytes: a check
    on the tree's PSS from the kernel's side, which also sees anything else running."""
    vm = psutil.virtual_memory()
    return vm.total - vm.available


def build(out: Path, env: dict, jobs: int) -> dict:
    """One strict build: its wall seconds, the peaks of the tree's summed RSS and PSS and of
    the machine's memory in use above where it stood before, each process's peak RSS, and its
    exit status (``failed``, 0 when it passed)."""
    cmd = [sys.executable, "-m", "sphinx", "-j", str(jobs), "-W", "--keep-going", "-n", "-q",
           "-b", "html", str(ROOT / "book"), str(out)]
    start = time.perf_counter()
    before = machine_in_use()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    watched, peaks, each = psutil.Process(proc.pid), {"rss": 0, "pss": 0, "machine": 0}, {}
    while proc.poll() is None:
        rows = tree_memory(watched)
        peaks["rss"] = max(peaks["rss"], sum(r[1] for r in rows))
        peaks["pss"] = max(peaks["pss"], sum(r[2] for r in rows))
        peaks["machine"] = max(peaks["machine"], machine_in_use() - before)
        for pid, rss, _, what in rows:
            each[pid, what] = max(each.get((pid, what), 0), rss)
        time.sleep(0.5)
    return {"wall": time.perf_counter() - start, **peaks, "each": each, "failed": proc.returncode,
            "cmd": " ".join(cmd)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--chapters", default="",
                        help="build only these chapters (INTERPBOOK_CHAPTERS, e.g. 01-introduction,09-circuit-discovery)")
    parser.add_argument("--keep-artifacts", action="store_true",
                        help="reuse $INTERPBOOK_CACHE (converted model, trained SAE ...) instead of an empty one")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="book-bench-"))
    env = dict(os.environ, INTERPBOOK_MODEL=args.model, INTERPBOOK_EXECUTION_CACHE=str(work / "exec"),
               HF_HUB_OFFLINE="1")
    if args.chapters:
        env["INTERPBOOK_CHAPTERS"] = args.chapters
    if not args.keep_artifacts:
        env["INTERPBOOK_CACHE"] = str(work / "artifacts")
    print(f"{args.model}, -j {args.jobs}, {os.cpu_count()} CPUs, work folder {work}", flush=True)
    cold = build(work / "html", env, args.jobs)
    again = build(work / "html", env, args.jobs) if not cold["failed"] else None
    gib = 2**30
    print(f"cold build        {cold['wall'] / 60:6.1f} min   peak memory of the tree: RSS {cold['rss'] / gib:5.2f} "
          f"GiB, PSS {cold['pss'] / gib:5.2f} GiB; machine's memory in use: +{cold['machine'] / gib:.2f} GiB")
    if again:
        print(f"no-change rebuild {again['wall']:6.1f} s     peak memory of the tree: RSS {again['rss'] / gib:5.2f} "
              f"GiB, PSS {again['pss'] / gib:5.2f} GiB")
    print("largest processes of the cold build (peak RSS):")
    for (pid, what), rss in sorted(cold["each"].items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {rss / gib:5.2f} GiB  {what} (pid {pid})")
    seconds = {}
    for db in (work / "exec").glob("*/global.db"):
        seconds.update(cached_seconds(db.parent, ROOT / "book"))
    chapters = collections.Counter()
    for doc, secs in seconds.items():
        chapters[doc.split("/")[0]] += secs
    print(f"page seconds: {sum(seconds.values()):.0f} in all over {len(seconds)} pages")
    for chapter, secs in sorted(chapters.items()):
        print(f"  {chapter:<34} {secs:6.0f}")
    failed = [b for b in (cold, again) if b and b["failed"]]
    if failed:  # the figures above still hold: every page ran (--keep-going), a warning failed it
        sys.exit(f"the build failed (exit {failed[0]['failed']}): {failed[0]['cmd']}")


if __name__ == "__main__":
    main()
