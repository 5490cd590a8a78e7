"""Citations as plain text, for the places where Sphinx does not render them.

The book cites papers with ``{cite:t}`` and ``{cite:p}`` roles, which
sphinxcontrib-bibtex renders on the pages. Three places need the same citation as
text outside that machinery: the starter notebooks (plain Markdown), the
Reproductions table (a paper's title and "Author et al. (year)" for ``paper_ref``)
and section titles in the navigation. :func:`load_bibliography` reads the book's
BibTeX file into :class:`Reference` objects that format themselves the way the
book's author-year style does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

def _plain(latex: str) -> str:
    from pybtex.backends.plaintext import Backend
    from pybtex.richtext import Text

    # Backend() directly: render_as("text") looks the backend up among every installed
    # package's entry points on each call (~70 ms each, ~25 s for the book's bibliography).
    return Text.from_latex(latex).render(Backend())


@dataclasses.dataclass(frozen=True)
class Reference:
    """One entry of the bibliography: enough to cite it in text and name the paper."""

    key: str
    surnames: tuple[str, ...]
    year: str
    title: str

    @property
    def authors(self) -> str:
        """"Surname", "Surname and Surname" or "Surname et al."."""
        if len(self.surnames) > 2:
            return f"{self.surnames[0]} et al."
        return " and ".join(self.surnames) or self.key

    def textual(self) -> str:
        """The citation as a sentence's subject: ``Gurnee and Tegmark (2024)``."""
        return f"{self.authors} ({self.year})"

    def parenthetical(self) -> str:
        """The citation inside parentheses, without them: ``Gurnee and Tegmark, 2024``."""
        return f"{self.authors}, {self.year}"


def load_bibliography(path: str | Path) -> dict[str, Reference]:
    """Every entry of a BibTeX file, by key (names and titles with LaTeX markup removed)."""
    from pybtex.database import parse_file

    refs = {}
    for key, entry in parse_file(str(path)).entries.items():
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        surnames = tuple(_plain(" ".join(p.prelast_names + p.last_names)) for p in people)
        refs[key] = Reference(
            key=key, surnames=surnames, year=entry.fields.get("year", "n.d."),
            title=_plain(entry.fields.get("title", key)),
        )
    return refs


def cite(style: str, keys: str | list[str], refs: dict[str, Reference]) -> str:
    """Render a citation role as text: ``t`` (textual) or ``p`` (parenthetical).

    ``keys`` is the role's content (comma-separated) or a list of keys. A bare
    ``{cite}`` (style ``""``) and ``ps`` are parenthetical; every other style is textual.

    Raises:
        LookupError: a key is not in the bibliography (the message names it).
    """
    if isinstance(keys, str):
        keys = [k.strip() for k in keys.split(",") if k.strip()]
    missing = [k for k in keys if k not in refs]
    if missing:
        raise LookupError(f"citation key(s) {', '.join(map(repr, missing))} not in the bibliography")
    if style in ("", "p", "ps"):  # a bare {cite} is parenthetical too
        return "(" + "; ".join(refs[k].parenthetical() for k in keys) + ")"
    return "; ".join(refs[k].textual() for k in keys)
