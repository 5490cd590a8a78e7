"""Checks for the Week 4 exercises (book chapter ``04-attention-heads``, page *Exercises*).

Each ``check_*`` computes the reference with :mod:`interpbook.heads` on the reader's own
model, compares, and returns a :class:`~interpbook.exercises.CheckResult` or raises
:class:`~interpbook.exercises.CheckFailed`; when an answer is wrong it also tries the usual
slips (an off-by-one diagonal, forgotten norms, the wrong side of the composition) and
names the one that reproduces the reader's answer.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .. import heads as H
from . import CheckFailed, CheckResult, as_array, check_close

__all__ = ["check_prefix_matching", "check_induction_head_map", "check_repeat_loss",
           "check_ov_map", "check_k_composition", "check_name_copying_head"]


def _answer(ex: str, value: object, name: str = "your answer") -> np.ndarray:
    if value is None or value is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {value!r}); replace the `...`")
    return as_array(value, name)


def _same(a: np.ndarray, b, rtol=1e-4, atol=1e-5) -> bool:
    b = as_array(b)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=atol))


# --- Exercise 1: induction heads from scratch ------------------------------------------------
def _reference_prefix_matching(pattern: torch.Tensor, period: int, start: int) -> torch.Tensor:
    """Mean attention from each query q >= start to key q - period + 1, per head."""
    q = torch.arange(start, pattern.shape[-1])
    return pattern[:, :, q, q - period + 1].float().mean(dim=(0, 2))


def _toy_patterns(n: int = 11, period: int = 5, start: int = 6) -> torch.Tensor:
    """Hand-built patterns [1, 3, n, n] with a BOS-like prefix of one token: a perfect
    induction head, a previous-token head and a duplicate-token head."""
    q = torch.arange(start, n)
    pats = torch.zeros(1, 3, n, n)
    pats[0, :, :, 0] = 1.0                                         # everything else rests on the first token
    for h, offset in [(0, period - 1), (2, period)]:
        pats[0, h, q, 0] = 0.0
        pats[0, h, q, q - offset] = 1.0
    pats[0, 1, :, 0] = 0.0
    pats[0, 1, 0, 0] = 1.0
    pats[0, 1, torch.arange(1, n), torch.arange(0, n - 1)] = 1.0
    return pats


def check_prefix_matching(prefix_matching_score: Callable) -> CheckResult:
    """Exercise 1a: ``prefix_matching_score(pattern [batch, head, q, k], period, start) -> [head]``,
    graded on hand-built patterns (a perfect induction head, a previous-token head, a
    duplicate-token head) whose repeat starts one position late, as after a BOS token."""
    ex = "Exercise 1a (prefix-matching score)"
    if not callable(prefix_matching_score):
        raise CheckFailed(f"{ex}: pass your function itself, e.g. check_prefix_matching(prefix_matching_score)")
    n, period, start = 11, 5, 6
    pats = _toy_patterns(n, period, start)
    got = _answer(ex, prefix_matching_score(pats, period, start))
    want = _reference_prefix_matching(pats, period, start)
    if got.shape != tuple(want.shape):
        raise CheckFailed(f"{ex}: return one score per head, shape {tuple(want.shape)}; got {got.shape} "
                          "(average over the batch and the query positions)")
    if _same(got, [0.0, 0.0, 1.0]):
        raise CheckFailed(f"{ex}: you measured attention to the earlier occurrence of the same token "
                          "(q - period): that is the duplicate-token score; an induction head attends to "
                          "the token *after* it, q - period + 1")
    if got[0] < 0.99:
        raise CheckFailed(f"{ex}: a perfect induction head should score 1; yours gives {got[0]:.3g}. Check the "
                          "diagonal offset (q - period + 1) and that only queries q >= start count")
    check_close(ex, got, want, atol=1e-5)
    return CheckResult(ex, "perfect induction head 1, previous-token and duplicate-token heads 0")


def _reference_head_map(model, ids: torch.Tensor, period: int, start: int | None = None) -> torch.Tensor:
    start = ids.shape[1] - period if start is None else start
    run = model.run(ids, cache="attn_pattern")
    return torch.stack([_reference_prefix_matching(run.cache["attn_pattern", l], period, start)
                        for l in range(model.n_layers)])


def check_induction_head_map(induction_head_map: Callable, model) -> CheckResult:
    """Exercise 1b: ``induction_head_map(model, ids, period) -> [layer, head]`` on the
    model's own attention patterns for repeated random tokens."""
    ex = "Exercise 1b (induction-head map)"
    ids = H.repeated_tokens(model, 2, 12, seed=3)
    got = _answer(ex, induction_head_map(model, ids, 12))
    want = _reference_head_map(model, ids, 12)
    if got.shape != tuple(want.shape):
        raise CheckFailed(f"{ex}: expected one score per layer and head, shape {tuple(want.shape)}; got {got.shape}")
    if len(H.bos_prefix(model)) and _same(got, _reference_head_map(model, ids, 12, start=12)):
        raise CheckFailed(f"{ex}: this model puts a BOS token in front, so the repeat starts at "
                          "ids.shape[1] - period, not at period")
    check_close(ex, got, want, rtol=1e-4, atol=1e-5)
    top = H.top_heads(want, 1)[0]
    return CheckResult(ex, f"matches; the top induction head is {top[0]}.{top[1]} ({float(want[top]):.2f})")


def _reference_repeat_loss(model, ids, period, heads) -> float:
    run = model.run(ids, edits=H.ablate_heads(list(heads), pos=None) if heads else [])
    loss = H.token_losses(run.logits, run.input_ids)
    return float(loss[:, ids.shape[1] - period:].mean())


def check_repeat_loss(repeat_loss: Callable, model) -> CheckResult:
    """Exercise 1c: ``repeat_loss(model, ids, period, heads) -> float``, the mean next-token
    loss on the repeated half with ``heads`` zero-ablated at every position."""
    ex = "Exercise 1c (loss on the repeat, heads ablated)"
    ids = H.repeated_tokens(model, 2, 12, seed=4)
    heads = H.top_heads(_reference_head_map(model, ids, 12), 2)
    for hs in ([], heads):
        got = float(_answer(ex, repeat_loss(model, ids, 12, hs)).reshape(-1)[0])
        want = _reference_repeat_loss(model, ids, 12, hs)
        if abs(got - want) > 1e-3 * max(1.0, abs(want)):
            whole = model.run(ids, edits=H.ablate_heads(hs, pos=None) if hs else [])
            every = float(H.token_losses(whole.logits, whole.input_ids).mean())
            hint = (" (that is the loss over the whole sequence: keep only the predictions made "
                    "inside the repeat, from position ids.shape[1] - period on)") if abs(got - every) < 1e-3 * max(1.0, every) else ""
            what = "clean" if not hs else f"with heads {hs} ablated"
            raise CheckFailed(f"{ex}: {what}, got {got:.4f}, expected {want:.4f}{hint}")
    return CheckResult(ex, f"matches (clean and with {heads} ablated)")


# --- Exercise 2: a head's OV map on a token subset ------------------------------------------
def check_ov_map(model, layer: int, head: int, src_ids, tgt_ids, answer) -> CheckResult:
    """Exercise 2: the logits ``[n_src, n_tgt]`` head ``(layer, head)``'s OV circuit writes
    for each source token, restricted to the target tokens, with the input norm and the
    final norm applied (no first-MLP step)."""
    ex = f"Exercise 2 (OV map of head {layer}.{head})"
    got = _answer(ex, answer)
    src = torch.as_tensor(src_ids)
    uni = torch.as_tensor(tgt_ids)
    ref = H.ov_logits(model, layer, head, src, universe=uni, first_mlp=False)
    if got.shape != tuple(ref.shape):
        full = (len(src), model.d_vocab)
        hint = " (that is the whole vocabulary: keep only the target columns)" if got.shape == full else ""
        raise CheckFailed(f"{ex}: expected shape {tuple(ref.shape)} = [n_src, n_tgt], got {got.shape}{hint}")
    tol = dict(rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    variants = {
        "both norms are missing: the head reads ln1(e) and the logits come from final_norm(o) @ W_U":
            H.ov_logits(model, layer, head, src, universe=uni, first_mlp=False, fold_norms=False),
        "you added the first MLP's output to the embedding; this exercise uses the bare embedding":
            H.ov_logits(model, layer, head, src, universe=uni, first_mlp=True),
    }
    for msg, v in variants.items():
        if _same(got, v, **tol) and not _same(got, ref, **tol):
            raise CheckFailed(f"{ex}: {msg}")
    a = model.anatomy
    with torch.no_grad():
        x = H.source_inputs(model, src, first_mlp=False)
        o = a.ln1(layer)(x) @ a.W_V(layer)[head] @ a.W_O(layer)[head]
        no_final = o @ a.W_U[:, uni]
    if _same(got, no_final, **tol):
        raise CheckFailed(f"{ex}: apply the final norm to the head's output before W_U "
                          "(model.anatomy.final_norm()), as the model does before unembedding")
    check_close(ex, got, ref, **tol)
    top = [model.tokenizer.decode([int(uni[i])]) for i in ref.argmax(-1)[:3]]
    return CheckResult(ex, f"matches; the top targets of the first sources are {top}")


# --- Exercise 3: K-composition -------------------------------------------------------------
def check_k_composition(model, sender: tuple[int, int], receiver: tuple[int, int], answer) -> CheckResult:
    """Exercise 3: the K-composition score of ``sender``'s OV circuit with ``receiver``'s QK
    circuit, with the input norms' gains folded in."""
    ex = f"Exercise 3 (K-composition {sender[0]}.{sender[1]} -> {receiver[0]}.{receiver[1]})"
    got = float(_answer(ex, answer).reshape(-1)[0]) if _answer(ex, answer).size == 1 else None
    if got is None:
        raise CheckFailed(f"{ex}: the score is one number (a float)")
    ref = float(H.composition_scores(model, [sender], [receiver], kind="k")[0, 0])
    if abs(got - ref) <= 1e-4 * max(1.0, abs(ref)):
        return CheckResult(ex, f"{got:.4f} matches")
    variants = {
        "that is the Q-composition (sender output read at the query): K-composition is "
        "||W_QK W_OV^T|| / (||W_QK|| ||W_OV||)": H.composition_scores(model, [sender], [receiver], kind="q")[0, 0],
        "that is the V-composition; use the receiver's QK circuit": H.composition_scores(model, [sender], [receiver], kind="v")[0, 0],
        "the norm gains are not folded in: multiply the rows of W_V, W_Q and W_K by ln1's gain "
        "(model.anatomy.norm_gain(a.ln1(layer))) and the columns of W_O by the post-attention norm's gain": H.composition_scores(model, [sender], [receiver], kind="k", fold_norm=False)[0, 0],
    }
    for msg, v in variants.items():
        if abs(got - float(v)) <= 1e-4 * max(1.0, abs(float(v))):
            raise CheckFailed(f"{ex}: {msg}")
    if not 0 <= got <= 1:
        raise CheckFailed(f"{ex}: a composition score lies in [0, 1]; got {got:.4g}. Divide by both "
                          "Frobenius norms")
    raise CheckFailed(f"{ex}: got {got:.5g}, expected {ref:.5g}")


# --- Exercise 4: the name-copying head -----------------------------------------------------
def check_name_copying_head(model, src_ids, answer, *, k: int = 1, universe=None) -> CheckResult:
    """Exercise 4: the ``(layer, head)`` whose OV circuit most often maps a first name to
    itself (MAPS relation score for name copying, top-``k``)."""
    ex = "Exercise 4 (name-copying head)"
    if answer is None or answer is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet; give a (layer, head) pair")
    try:
        layer, head = (int(x) for x in answer)
    except (TypeError, ValueError):
        raise CheckFailed(f"{ex}: give a (layer, head) pair of ints, got {answer!r}") from None
    src = torch.as_tensor(src_ids)
    sc = H.relation_scores(model, src, src, k=k, universe=universe)["relation"]
    best = H.top_heads(sc, 3)
    if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
        raise CheckFailed(f"{ex}: ({layer}, {head}) is not a head of this model")
    mine, top = float(sc[layer, head]), float(sc[best[0]])
    if mine >= top - 1e-6:
        return CheckResult(ex, f"head {layer}.{head} copies {mine:.0%} of the names (the best score)")
    if (layer, head) in best:
        return CheckResult(ex, f"head {layer}.{head} ({mine:.0%}) is among the top 3; the best is "
                               f"{best[0][0]}.{best[0][1]} with {top:.0%}")
    raise CheckFailed(f"{ex}: head {layer}.{head} scores {mine:.0%}; the best scores {top:.0%}. "
                      "Take the argmax over all layers and heads of the relation score")
