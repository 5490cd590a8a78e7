"""Rewrite ``book/_ext/page_seconds.json``: each page's execution seconds in a build's cache.

The parallel build (``book/_ext/interpbook_parallel.py``) uses these times to balance a
cold build's pages over its processes. Refresh them after a cold SmolLM2 build with
``sphinx -j 2`` (the times are for a page at one thread while another page runs)::

    .venv/bin/python bench/page_seconds.py _build/.jupyter_cache/<digest>

After a build of some chapters only (``INTERPBOOK_CHAPTERS``), ``--update`` replaces the
times of the pages that build ran and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BOOK = Path(__file__).resolve().parents[1] / "book"
sys.path.insert(0, str(BOOK / "_ext"))
from interpbook_parallel import MEASURED, cached_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="a jupyter-cache folder (the one holding global.db)")
    parser.add_argument("--book", type=Path, default=BOOK,
                        help="the book folder the build read (another clone's, e.g. bench/book_build.py's)")
    parser.add_argument("--update", action="store_true",
                        help="keep the times of pages this build did not run (a build of some chapters)")
    args = parser.parse_args()
    seconds = cached_seconds(args.cache, args.book.resolve())
    if not seconds:
        sys.exit(f"{args.cache} holds no executed pages of {args.book} (is it a jupyter-cache folder of this checkout?)")
    kept = json.loads(MEASURED.read_text()) if args.update and MEASURED.is_file() else {}
    merged = {**kept, **{d: round(s, 1) for d, s in seconds.items()}}
    MEASURED.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
    print(f"{len(seconds)} pages measured ({sum(seconds.values()):.0f} s), {len(merged)} in {MEASURED}")


if __name__ == "__main__":
    main()
