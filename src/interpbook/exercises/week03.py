"""Checks for the Week 3 exercises (book chapter ``03-inspecting-representations``).

Each ``check_*`` computes the reference with the package's own implementation
(:mod:`interpbook.lenses`, :mod:`interpbook.patchscopes`, :mod:`interpbook.inversion`) on
the reader's model or data, compares, and returns a
:class:`~interpbook.exercises.CheckResult` or raises :class:`~interpbook.exercises.CheckFailed`
naming what differs (and, where it can tell, the usual slip that explains it).
"""

from __future__ import annotations

import numpy as np
import torch

from ..inversion import token_prf
from ..lenses import logit_lens
from ..patchscopes import IDENTITY_PROMPT, patchscope
from . import CheckFailed, CheckResult, as_array, check_close

__all__ = [
    "first_top1_layer", "check_first_top1_layer", "check_patchscope", "check_token_prf",
    "nearest_neighbour_inversion", "check_nearest_neighbour_inversion",
]


# --- Exercise 1: where does the answer appear? --------------------------------------------
def first_top1_layer(lens_logits: torch.Tensor, token: int) -> int:
    """Reference: the first layer from which ``token`` is the top-1 token at every later
    layer (``lens_logits [layer, vocab]``), or ``-1`` when it is not top-1 at the last layer."""
    top = lens_logits.argmax(-1)
    if int(top[-1]) != token:
        return -1
    layer = len(top) - 1
    while layer > 0 and int(top[layer - 1]) == token:
        layer -= 1
    return layer


def check_first_top1_layer(fn, model, prompt: str = "The capital of France is", answer: str = " Paris") -> CheckResult:
    """Grade ``fn(lens_logits, token) -> int`` on the logit lens of ``prompt``, and on two
    hand-made cases where the answer flickers in and out of first place."""
    ex = "first_top1_layer"
    token = model.token_id(answer)
    lens = logit_lens(model, prompt)[:, 0]
    cases = [(lens, token)]
    v = 5
    flicker = torch.zeros(6, v)
    for layer, best in enumerate([1, 2, 2, 4, 2, 2]):
        flicker[layer, best] = 1.0
    cases += [(flicker, 2), (flicker, 4)]
    for logits, tok in cases:
        got, want = fn(logits, tok), first_top1_layer(logits, tok)
        if got is None or got is Ellipsis:
            raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
        if int(got) != want:
            hint = ""
            top = logits.argmax(-1)
            first_any = next((l for l, t in enumerate(top.tolist()) if t == tok), -1)
            if int(got) == first_any and first_any != want:
                hint = (" You returned the first layer where it is top-1 at all; the answer must"
                        " stay top-1 at every later layer.")
            raise CheckFailed(f"{ex}: for top-1 tokens {top.tolist()} and token {tok} you returned"
                              f" {int(got)}, expected {want}.{hint}")
    return CheckResult(ex, f"matches the reference ({answer!r} settles at layer {first_top1_layer(lens, token)})")


# --- Exercise 2: a patchscope from the tracing primitives ---------------------------------
def check_patchscope(fn, model, source_prompt: str = "The Eiffel Tower is in the city of",
                     layers=(2, 20), target_prompt: str = IDENTITY_PROMPT) -> CheckResult:
    """Grade ``fn(model, source_prompt, layer, target_prompt) -> [vocab]`` (next-token
    logits of the target after patching the source's last-token ``resid_post`` at
    ``layer`` into the target's last position at the same layer)."""
    ex = "patchscope"
    for layer in layers:
        got = fn(model, source_prompt, layer, target_prompt)
        want = patchscope(model, source_prompt, layer, -1, target_prompt)
        if got is None or got is Ellipsis:
            raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
        got_a = as_array(got, "your logits").reshape(-1)
        if got_a.shape != (model.d_vocab,):
            raise CheckFailed(f"{ex}: return the next-token logits [vocab] = [{model.d_vocab}], got shape {tuple(as_array(got).shape)}")
        try:
            check_close(ex, got_a, want, rtol=1e-3, atol=1e-3)
        except CheckFailed as err:
            for other, slip in [(layer - 1, "one layer too early (resid_pre instead of resid_post?)"),
                                (layer + 1, "one layer too late")]:
                if 0 <= other < model.n_layers and np.allclose(got_a, as_array(patchscope(
                        model, source_prompt, layer, -1, target_prompt, target_layer=other)), atol=1e-3):
                    raise CheckFailed(f"{ex}: at layer {layer} your patch lands {slip}.") from err
            clean = as_array(model.run(target_prompt).last_logits[0])
            if np.allclose(got_a, clean, atol=1e-3):
                raise CheckFailed(f"{ex}: at layer {layer} your logits are the unpatched target's: "
                                  "the patch did not take effect (is the edit inside the forward pass?)") from err
            raise CheckFailed(f"{err} (layer {layer})") from err
    return CheckResult(ex, f"matches interpbook.patchscopes.patchscope at layers {list(layers)}")


# --- Exercise 3: token precision / recall / F1 --------------------------------------------
def check_token_prf(fn) -> CheckResult:
    """Grade ``fn(predicted_ids, reference_ids) -> (precision, recall, f1)`` (fractions)."""
    ex = "token_prf"
    cases = [([1, 2, 3], [1, 2, 3]), ([1, 2, 4, 5], [1, 2, 3]), ([7, 7, 7], [7, 8]), ([7, 7], [7, 7, 8]),
             ([], [1, 2]), ([3, 1], [1, 3]), ([5, 6], [1, 2])]
    for pred, ref in cases:
        got = fn(list(pred), list(ref))
        if got is None or got is Ellipsis:
            raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
        want = token_prf(pred, ref)
        got_a = as_array(got, "your (precision, recall, f1)")
        if got_a.shape != (3,):
            raise CheckFailed(f"{ex}: return three numbers (precision, recall, f1); got shape {tuple(got_a.shape)}")
        if not np.allclose(got_a, want, atol=1e-6):
            hint = ""
            if (pred == [7, 7, 7] and np.isclose(got_a[0], 1.0)) or (pred == [7, 7] and np.isclose(got_a[0], 0.5)):
                hint = (" Count overlaps as a multiset: a token matches as many times as it occurs in both"
                        " lists (min of the two counts), not once and not every time it is predicted.")
            elif np.allclose(got_a / 100, want, atol=1e-4):
                hint = " Return fractions in [0, 1], not percentages."
            raise CheckFailed(f"{ex}: for predicted {pred} and reference {ref} you returned "
                              f"{tuple(np.round(got_a, 4))}, expected {tuple(np.round(want, 4))}.{hint}")
    return CheckResult(ex, f"matches the reference on {len(cases)} cases (multisets, empty predictions)")


# --- Exercise 4: a nearest-neighbour inversion baseline ---------------------------------------
def nearest_neighbour_inversion(train_features: torch.Tensor, train_ids: list[list[int]],
                                test_features: torch.Tensor) -> list[list[int]]:
    """Reference: for each test row, the token ids of the training prompt whose feature
    vector has the highest cosine similarity."""
    a = torch.nn.functional.normalize(torch.as_tensor(train_features, dtype=torch.float32), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(test_features, dtype=torch.float32), dim=-1)
    return [list(train_ids[i]) for i in (b @ a.T).argmax(-1).tolist()]


def check_nearest_neighbour_inversion(fn, seed: int = 0) -> CheckResult:
    """Grade ``fn(train_features, train_ids, test_features) -> list of id lists`` on random
    features where Euclidean and cosine neighbours disagree."""
    ex = "nearest_neighbour_inversion"
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(40, 16, generator=g) * torch.rand(40, 1, generator=g).mul(5).add(0.1)
    ids = [[i, i + 100] for i in range(40)]
    test = torch.randn(25, 16, generator=g)
    got = fn(train, ids, test)
    if got is None or got is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
    want = nearest_neighbour_inversion(train, ids, test)
    got = [list(map(int, p)) for p in got]
    if len(got) != len(want):
        raise CheckFailed(f"{ex}: return one prediction per test row ({len(want)}), got {len(got)}")
    wrong = [i for i, (p, q) in enumerate(zip(got, want)) if p != q]
    if wrong:
        d = torch.cdist(test, train).argmin(-1).tolist()
        euclid = [ids[j] for j in d]
        hint = " These are Euclidean neighbours; use cosine similarity." if got == euclid else ""
        raise CheckFailed(f"{ex}: {len(wrong)} of {len(want)} rows differ (first: row {wrong[0]}, "
                          f"yours {got[wrong[0]]}, expected {want[wrong[0]]}).{hint}")
    return CheckResult(ex, f"all {len(want)} nearest neighbours match")
