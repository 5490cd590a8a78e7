"""Checks for the Week 13 exercises (book chapter ``13-projects``, page *Exercises*).

Three habits of the reproducibility checklist, each as a small function a project needs:
the known-answer test with leading-space tokens, a bootstrap interval to report with n,
and norm-matched random vectors for a control.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..factual.facts import Fact, object_token
from . import CheckFailed, CheckResult, as_array

__all__ = ["check_answered", "check_bootstrap_interval", "check_norm_matched"]


# --- Exercise 1: does the model answer? ----------------------------------------------------
def _answered(model, prompts: Sequence[str], answers: Sequence[int]) -> np.ndarray:
    with torch.no_grad():
        top = model.logits(list(prompts)).argmax(-1)
    return (top == torch.as_tensor(list(answers), device=top.device)).cpu().numpy()


def check_answered(answered: Callable, model, facts: Sequence[Fact]) -> CheckResult:
    """``answered(model, prompts, targets) -> bool array``: whether the first token of each
    target, with its leading space, is the model's top next token after its prompt; checked
    on the facts' main prompts and on each paraphrase template."""
    ex = "Exercise 1 (does the model answer?)"
    facts = list(facts)
    if not facts:
        raise ValueError("check_answered needs at least one fact.")
    targets = [f.target for f in facts]
    with_space = [object_token(model.tokenizer, t) for t in targets]
    without_space = [model.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in targets]
    for k, prompts in enumerate([[f.prompt for f in facts]] + [[f.paraphrase_prompts[i] for f in facts]
                                                               for i in range(len(facts[0].paraphrases))]):
        out = answered(model, prompts, targets)
        if out is None or out is Ellipsis:
            raise CheckFailed(f"{ex}: return one True/False per prompt; got {out!r}")
        got = as_array(out, "answered").astype(bool).reshape(-1)
        ref = _answered(model, prompts, with_space)
        if got.shape != ref.shape:
            raise CheckFailed(f"{ex}: {len(prompts)} prompts need {len(prompts)} answers; got shape {got.shape}")
        if not np.array_equal(got, ref):
            where = "main prompts" if k == 0 else f"paraphrase {k}"
            if np.array_equal(got, _answered(model, prompts, without_space)):
                raise CheckFailed(f"{ex}: on the {where} your answers match the tokens *without* a leading space; "
                                  "after 'is' the model predicts ' Paris', a different token from 'Paris'")
            raise CheckFailed(f"{ex}: on the {where} {int((got != ref).sum())} of {len(ref)} answers differ from "
                              "the reference (top-1 next token == first token of ' ' + target)")
    return CheckResult(ex, f"matches the reference on {len(facts)} facts, main prompt and paraphrases")


# --- Exercise 2: a bootstrap interval ----------------------------------------------------------
def _percentile_bootstrap(values: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def check_bootstrap_interval(bootstrap_interval: Callable) -> CheckResult:
    """``bootstrap_interval(values, n_boot=2000, level=0.95, seed=0) -> (low, high)``: the
    percentile bootstrap interval of the mean. Random resampling differs between correct
    answers, so the check compares with a reference of many resamples within a tolerance,
    and checks that the interval narrows like 1/sqrt(n)."""
    ex = "Exercise 2 (a bootstrap interval)"
    rng = np.random.default_rng(0)
    widths = {}
    for n in (40, 160):
        values = (rng.random(n) < 0.6).astype(float)
        out = bootstrap_interval(values, n_boot=2000, level=0.95, seed=1)
        if out is None or out is Ellipsis or not isinstance(out, (tuple, list)) or len(out) != 2:
            raise CheckFailed(f"{ex}: return a pair (low, high); got {type(out).__name__}")
        low, high = (float(as_array(v, "bound")) for v in out)
        ref_low, ref_high = _percentile_bootstrap(values, 20000, 0.95, 2)
        sd = values.std() / np.sqrt(n)
        if not low <= values.mean() <= high:
            raise CheckFailed(f"{ex}: with n={n} the interval ({low:.3f}, {high:.3f}) does not contain the mean "
                              f"{values.mean():.3f}")
        if high - low > 3 * (ref_high - ref_low):
            raise CheckFailed(f"{ex}: with n={n} the interval is {high - low:.3f} wide, the reference "
                              f"{ref_high - ref_low:.3f}: resample the values and take quantiles of the *means* "
                              "of the resamples, not of the values")
        if abs(low - ref_low) > 0.5 * sd or abs(high - ref_high) > 0.5 * sd:
            raise CheckFailed(f"{ex}: with n={n} you give ({low:.3f}, {high:.3f}), the reference "
                              f"({ref_low:.3f}, {ref_high:.3f}): use the (1 - level)/2 and (1 + level)/2 quantiles")
        widths[n] = high - low
    ratio = widths[160] / widths[40]
    if not 0.35 < ratio < 0.65:
        raise CheckFailed(f"{ex}: four times the data should halve the width; yours changes by x{ratio:.2f}")
    return CheckResult(ex, "contains the mean, matches the reference quantiles and narrows like 1/sqrt(n)")


# --- Exercise 3: norm-matched random vectors ---------------------------------------------------
def check_norm_matched(norm_matched: Callable) -> CheckResult:
    """``norm_matched(diff [batch, d], seed) -> [batch, d]``: random directions with each row's
    norm equal to that row of ``diff``, the same for the same seed."""
    ex = "Exercise 3 (norm-matched random vectors)"
    diff = torch.randn(6, 256, generator=torch.Generator().manual_seed(12345)) * torch.arange(1, 7)[:, None]
    out = norm_matched(diff.clone(), seed=0)
    if out is None or out is Ellipsis:
        raise CheckFailed(f"{ex}: return a tensor shaped like diff; got {out!r}")
    out = torch.as_tensor(as_array(out, "vectors"), dtype=torch.float64)
    if tuple(out.shape) != tuple(diff.shape):
        raise CheckFailed(f"{ex}: diff is {tuple(diff.shape)}, the vectors are {tuple(out.shape)}")
    norms, want = out.norm(dim=-1), diff.double().norm(dim=-1)
    if not torch.allclose(norms, want, rtol=1e-4):
        raise CheckFailed(f"{ex}: row norms {norms.numpy().round(2)} should equal diff's {want.numpy().round(2)} "
                          "(normalise each random row, then scale it by that row's norm)")
    cos = torch.nn.functional.cosine_similarity(out, diff.double(), dim=-1).abs()
    if float(cos.max()) > 0.5:
        raise CheckFailed(f"{ex}: a row points along diff (|cos| up to {float(cos.max()):.2f}): the control must "
                          "be a random direction, not diff itself")
    again = torch.as_tensor(as_array(norm_matched(diff.clone(), seed=0), "vectors"), dtype=torch.float64)
    other = torch.as_tensor(as_array(norm_matched(diff.clone(), seed=1), "vectors"), dtype=torch.float64)
    if not torch.allclose(again, out):
        raise CheckFailed(f"{ex}: the same seed gave different vectors: draw from a generator seeded with `seed`")
    if torch.allclose(other, out):
        raise CheckFailed(f"{ex}: seeds 0 and 1 gave the same vectors: the seed must choose the draw")
    return CheckResult(ex, "norms match row by row, directions are random and reproducible by seed")
