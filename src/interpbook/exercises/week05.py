"""Checks for the Week 5 exercises (book chapter ``05-mlp-layers``, page *Exercises*).

Each check computes the reference on the reader's own ``model`` (or data) with
:mod:`interpbook.mlp` / :mod:`interpbook.snmf`, compares, and names the usual slip when
the answer is wrong.
"""

from __future__ import annotations

import torch

from .. import mlp
from .. import snmf as S
from . import CheckFailed, CheckResult, as_array, check_close

__all__ = ["check_top_contexts", "check_value_projection", "check_update_Y", "check_agreement_rate"]


def _given(ex: str, value: object, name: str) -> None:
    if value is None or value is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet for {name} (got {value!r}); replace the `...`")


def check_top_contexts(model, windows: torch.Tensor, layer: int, neuron: int, k: int, positions: object) -> CheckResult:
    """Exercise 1: the ``k`` (window, position) pairs where ``neuron`` of ``layer`` has its
    largest activations over ``windows`` (any position), largest first."""
    ex = "Exercise 1 (top-activating contexts)"
    _given(ex, positions, "positions")
    got = as_array(positions, "positions").astype(int)
    if got.shape != (k, 2):
        raise CheckFailed(f"{ex}: give a [k, 2] array of (window, position) pairs, k={k}; got shape {got.shape}")
    act = model.run(windows, cache=("mlp_act", layer), stop_early=True).cache["mlp_act", layer][..., neuron]
    seq = act.shape[1]
    top = act.reshape(-1).topk(k).indices
    ref = torch.stack([top // seq, top % seq], 1).numpy()
    if (got == ref).all():
        return CheckResult(ex, f"the {k} contexts match; the top activation is {float(act.max()):.3f}")
    bottom = act.reshape(-1).topk(k, largest=False).indices
    if (got == torch.stack([bottom // seq, bottom % seq], 1).numpy()).all():
        raise CheckFailed(f"{ex}: these are the {k} smallest activations; sort in descending order")
    flat_got = got[:, 0] * seq + got[:, 1]
    if set(flat_got.tolist()) == set(top.tolist()):
        raise CheckFailed(f"{ex}: the right contexts, in the wrong order: list them largest activation first")
    wrong = [tuple(p) for p in got.tolist() if p[0] * seq + p[1] not in set(top.tolist())]
    raise CheckFailed(f"{ex}: {len(wrong)} of your pairs are not among the top {k}, e.g. {wrong[0]}; "
                      f"the largest activation is at {tuple(ref[0].tolist())}. Read ('mlp_act', {layer}) "
                      "(the neuron activations, not mlp_out) and flatten (window, position) together.")


def check_value_projection(model, layer: int, neuron: int, tokens: object, k: int = 10) -> CheckResult:
    """Exercise 2: the ``k`` tokens (ids or strings) that the value of ``neuron`` promotes most."""
    ex = "Exercise 2 (value projection)"
    _given(ex, tokens, "tokens")
    got = [int(t) if not isinstance(t, str) else t for t in (tokens.tolist() if hasattr(tokens, "tolist") else tokens)]
    decode = lambda ids: [model.tokenizer.decode([int(i)]) for i in ids]  # noqa: E731
    as_str = [t if isinstance(t, str) else model.tokenizer.decode([t]) for t in got]
    ref = mlp.value_logits(model, layer, [neuron])[0]
    ref_tokens = decode(ref.topk(k).indices)
    if len(as_str) != k:
        raise CheckFailed(f"{ex}: give {k} tokens, got {len(as_str)}")
    if as_str == ref_tokens:
        return CheckResult(ex, f"top-{k} tokens match: {ref_tokens[:5]}...")
    raw = mlp.value_logits(model, layer, [neuron], fold_norm=False)[0]
    if as_str == decode(raw.topk(k).indices):
        raise CheckFailed(f"{ex}: you projected with W_U alone; fold in the final norm's gain first "
                          "(multiply the value elementwise by the norm's weight), as the model does before unembedding")
    if as_str == decode((-ref).topk(k).indices):
        raise CheckFailed(f"{ex}: these are the tokens the value suppresses; take the largest logits, not the smallest")
    W_in_col = model.anatomy.W_in(layer)[:, neuron]
    if as_str == decode((W_in_col @ mlp.folded_unembedding(model)).topk(k).indices):
        raise CheckFailed(f"{ex}: you projected the key (a column of W_in); the value is row {neuron} of W_out")
    raise CheckFailed(f"{ex}: expected {ref_tokens}, got {as_str}")


def check_update_Y(update_Y, seed: int = 0) -> CheckResult:
    """Exercise 3: one multiplicative semi-NMF step for ``Y`` (``update_Y(A, Z, Y)``)."""
    ex = "Exercise 3 (semi-NMF update of Y)"
    g = torch.Generator().manual_seed(seed)
    A, Z = torch.randn(12, 40, generator=g), torch.randn(12, 3, generator=g)
    Y = torch.rand(3, 40, generator=g) + 0.1
    got = update_Y(A.clone(), Z.clone(), Y.clone())
    _given(ex, got, "update_Y(A, Z, Y)")
    ref = S.update_Y(A, Z, Y)
    g_arr = as_array(got, "update_Y(A, Z, Y)")
    if g_arr.shape == ref.shape and (g_arr < 0).any():
        raise CheckFailed(f"{ex}: your Y has negative entries; the multiplicative step multiplies Y by a "
                          "ratio of non-negative matrices ([.]^+ and [.]^- parts), so Y stays >= 0")
    no_sqrt = Y * ((S.positive_part(Z.T @ A) + S.negative_part(Z.T @ Z) @ Y)
                   / (S.negative_part(Z.T @ A) + S.positive_part(Z.T @ Z) @ Y))
    if g_arr.shape == ref.shape and torch.allclose(torch.as_tensor(g_arr, dtype=torch.float32), no_sqrt, atol=1e-4):
        raise CheckFailed(f"{ex}: you forgot the square root of the ratio")
    result = check_close(ex, got, ref, rtol=1e-4, atol=1e-5)
    before, after = float((A - Z @ Y).norm()), float((A - Z @ ref).norm())
    return CheckResult(ex, f"{result.message}; the reconstruction error drops from {before:.3f} to {after:.3f}")


def check_agreement_rate(model, top: mlp.TopActivations, layer: int, rate: object) -> CheckResult:
    """Exercise 4: the key-value agreement rate of ``layer`` from ``top`` (collected with
    ``by="abs"``): value oriented by the sign of the top activation, read through the
    norm-folded unembedding, top-1 token == next token of the top-1 context."""
    ex = "Exercise 4 (agreement rate)"
    _given(ex, rate, "rate")
    got = float(as_array(rate, "rate"))
    ref = mlp.key_value_agreement(model, top, layer)
    if abs(got - ref.rate) < 1e-9:
        return CheckResult(ex, f"{got:.4f} ({ref.rate * model.d_mlp:.0f} of {model.d_mlp} neurons; "
                               f"chance from shuffled neurons {ref.shuffled:.4f})")
    if abs(got - ref.rate * 100) < 1e-6:
        raise CheckFailed(f"{ex}: give a fraction between 0 and 1, not a percentage")
    unsigned = mlp.agreement_rate(mlp.value_logits(model, layer).argmax(-1).cpu(), top.next_tokens(layer)[:, 0])
    if abs(got - unsigned) < 1e-9:
        raise CheckFailed(f"{ex}: orient each value by the sign of its neuron's top activation: a negative "
                          "activation writes -v, which promotes the tokens at the bottom of v's projection")
    if abs(got - ref.rate_any) < 1e-9:
        raise CheckFailed(f"{ex}: that counts a match with any of the k contexts; the agreement rate uses the top-1 context")
    raise CheckFailed(f"{ex}: expected {ref.rate:.4f}, got {got:.4f}")
