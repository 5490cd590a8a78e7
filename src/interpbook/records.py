"""Reproduction records: one call turns a computed number into a card and a table row.

A chapter page ends each reproduction with::

    from interpbook import record
    record("IOI logit difference", ours=logit_diff, paper=3.56, units="nats",
           verdict="reproduces", paper_ref="wang2022ioi",
           note="SmolLM2-135M instead of GPT-2 small")

The call displays a *reproduction card* as the cell's rich output. The card's HTML
carries a hidden machine-readable copy of the record (a ``<script
type="application/json" class="interpbook-record">`` element), so the book's Sphinx
extension can collect every record from the executed pages and generate the
Reproductions appendix. Because the record lives in the cell output, it survives the
execution cache: a chapter served from the cache still contributes its rows, and no
number is ever typed into the appendix by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import math
import re
from numbers import Real

VERDICTS = ("reproduces", "partially", "not at this scale")
"""The allowed verdicts, from best to worst."""

HTML_CLASS = "interpbook-record"
"""CSS class of the card and of the embedded JSON script element."""

_SCRIPT_RE = re.compile(
    r'<script type="application/json" class="' + HTML_CLASS + r'">(.*?)</script>',
    re.DOTALL,
)


def _check_value(field: str, value: object) -> float | int | str:
    """Return ``value`` if it is a finite real number or a non-empty string.

    Booleans are refused (``True`` is an ``int`` in Python but never a measurement),
    and numpy/torch scalars are converted to plain Python numbers so the record is
    JSON-serialisable.
    """
    if isinstance(value, bool):
        raise TypeError(f"record(): {field}={value!r} is a bool; give the number itself")
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"record(): {field} must be a single number or a string, got an array-like "
                f"{type(value).__name__}; reduce it to one value first (e.g. .mean())"
            ) from exc
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"record(): {field} is an empty string; give a value")
        return value
    if isinstance(value, Real):
        if not math.isfinite(value):
            raise ValueError(f"record(): {field}={value!r} is not finite")
        return int(value) if isinstance(value, int) else float(value)
    raise TypeError(
        f"record(): {field} must be a number (int/float) or a string, "
        f"got {type(value).__name__}: {value!r}"
    )


@functools.lru_cache(maxsize=1)
def _book_references() -> dict:
    """The book's bibliography when running inside a checkout of the book, else ``{}``."""
    from .citations import load_bibliography
    from .starters import find_book_dir

    try:
        return load_bibliography(find_book_dir() / "references.bib")
    except (FileNotFoundError, ImportError):
        return {}


def cited(key: str) -> str:
    """``"Author et al., year"`` for a citation key of the book, the key itself otherwise."""
    ref = _book_references().get(key)
    return ref.parenthetical() if ref else key


def format_value(value: float | int | str) -> str:
    """Format a recorded value for display: floats to 3 significant digits.

    A float of 100 or more shows as a whole number (``1,234``, not ``1.23e+03``); ints
    and strings are shown as they are.
    """
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


@dataclasses.dataclass(frozen=True)
class Record:
    """One reproduced finding: the paper's value, ours, and a verdict.

    Construct it through :func:`record` in a chapter; build one directly to glue a
    card elsewhere (``glue("ioi-card", Record(...), display=False)``).
    The constructor validates every field and raises ``TypeError``/``ValueError``
    with a message that names the offending argument.
    """

    name: str
    ours: float | int | str
    paper: float | int | str
    units: str = ""
    verdict: str = "reproduces"
    note: str = ""
    paper_ref: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(
                f"record(): name must be a non-empty string naming the finding, got {self.name!r}"
            )
        object.__setattr__(self, "ours", _check_value("ours", self.ours))
        object.__setattr__(self, "paper", _check_value("paper", self.paper))
        if self.verdict not in VERDICTS:
            raise ValueError(
                f"record(): verdict={self.verdict!r} is not one of {', '.join(map(repr, VERDICTS))}"
            )
        for field in ("units", "note", "paper_ref"):
            if not isinstance(getattr(self, field), str):
                raise TypeError(
                    f"record(): {field} must be a string, got {type(getattr(self, field)).__name__}"
                )

    def to_dict(self) -> dict:
        """The record as a JSON-serialisable dict (the embedded machine-readable copy)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        """Rebuild a record from :meth:`to_dict` output (validated again)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown record fields {sorted(unknown)}; expected {sorted(fields)}")
        return cls(**data)

    def _repr_html_(self) -> str:
        esc = html.escape
        units = f" {esc(self.units)}" if self.units else ""
        ref = f" ({esc(cited(self.paper_ref))})" if self.paper_ref else ""
        note = f'<p class="{HTML_CLASS}-note">{esc(self.note)}</p>' if self.note else ""
        verdict_class = self.verdict.replace(" ", "-")
        # Escape "</" (JSON reads "<\\/" back as "</") so no value can close the element.
        payload = json.dumps(self.to_dict(), ensure_ascii=True).replace("</", "<\\/")
        return (
            f'<div class="{HTML_CLASS} verdict-{verdict_class}">'
            f'<p class="{HTML_CLASS}-title">Reproduction: {esc(self.name)}</p>'
            f"<table><tbody>"
            f"<tr><th>paper{ref}</th><td>{esc(format_value(self.paper))}{units}</td></tr>"
            f"<tr><th>ours</th><td>{esc(format_value(self.ours))}{units}</td></tr>"
            f"<tr><th>verdict</th><td><strong>{esc(self.verdict)}</strong></td></tr>"
            f"</tbody></table>{note}"
            f'<script type="application/json" class="{HTML_CLASS}">{payload}</script>'
            f"</div>"
        )

    def __str__(self) -> str:
        units = f" {self.units}" if self.units else ""
        lines = [
            f"Reproduction: {self.name}",
            f"  paper:   {format_value(self.paper)}{units}",
            f"  ours:    {format_value(self.ours)}{units}",
            f"  verdict: {self.verdict}",
        ]
        if self.note:
            lines.append(f"  note:    {self.note}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython's text/plain
        printer.text(str(self))


def record(
    name: str,
    ours: float | int | str,
    paper: float | int | str,
    *,
    units: str = "",
    verdict: str,
    note: str = "",
    paper_ref: str = "",
) -> None:
    """Display a reproduction card for a finding and register it for the appendix.

    Args:
        name: short name of the finding, e.g. ``"IOI logit difference"``.
        ours: the value this book computed (a number or a short string such as
            ``"30/30"``); pass the variable that holds it, never a typed literal.
        paper: the value the paper reports.
        units: units shared by both values (``"nats"``, ``"%"``, ...).
        verdict: one of ``"reproduces"``, ``"partially"``, ``"not at this scale"``.
        note: one sentence on why (model size, data, method differences).
        paper_ref: the paper's citation key in ``book/references.bib``.

    The card is displayed with IPython's ``display`` (text/html with an embedded JSON
    copy, plus text/plain), so call it anywhere in a cell. Outside IPython the text
    form is printed.
    """
    card = Record(name, ours, paper, units=units, verdict=verdict, note=note, paper_ref=paper_ref)
    try:
        from IPython.display import display
    except ImportError:  # plain Python: no rich display available
        print(card)
    else:
        display(card)


def records_in_html(text: str) -> list[Record]:
    """Every record embedded in an HTML string (e.g. a rendered cell output)."""
    return [Record.from_dict(json.loads(m.group(1))) for m in _SCRIPT_RE.finditer(text)]
