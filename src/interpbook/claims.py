"""Numbers in prose, and the comparisons the prose makes about them, checked.

A chapter quotes a computed number with myst-nb's ``glue`` and the ``{glue:text}`` role.
When a sentence *compares* glued numbers ("the probe beats the baseline", "peaks at layer
{glue}"), the page must also check that comparison, so that a rebuild on another model
fails loudly instead of printing a false sentence. This module keeps the glued values of
the running kernel, and :func:`claim` asserts a comparison between them::

    from interpbook.claims import glue, claim
    glue("r2-best", best)            # shown in prose as {glue:text}`r2-best:.2f`
    glue("r2-embed", embed)
    claim("r2-best", ">", "r2-embed")   # in a hidden cell (tag remove-cell)

``tests/test_prose.py`` finds every sentence with two or more glued numbers and a
comparison word and fails unless a hidden cell on the page claims something about those
keys.
"""

from __future__ import annotations

import math
import operator
from numbers import Real

_VALUES: dict[str, object] = {}

OPS = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne,
}


def glue(key: str, value, display: bool = False):
    """``myst_nb.glue(key, value, display=False)``, remembering the value for :func:`claim`.

    Numpy and torch scalars are stored as plain Python numbers.
    """
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    _VALUES[key] = value
    from myst_nb import glue as nb_glue

    nb_glue(key, value, display=display)
    return value


def value(key_or_number):
    """The glued value under ``key`` (a string), or the number itself."""
    if isinstance(key_or_number, str):
        if key_or_number not in _VALUES:
            known = ", ".join(sorted(_VALUES)) or "none yet"
            raise KeyError(f"claim(): nothing was glued under {key_or_number!r} in this kernel; glued keys: {known}.")
        return _VALUES[key_or_number]
    if isinstance(key_or_number, Real):
        return key_or_number
    raise TypeError(f"claim(): compare glued keys (str) or numbers, not {type(key_or_number).__name__}.")


def claim(a, op: str, b, *, tol: float = 0.0, why: str = "") -> None:
    """Assert ``a op b`` where each side is a glued key or a number.

    ``op`` is one of ``> >= < <= == !=``, or ``"~"`` for "equal within ``tol``" (absolute).
    ``why`` names the sentence the claim backs; it is shown when the claim fails.
    """
    left, right = value(a), value(b)
    if op == "~":
        ok = math.isclose(float(left), float(right), rel_tol=0.0, abs_tol=tol)
    elif op in OPS:
        ok = OPS[op](left, right)
    else:
        raise ValueError(f"claim(): unknown comparison {op!r}; use one of {', '.join(OPS)} or '~'.")
    if not ok:
        what = f"{a!r}={left!r} {op} {b!r}={right!r}" + (f" (tol {tol})" if op == "~" else "")
        raise AssertionError(
            f"The page's prose claims {what}, but the computed values do not satisfy it"
            + (f": {why}" if why else "")
            + ". Rewrite the sentence for this model (or fix the experiment)."
        )


def reset() -> None:
    """Forget every glued value (tests)."""
    _VALUES.clear()
