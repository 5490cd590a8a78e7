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

__all__ = ["check_induction_score", "check_ov_map", "check_k_composition", "check_name_copying_head"]


def _answer(ex: str, value: object, name: str = "your answer") -> np.ndarray:
    if value is None or value is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {value!r}); replace the `...`")
    return as_array(value, name)


def _same(a: np.ndarray, b, rtol=1e-4, atol=1e-5) -> bool:
    b = as_array(b)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=atol))


# --- Exercise 1: the induction score ------------------------------------------------------
def check_induction_score(induction_score: Callable, model=None) -> CheckResult:
    """Exercise 1: ``induction_score(pattern [batch, head, q, k], period) -> [head]``.

    Graded on hand-built patterns (a perfect induction head, a previous-token head, a
    duplicate-token head) and, when ``model`` is given, on the model's own patterns."""
    ex = "Exercise 1 (induction score)"
    if not callable(induction_score):
        raise CheckFailed(f"{ex}: pass your function itself, e.g. check_induction_score(induction_score)")
    n, period = 10, 5
    q = torch.arange(period, n)
    pats = torch.zeros(1, 3, n, n)
    pats[0, :, 0, 0] = 1.0
    pats[0, 0, q, q - period + 1] = 1.0                 # induction
    pats[0, 1, torch.arange(1, n), torch.arange(0, n - 1)] = 1.0   # previous token
    pats[0, 2, q, q - period] = 1.0                     # duplicate token
    got = _answer(ex, induction_score(pats, period))
    want = H.induction_score(pats, period)
    if got.shape != tuple(want.shape):
        raise CheckFailed(f"{ex}: return one score per head, shape {tuple(want.shape)}; got {got.shape} "
                          "(average over the batch and the query positions)")
    if _same(got, [0.0, 0.0, 1.0]):
        raise CheckFailed(f"{ex}: you measured attention to the earlier occurrence of the same token "
                          "(q - period): that is the duplicate-token score; an induction head attends to "
                          "the token *after* it, q - period + 1")
    if got[0] < 0.99 and got[1] > 0:
        raise CheckFailed(f"{ex}: a perfect induction head should score 1 and a previous-token head 0; "
                          f"yours gives {got[0]:.3g} and {got[1]:.3g}. Check the diagonal offset and "
                          "that only queries in the repeat (q >= period) count")
    check_close(ex, got, want, atol=1e-5)
    if model is not None:
        ids = H.repeated_tokens(model, 2, 12, seed=3)
        run = model.run(ids, cache=[("attn_pattern", model.n_layers // 2)])
        p = run.cache["attn_pattern", model.n_layers // 2]
        check_close(ex + " on the model's patterns", _answer(ex, induction_score(p, 12)),
                    H.induction_score(p, 12), rtol=1e-4, atol=1e-5)
    return CheckResult(ex, "perfect induction head 1, previous-token and duplicate heads 0"
                       + (", and the model's patterns match" if model is not None else ""))


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
        "(interpbook.heads.norm_gain)": H.composition_scores(model, [sender], [receiver], kind="k", fold_norm=False)[0, 0],
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
