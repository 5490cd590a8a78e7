"""Grading helpers for the exercises: each chapter's ``check_*`` functions build on these.

A ``check_*`` function compares a reader's answer with the reference computed on the same
model. It returns a :class:`CheckResult` (shown as a one-line "correct" message) when the
answer is right, and raises :class:`CheckFailed` with a message that says what differs
when it is not, so a wrong answer can never pass silently (also not in the book build,
where the solution cells call the same checks).
"""

from __future__ import annotations

import dataclasses

import numpy as np


class CheckFailed(AssertionError):
    """A reader's answer does not match the reference; the message says how."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """A passed check: which exercise and what was verified."""

    exercise: str
    message: str

    def __str__(self) -> str:
        return f"\u2713 {self.exercise}: {self.message}"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


def as_array(value: object, name: str = "value") -> np.ndarray:
    """``value`` (tensor, array, number or nested list) as a float64 numpy array."""
    if hasattr(value, "detach"):  # torch tensor, any dtype or device
        value = value.detach().float().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CheckFailed(
            f"{name} must be numeric (a tensor, array or number), got {type(value).__name__}"
        ) from exc


def check_close(
    exercise: str,
    actual: object,
    expected: object,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> CheckResult:
    """Check that ``actual`` has the shape of ``expected`` and matches it elementwise.

    Raises :class:`CheckFailed` naming the shape mismatch, a NaN, or the largest
    difference and where it is.
    """
    if actual is None or actual is Ellipsis:
        raise CheckFailed(f"{exercise}: no answer yet (got {actual!r}); replace the `...`")
    got, want = as_array(actual, "your answer"), as_array(expected, "the reference")
    if got.shape != want.shape:
        raise CheckFailed(
            f"{exercise}: your answer has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        )
    if np.isnan(got).any():
        raise CheckFailed(f"{exercise}: your answer contains NaN at {np.argwhere(np.isnan(got))[0].tolist()}")
    if not np.allclose(got, want, rtol=rtol, atol=atol):
        diff = np.abs(got - want)
        where = np.unravel_index(int(diff.argmax()), diff.shape)
        raise CheckFailed(
            f"{exercise}: largest difference {diff.max():.4g} at index {list(map(int, where))} "
            f"(yours {got[where]:.6g}, expected {want[where]:.6g}; tolerance rtol={rtol}, atol={atol})"
        )
    return CheckResult(exercise, f"matches the reference (shape {tuple(want.shape)})")
