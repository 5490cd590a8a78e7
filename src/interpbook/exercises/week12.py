"""Checks for the Week 12 exercises (book chapter ``12-training-dynamics``, page *Exercises*).

Exercise 1 builds the previous-token score from an attention pattern and applies it to
every checkpoint of a training run. Exercise 2 clamps a head's attention to the ideal
previous-token pattern during a forward pass, from the head's values. Exercise 3 scores
heads by their attention from each query to the label of its twin. Expected values come
from private references here, written from the cached patterns and the values of the run,
never from a public function with the name the reader writes; they work on any toy model
of :mod:`interpbook.toy`, whatever its width, depth or number of heads.
"""

from __future__ import annotations

import torch

from . import CheckFailed, CheckResult, as_array, check_close

__all__ = ["check_diagonal_attention", "check_previous_token_curve", "check_ideal_previous_pattern",
           "check_clamped_logits", "check_label_attention"]


def _missing(ex: str, answer: object, what: str) -> None:
    if answer is None or answer is Ellipsis:
        raise CheckFailed(f"{ex}: no {what} yet; replace the `...`")


def _reference_diagonal(pattern: torch.Tensor) -> torch.Tensor:
    """Mean over batch and queries q >= 1 of pattern[..., q, q - 1], per head."""
    T = pattern.shape[-1]
    q = torch.arange(1, T)
    return pattern[:, :, q, q - 1].mean(dim=(0, 2))


def check_diagonal_attention(diagonal_attention, pattern: torch.Tensor) -> CheckResult:
    """Exercise 1a: ``diagonal_attention(pattern)`` is each head's mean attention from a
    position to the one before it ``[head]``, for ``pattern [batch, head, query, key]``."""
    ex = "Exercise 1a (previous-token score of a pattern)"
    _missing(ex, diagonal_attention, "function")
    got = as_array(diagonal_attention(pattern), "your answer")
    want = _reference_diagonal(pattern)
    if got.shape == (pattern.shape[-1] - 1,) or got.shape == tuple(pattern.shape[:2]):
        raise CheckFailed(f"{ex}: your answer has shape {got.shape}; average over the batch and the queries, "
                          f"keeping one number per head ({pattern.shape[1]}).")
    if got.shape == want.shape and abs(float(got.mean()) - float(pattern.diagonal(dim1=-2, dim2=-1).mean())) < 1e-6:
        raise CheckFailed(f"{ex}: that is the attention to the same position (the main diagonal); the previous "
                          "token is one step below it, key = query - 1.")
    return check_close(ex, got, want)


def check_previous_token_curve(previous_token_curve, spec, run, layer: int = 0) -> CheckResult:
    """Exercise 1b: ``previous_token_curve(spec, run, layer)`` is ``[checkpoint, head]``, each
    head's previous-token score on the run's held-out batch at every checkpoint. Checked
    against the scores the training run stored."""
    ex = "Exercise 1b (previous-token score over checkpoints)"
    _missing(ex, previous_token_curve, "function")
    want = run["prev"][:, layer]
    got = as_array(previous_token_curve(spec, run, layer), "your answer")
    if got.shape != tuple(want.shape) and got.shape == tuple(want.shape[::-1]):
        raise CheckFailed(f"{ex}: your answer is [head, checkpoint] {got.shape}; return [checkpoint, head].")
    return check_close(ex, got, want, atol=1e-4)


def _reference_previous_pattern(T: int) -> torch.Tensor:
    ideal = torch.zeros(T, T)
    ideal[0, 0] = 1.0
    ideal[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    return ideal


def check_ideal_previous_pattern(ideal_previous_pattern, n_pos: int = 9) -> CheckResult:
    """Exercise 2a: ``ideal_previous_pattern(n_pos)`` is the ``[query, key]`` pattern of a perfect
    previous-token head: one on the diagonal below the main one, and the first position,
    which has no previous token, attends to itself (every row sums to one)."""
    ex = "Exercise 2a (ideal previous-token pattern)"
    _missing(ex, ideal_previous_pattern, "function")
    got = as_array(ideal_previous_pattern(n_pos), "your answer")
    if got.shape == (n_pos, n_pos) and abs(got[0].sum()) < 1e-9:
        raise CheckFailed(f"{ex}: row 0 is all zeros; attention must sum to one, so the first position attends "
                          "to itself.")
    if got.shape == (n_pos, n_pos) and got[1, 0] == 0 and got[0, 1] == 1:
        raise CheckFailed(f"{ex}: the pattern is transposed: rows are queries, columns keys, and a causal head only "
                          "looks back (key = query - 1).")
    return check_close(ex, got, _reference_previous_pattern(n_pos))


def _reference_clamped_logits(model, ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    a = model.anatomy
    v_point = a.qkv_point("v", layer)
    store, T = {}, ids.shape[1]

    def keep_v(_m, _a, out):
        store["v"] = v_point.read(out)[:, :, head]

    def set_z(_m, args):
        z = args[0].view(*args[0].shape[:2], a.n_heads, a.d_head).clone()
        z[:, :, head] = _reference_previous_pattern(T) @ store["v"]
        return (z.view(args[0].shape),) + tuple(args[1:])

    hooks = [v_point.module.register_forward_hook(keep_v), a.o_proj(layer).register_forward_pre_hook(set_z)]
    try:
        with torch.no_grad():
            return model.hf(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()


def check_clamped_logits(clamped_logits, model, ids: torch.Tensor, layer: int = 0, head: int = 0) -> CheckResult:
    """Exercise 2b: ``clamped_logits(model, ids, layer, head)`` is the logits ``[batch, pos, vocab]``
    of a forward pass in which head ``head`` of ``layer`` attends exactly to the previous
    token: its output before ``W_O`` is the ideal pattern times its values."""
    ex = "Exercise 2b (a forward pass with a clamped head)"
    _missing(ex, clamped_logits, "function")
    got = clamped_logits(model, ids, layer, head)
    want = _reference_clamped_logits(model, ids, layer, head)
    with torch.no_grad():
        free = model.hf(input_ids=ids, use_cache=False).logits
    if torch.is_tensor(got) and got.shape == want.shape and torch.allclose(got.float(), free, atol=1e-6):
        raise CheckFailed(f"{ex}: these are the logits of the unclamped model; replace the head's output "
                          "(site attn_z) by the ideal pattern times its values.")
    return check_close(ex, got, want, atol=1e-4)


def check_label_attention(query_label_attention, pattern: torch.Tensor, batch: dict) -> CheckResult:
    """Exercise 3: ``query_label_attention(pattern, batch)`` is each head's attention from every
    query (``batch["query_pos"]``) to the label of its exemplar (``batch["label_pos"]``, one per
    sequence and query), averaged over sequences and queries ``[head]``."""
    ex = "Exercise 3 (attention from the query to its label)"
    _missing(ex, query_label_attention, "function")
    qpos, lpos = batch["query_pos"], batch["label_pos"]
    rows = torch.arange(pattern.shape[0])[:, None]
    want = pattern.permute(0, 2, 3, 1)[rows, qpos, lpos].mean((0, 1))
    got = as_array(query_label_attention(pattern, batch), "your answer")
    exemplar = pattern.permute(0, 2, 3, 1)[rows, qpos, lpos - 1].mean((0, 1))
    if got.shape == tuple(want.shape) and torch.allclose(torch.as_tensor(got, dtype=want.dtype), exemplar, atol=1e-6):
        raise CheckFailed(f"{ex}: that is the attention to the exemplar itself (the query's twin); an induction "
                          "head attends to the token after it, the label.")
    return check_close(ex, got, want)
