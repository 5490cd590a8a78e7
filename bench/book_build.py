"""Time a cold build of the whole book, its peak memory, and a rebuild with nothing changed.

Runs the book's strict HTML build (the command of ``make book``) twice into a temporary
folder: first cold (empty execution cache and, unless ``--keep-artifacts``, an empty
``INTERPBOOK_CACHE``, so the model is converted and the SAE, tuned lens etc. are trained
again), then again with nothing changed. While a build runs, the resident memory of
its whole process tree (Sphinx, its reader processes and their kernels) is sampled
twice a second. Prints wall times, the peak of the tree's total RSS and of its largest
process, and each chapter's page seconds from the execution cache::

    .venv/bin/python bench/book_build.py                   # SmolLM2, -j 2
    .venv/bin/python bench/book_build.py --model gemma-3-270m
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


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """Total and largest resident set size (bytes) of a process and its descendants."""
    sizes = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:
            pass
    return sum(sizes), max(sizes, default=0)


def build(out: Path, env: dict, jobs: int) -> dict:
    """One strict build; its wall seconds, peak total and peak single-process RSS."""
    cmd = [sys.executable, "-m", "sphinx", "-j", str(jobs), "-W", "--keep-going", "-n", "-q",
           "-b", "html", str(ROOT / "book"), str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    watched, peak_total, peak_one = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        total, one = tree_rss(watched)
        peak_total, peak_one = max(peak_total, total), max(peak_one, one)
        time.sleep(0.5)
    if proc.returncode:
        sys.exit(f"the build failed (exit {proc.returncode}): {' '.join(cmd)}")
    return {"wall": time.perf_counter() - start, "rss": peak_total, "rss_one": peak_one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--keep-artifacts", action="store_true",
                        help="reuse $INTERPBOOK_CACHE (converted model, trained SAE ...) instead of an empty one")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="book-bench-"))
    env = dict(os.environ, INTERPBOOK_MODEL=args.model, INTERPBOOK_EXECUTION_CACHE=str(work / "exec"),
               HF_HUB_OFFLINE="1")
    if not args.keep_artifacts:
        env["INTERPBOOK_CACHE"] = str(work / "artifacts")
    print(f"{args.model}, -j {args.jobs}, {os.cpu_count()} CPUs, work folder {work}", flush=True)
    cold = build(work / "html", env, args.jobs)
    again = build(work / "html", env, args.jobs)
    gib = 2**30
    print(f"cold build        {cold['wall'] / 60:6.1f} min   peak RSS {cold['rss'] / gib:5.2f} GiB in all, "
          f"{cold['rss_one'] / gib:5.2f} GiB largest process")
    print(f"no-change rebuild {again['wall']:6.1f} s     peak RSS {again['rss'] / gib:5.2f} GiB in all")
    seconds = {}
    for db in (work / "exec").glob("*/global.db"):
        seconds.update(cached_seconds(db.parent, ROOT / "book"))
    chapters = collections.Counter()
    for doc, secs in seconds.items():
        chapters[doc.split("/")[0]] += secs
    print(f"page seconds: {sum(seconds.values()):.0f} in all over {len(seconds)} pages")
    for chapter, secs in sorted(chapters.items()):
        print(f"  {chapter:<34} {secs:6.0f}")


if __name__ == "__main__":
    main()
