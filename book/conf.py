"""Sphinx configuration of the interpbook textbook (plain conf.py, no Jupyter Book).

Build with ``make book`` or ``sphinx-build -W --keep-going -n -b html book _build/html``.

Execution: every MyST notebook page is executed strictly (a failing cell fails the
build; an intended error needs the ``raises-exception`` tag) and cached with
jupyter-cache. jupyter-cache only keys on the cells, so the cache folder is keyed on a
digest of what else decides the outputs: the ``interpbook`` sources that the kernels
will import, the torch/transformers/Python versions and ``INTERPBOOK_MODEL``. Editing
the package therefore re-executes the book. ``INTERPBOOK_EXECUTION_CACHE`` moves the
cache root (tests use a fresh temporary one); ``INTERPBOOK_CHAPTERS`` limits the build
to some chapters (``interpbook build --chapter``); the appendix pages that execute code
are left out then unless the list names ``appendix``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
sys.path.insert(0, str(BOOK / "_ext"))

from interpbook.cli import CHAPTERS_ENV, kernel_environment  # noqa: E402
from interpbook.starters import left_out  # noqa: E402

kernel_environment()  # before any kernel starts: figures kept, no tqdm/IProgress noise


def execution_digest() -> str:
    """16 hex digits identifying everything besides the cells that decides the outputs."""
    spec = importlib.util.find_spec("interpbook")
    package = Path(next(iter(spec.submodule_search_locations)))
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in ("torch", "transformers"):
        h.update(f"{dist}=={importlib.metadata.version(dist)}\0".encode())
    h.update(f"python=={platform.python_version()}\0".encode())
    h.update(f"model={os.environ.get('INTERPBOOK_MODEL', '')}\0".encode())
    return h.hexdigest()[:16]


# -- Project -----------------------------------------------------------------------------
project = "Interpretability of Large Language Models"
author = "interpbook contributors"
copyright = "2025, interpbook contributors; course by Mor Geva and Daniela Gottesman"

extensions = [
    "myst_nb",  # brings myst_parser; listing it again after myst_nb is an error
    "sphinx_design",
    "sphinx_copybutton",
    "sphinx_togglebutton",
    "sphinxcontrib.bibtex",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "interpbook_mathjax",  # a local MathJax 3 in _static/mathjax: math renders offline
    "interpbook_starters",
    "interpbook_reproductions",
    "interpbook_titles",  # citations in headings read as text in the TOC and navigation
    "interpbook_parallel",  # sphinx -j N: pages that run code spread over the N reader processes
    "interpbook_api",
]

exclude_patterns = ["_build", ".venv", "**/.ipynb_checkpoints", "_ext", "Thumbs.db", ".DS_Store"]
_only = [c.strip() for c in os.environ.get(CHAPTERS_ENV, "").split(",") if c.strip()]
if _only:
    exclude_patterns += [f"{doc}.md" for doc in left_out(BOOK, _only)]
    # the landing page and the schedule still name the chapters (and pages) left out
    suppress_warnings = ["toc.excluded", "toc.not_readable", "ref.doc"]

# -- MyST and notebooks -------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
myst_heading_anchors = 3

_cache_root = Path(os.environ.get("INTERPBOOK_EXECUTION_CACHE", ROOT / "_build" / ".jupyter_cache"))
nb_execution_mode = "cache"
nb_execution_cache_path = str(_cache_root / execution_digest())
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_allow_errors = False
nb_execution_show_tb = True
nb_output_stderr = "warn"  # stderr on a page fails the -W build: fix it at the source
nb_merge_streams = True

# -- Citations and API -------------------------------------------------------------------
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
bibtex_default_style = "plain"
autodoc_member_order = "bysource"
# No intersphinx (it needs the network): names from other libraries stay plain text,
# while references into interpbook itself must resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"(?!interpbook\.)\w+(\.\w+)+"),
    (r"py:class", r"SiteSpec|Prompts"),  # type aliases keep their short name in signatures
]
autodoc_typehints = "description"
napoleon_google_docstring = True

# -- HTML --------------------------------------------------------------------------------
# Where the book is published (e.g. https://example.org/interpbook/): links in the starter
# notebooks and their install cell become absolute; unset, they are relative paths.
html_baseurl = os.environ.get("INTERPBOOK_BASEURL", "")
interpbook_wheel_cache = str(_cache_root / "wheels")  # the package wheel the starters install
mathjax_path = "mathjax/tex-mml-chtml.js"  # relative to _static/: no CDN
html_theme = "sphinx_book_theme"
html_title = "Interpretability of LLMs"
html_static_path = ["_static"]
html_css_files = ["interpbook.css"]
html_theme_options = {
    "use_download_button": True,
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_last_updated_fmt = None
