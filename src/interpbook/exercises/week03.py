"""Checks for the Week 3 exercises (book chapter ``03-inspecting-representations``).

Each ``check_*`` computes the reference with the package's own implementation
(:mod:`interpbook.lenses`, :mod:`interpbook.patchscopes`, :mod:`interpbook.inversion`) or
a private reference of this module (never under the name the exercise asks the reader to
write) on the reader's model or data, compares, and returns a
:class:`~interpbook.exercises.CheckResult` or raises :class:`~interpbook.exercises.CheckFailed`
naming what differs (and, where it can tell, the usual slip that explains it).
"""

from __future__ import annotations

import numpy as np
import torch

from ..inversion import _token_prf
from ..lenses import logit_lens
from ..patchscopes import IDENTITY_PROMPT, patchscope
from . import CheckFailed, CheckResult, as_array, check_close

__all__ = [
    "check_first_top1_layer", "check_patchscope", "check_token_prf", "check_nearest_neighbour_inversion",
    "check_translate", "check_kl_from_final", "check_fit_translator",
]


# --- Exercise 1: where does the answer appear? --------------------------------------------
def _reference_first_top1_layer(lens_logits: torch.Tensor, token: int) -> int:
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
        got, want = fn(logits, tok), _reference_first_top1_layer(logits, tok)
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
    return CheckResult(ex, f"matches the reference ({answer!r} settles at layer {_reference_first_top1_layer(lens, token)})")


# --- Exercise 2: a patchscope from the tracing primitives ---------------------------------
def check_patchscope(fn, model, source_prompt: str = "The Eiffel Tower is in the city of",
                     layers=None, target_prompt: str = IDENTITY_PROMPT) -> CheckResult:
    """Grade ``fn(model, source_prompt, layer, target_prompt) -> [vocab]`` (next-token
    logits of the target after patching the source's last-token ``resid_post`` at
    ``layer`` into the target's last position at the same layer).

    ``layers`` defaults to one early and one late layer of ``model`` (a tenth and
    two thirds of its depth)."""
    ex = "patchscope"
    if layers is None:
        layers = sorted({round(0.1 * model.n_layers), round(2 * model.n_layers / 3)})
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
        want = _token_prf(pred, ref)
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
def _reference_nearest_neighbour_inversion(train_features: torch.Tensor, train_ids: list[list[int]],
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
    want = _reference_nearest_neighbour_inversion(train, ids, test)
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


# --- Exercise 5: a tuned-lens translator for one layer, step by step -----------------------
def _synthetic_lens_problem(seed: int = 0, n: int = 256, d: int = 16, vocab: int = 48):
    """States ``h``, a decoder (RMS-normalise, then a fixed unembedding) and final logits
    produced by a hidden affine map of ``h``: a translator can be learned exactly."""
    g = torch.Generator().manual_seed(seed)
    W_U = torch.randn(d, vocab, generator=g)
    decode = lambda x: x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() @ W_U
    h = torch.randn(n, d, generator=g)
    M = torch.eye(d) + 0.6 * torch.randn(d, d, generator=g)
    c = 0.5 * torch.randn(d, generator=g)
    return h, decode, decode(h @ M + c)


def _kl(lens_logits, final_logits):
    final = torch.log_softmax(final_logits, -1)
    return (final.exp() * (final - torch.log_softmax(lens_logits, -1))).sum(-1).mean()


def check_translate(fn, seed: int = 0) -> CheckResult:
    """Grade ``fn(h, A, b) -> h + h A + b`` on random ``[n, d]`` states."""
    ex = "translate"
    g = torch.Generator().manual_seed(seed)
    h, A, b = torch.randn(5, 4, generator=g), torch.randn(4, 4, generator=g), torch.randn(4, generator=g)
    got = fn(h, A, b)
    if got is None or got is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
    got = as_array(got, "your translated states")
    if np.allclose(got, as_array(h @ A + b), atol=1e-5):
        raise CheckFailed(f"{ex}: you returned h A + b; the translator adds a *residual* update: h + h A + b "
                          "(so that A = 0, b = 0 is the logit lens).")
    if np.allclose(got, as_array(h + h @ A.T + b), atol=1e-5):
        raise CheckFailed(f"{ex}: you multiplied by A transposed; states are rows, so use h @ A.")
    check_close(ex, got, h + h @ A + b, rtol=1e-5, atol=1e-5)
    return CheckResult(ex, "h + h A + b on random states")


def check_kl_from_final(fn, seed: int = 0) -> CheckResult:
    """Grade ``fn(lens_logits, final_logits) -> scalar``: the mean over rows of
    KL(final || lens) in nats, from logits ``[n, vocab]``."""
    ex = "kl_from_final"
    g = torch.Generator().manual_seed(seed)
    lens, final = 2 * torch.randn(6, 9, generator=g), 2 * torch.randn(6, 9, generator=g)
    got = fn(lens, final)
    if got is None or got is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
    got = float(as_array(got, "your KL").reshape(-1)[0]) if as_array(got).size == 1 else None
    if got is None:
        raise CheckFailed(f"{ex}: return one number, the mean over rows, not one per row.")
    want = float(_kl(lens, final))
    if np.isclose(got, float(_kl(final, lens)), atol=1e-4) and not np.isclose(got, want, atol=1e-4):
        raise CheckFailed(f"{ex}: you computed KL(lens || final); the tuned lens minimises KL(final || lens), "
                          "the expectation under the model's final distribution.")
    if np.isclose(got, want * len(lens), atol=1e-4):
        raise CheckFailed(f"{ex}: you summed over rows; take the mean.")
    if not np.isclose(got, want, atol=1e-4):
        raise CheckFailed(f"{ex}: got {got:.5f}, expected {want:.5f} (use log_softmax on both, "
                          "and weight by the final probabilities).")
    return CheckResult(ex, f"KL(final || lens) = {want:.4f} nats on random logits")


def check_fit_translator(fn, seed: int = 0) -> CheckResult:
    """Grade ``fn(h, final_logits, decode) -> (A, b)`` on a synthetic problem whose final
    logits come from a hidden affine map: on held-out rows the fitted translator must
    remove most of the identity translator's KL."""
    ex = "fit_translator"
    h, decode, final = _synthetic_lens_problem(seed)
    n = len(h) * 3 // 4
    got = fn(h[:n], final[:n], decode)
    if got is None or got is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
    if not (isinstance(got, tuple) and len(got) == 2):
        raise CheckFailed(f"{ex}: return the pair (A, b).")
    A, b = (torch.as_tensor(as_array(x, name), dtype=torch.float32) for x, name in zip(got, ("A", "b")))
    d = h.shape[1]
    if A.shape != (d, d) or b.shape != (d,):
        raise CheckFailed(f"{ex}: A must be [{d}, {d}] and b [{d}]; got {tuple(A.shape)} and {tuple(b.shape)}.")
    held_h, held_final = h[n:], final[n:]
    before = float(_kl(decode(held_h), held_final))
    after = float(_kl(decode(held_h + held_h @ A + b), held_final))
    if not np.isfinite(after):
        raise CheckFailed(f"{ex}: the held-out KL is {after}; check the learning rate.")
    if after > 0.5 * before:
        raise CheckFailed(f"{ex}: held-out KL {after:.3f} nats against {before:.3f} for the identity "
                          "translator; a trained translator should remove most of it (train longer, "
                          "check the sign of the loss, and that A and b require gradients).")
    return CheckResult(ex, f"held-out KL {before:.3f} -> {after:.3f} nats on a synthetic problem")
