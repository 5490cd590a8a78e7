"""Checks for the Week 5 exercises (book chapter ``05-mlp-layers``, page *Exercises*).

Each check computes the reference on the reader's own ``model`` (or data) with
:mod:`interpbook.mlp` / :mod:`interpbook.snmf`, compares, and names the usual slip when
the answer is wrong.
"""

from __future__ import annotations

import math

import torch

from .. import mlp
from .. import snmf as S
from . import CheckFailed, CheckResult, as_array, check_close

__all__ = [
    "check_top_contexts", "check_value_projection", "check_y_step", "check_agreement_rate",
    "check_z_step", "check_keep_top", "check_fit_semi_nmf",
]


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
    a = model.anatomy
    raw = mlp.value_logits(model, layer, [neuron], fold_norm=False)[0]
    if as_str == decode(raw.topk(k).indices):
        raise CheckFailed(f"{ex}: you projected with W_U alone; fold in the final norm's gain first "
                          "(multiply the value elementwise by model.anatomy.norm_gain(model.anatomy.final_norm())), "
                          "as the model does before unembedding")
    with torch.no_grad():
        v = a.W_out(layer)[neuron]
        final_weight = getattr(a.final_norm(), "weight", None)
        if final_weight is not None and as_str == decode(((v * final_weight) @ a.W_U).topk(k).indices):
            raise CheckFailed(f"{ex}: you used the norm's `.weight` as its gain; some models (Gemma) multiply by "
                              "1 + weight. Read the gain off the module: model.anatomy.norm_gain(norm)")
        final_gain = a.norm_gain(a.final_norm())
        if as_str == decode(((v * final_gain) @ a.W_U).topk(k).indices):
            raise CheckFailed(f"{ex}: this model normalises the MLP output before it joins the residual stream; "
                              "multiply the value by the gain of model.anatomy.post_mlp_norm(layer) as well")
    if as_str == decode((-ref).topk(k).indices):
        raise CheckFailed(f"{ex}: these are the tokens the value suppresses; take the largest logits, not the smallest")
    W_in_col = model.anatomy.W_in(layer)[:, neuron]
    if as_str == decode((W_in_col @ mlp.folded_unembedding(model)).topk(k).indices):
        raise CheckFailed(f"{ex}: you projected the key (a column of W_in); the value is row {neuron} of W_out")
    raise CheckFailed(f"{ex}: expected {ref_tokens}, got {as_str}")


def _planted_semi_nmf(seed: int, d: int = 40, k: int = 4, n: int = 300, keep: float = 0.25):
    """A synthetic ``A = Z Y`` with sparse ``Z`` and sparse non-negative ``Y`` (the answer is known)."""
    g = torch.Generator().manual_seed(seed)
    Z = S.winner_take_all(torch.randn(d, k, generator=g), keep)
    Y = torch.rand(k, n, generator=g) * (torch.rand(k, n, generator=g) < 0.4)
    return Z, Y, Z @ Y


def check_y_step(y_step, seed: int = 0) -> CheckResult:
    """Exercise 3: one multiplicative semi-NMF step for ``Y`` (``y_step(A, Z, Y)``)."""
    ex = "Exercise 3 (semi-NMF step for Y)"
    g = torch.Generator().manual_seed(seed)
    A, Z = torch.randn(12, 40, generator=g), torch.randn(12, 3, generator=g)
    Y = torch.rand(3, 40, generator=g) + 0.1
    got = y_step(A.clone(), Z.clone(), Y.clone())
    _given(ex, got, "y_step(A, Z, Y)")
    ZtA, ZtZ = Z.T @ A, Z.T @ Z
    numer = S.positive_part(ZtA) + S.negative_part(ZtZ) @ Y
    denom = S.negative_part(ZtA) + S.positive_part(ZtZ) @ Y
    ref = Y * torch.sqrt(numer / denom)
    g_arr = as_array(got, "y_step(A, Z, Y)")
    if g_arr.shape == ref.shape and (g_arr < 0).any():
        raise CheckFailed(f"{ex}: your Y has negative entries; the multiplicative step multiplies Y by a "
                          "ratio of non-negative matrices ([.]^+ and [.]^- parts), so Y stays >= 0")
    if g_arr.shape == ref.shape and torch.allclose(torch.as_tensor(g_arr, dtype=torch.float32), Y * numer / denom, atol=1e-4):
        raise CheckFailed(f"{ex}: you forgot the square root of the ratio")
    result = check_close(ex, got, ref, rtol=1e-4, atol=1e-5)
    before, after = float((A - Z @ Y).norm()), float((A - Z @ ref).norm())
    return CheckResult(ex, f"{result.message}; the reconstruction error drops from {before:.3f} to {after:.3f}")


def check_z_step(z_step, seed: int = 0) -> CheckResult:
    """Exercise 5a: the least-squares ``Z`` for fixed ``Y`` (``z_step(A, Y)`` -> ``[d, k]``)."""
    ex = "Exercise 5a (semi-NMF step for Z)"
    g = torch.Generator().manual_seed(seed)
    A, Y = torch.randn(10, 50, generator=g), torch.rand(3, 50, generator=g)
    got = z_step(A.clone(), Y.clone())
    _given(ex, got, "z_step(A, Y)")
    ref = torch.linalg.lstsq(Y.T, A.T).solution.T
    arr = as_array(got, "z_step(A, Y)")
    if arr.shape == (3, 10):
        raise CheckFailed(f"{ex}: your Z is [k, d] = {arr.shape}; return [d, k] so that A ~ Z @ Y")
    return check_close(ex, got, ref, rtol=1e-3, atol=1e-4)


def check_keep_top(keep_top) -> CheckResult:
    """Exercise 5b: winner-take-all on the columns of ``Z`` (``keep_top(Z, keep)``)."""
    ex = "Exercise 5b (winner-take-all)"
    Z = torch.tensor([[1.0, -5.0], [-3.0, 0.5], [2.0, 4.0], [0.1, -0.2]])
    got = keep_top(Z.clone(), 0.5)
    _given(ex, got, "keep_top(Z, 0.5)")
    arr = as_array(got, "keep_top(Z, 0.5)")
    no_abs = torch.tensor([[1.0, 0.0], [0.0, 0.5], [2.0, 4.0], [0.0, 0.0]])
    if arr.shape == Z.shape and _np_equal(arr, no_abs):
        raise CheckFailed(f"{ex}: you kept the largest values; keep the largest *magnitudes* (a neuron can "
                          "belong to a feature with a negative weight)")
    rows = torch.tensor([[1.0, -5.0], [0.0, 0.0], [2.0, 4.0], [0.0, 0.0]])
    if arr.shape == Z.shape and _np_equal(arr, rows):
        raise CheckFailed(f"{ex}: winner-take-all runs down each column (a feature keeps its strongest neurons), "
                          "not along rows")
    result = check_close(ex, got, S.winner_take_all(Z, 0.5))
    small = as_array(keep_top(Z.clone(), 0.01), "keep_top(Z, 0.01)")
    if not ((small != 0).sum(0) == 1).all():
        raise CheckFailed(f"{ex}: with a tiny keep fraction each column must still keep one entry "
                          "(round the count up: ceil(keep * d))")
    return result


def _np_equal(a, b: torch.Tensor) -> bool:
    return bool((abs(a - b.numpy()) < 1e-6).all())


def check_fit_semi_nmf(fit_semi_nmf, seed: int = 0) -> CheckResult:
    """Exercise 5c: a whole semi-NMF fit, ``fit_semi_nmf(A, k, keep, n_iter, seed)`` ->
    ``(Z, Y, errors)``, judged on a planted factorisation whose features are known."""
    ex = "Exercise 5c (semi-NMF fit)"
    Z0, _, A = _planted_semi_nmf(seed)
    out = fit_semi_nmf(A.clone(), 4, 0.25, 200, 0)
    _given(ex, out, "fit_semi_nmf(...)")
    try:
        Z, Y, errors = out
    except (TypeError, ValueError):
        raise CheckFailed(f"{ex}: return a tuple (Z, Y, errors)") from None
    Z, Y = torch.as_tensor(as_array(Z, "Z")).float(), torch.as_tensor(as_array(Y, "Y")).float()
    if Z.shape != Z0.shape or Y.shape != (4, A.shape[1]):
        raise CheckFailed(f"{ex}: expected Z {tuple(Z0.shape)} and Y (4, {A.shape[1]}); got {tuple(Z.shape)} and {tuple(Y.shape)}")
    if (Y < 0).any():
        raise CheckFailed(f"{ex}: Y has negative entries; only multiplicative steps from a positive start keep it >= 0")
    per_col = (Z != 0).sum(0)
    if (per_col > math.ceil(0.25 * Z.shape[0])).any():
        raise CheckFailed(f"{ex}: a column of Z uses {int(per_col.max())} neurons, more than keep=0.25 allows; "
                          "apply keep_top after every Z step")
    err = float((A - Z @ Y).norm() / A.norm())
    errors = [float(e) for e in errors]
    if not errors or abs(min(errors) - err) > 0.05 and abs(errors[-1] - err) > 0.05:
        raise CheckFailed(f"{ex}: `errors` should track the relative error ||A - ZY|| / ||A|| of your iterates; "
                          f"the returned Z, Y give {err:.3f}, your list ends at {errors[-1] if errors else None}")
    if err > 0.2:
        raise CheckFailed(f"{ex}: relative error {err:.3f} on a planted problem that can be fit almost exactly "
                          "(< 0.2): check the order Z step -> keep_top -> Y steps, and run enough iterations")
    cos = torch.nn.functional.normalize(Z0, dim=0).T @ torch.nn.functional.normalize(Z, dim=0)
    found = cos.abs().max(1).values
    if found.min() < 0.8:
        raise CheckFailed(f"{ex}: the fit is close ({err:.3f}) but recovers a planted feature only at cosine "
                          f"{float(found.min()):.2f}; try another seed or more iterations")
    return CheckResult(ex, f"relative error {err:.3f}; every planted feature found (cosine >= {float(found.min()):.2f})")


def check_agreement_rate(model, top: mlp.TopActivations, layer: int, rate: object) -> CheckResult:
    """Exercise 4: the key-value agreement rate of ``layer`` from ``top`` (collected with
    ``by="abs"``): value oriented by the sign of the top activation, read through the
    norm-folded unembedding (:func:`interpbook.mlp.value_logits`), top-1 token == next token
    of the top-1 context."""
    ex = "Exercise 4 (agreement rate)"
    _given(ex, rate, "rate")
    got = float(as_array(rate, "rate"))
    ref = mlp.key_value_agreement(model, top, layer)
    if abs(got - ref.rate) < 1e-9:
        return CheckResult(ex, f"{got:.4f} ({ref.rate * model.d_mlp:.0f} of {model.d_mlp} neurons; "
                               f"chance from shuffled neurons {ref.shuffled:.4f})")
    if abs(got - ref.rate * 100) < 1e-6:
        raise CheckFailed(f"{ex}: give a fraction between 0 and 1, not a percentage")
    top1 = torch.cat([mlp.value_logits(model, layer, part).argmax(-1).cpu() for part in torch.arange(model.d_mlp).split(256)])
    unsigned = mlp.agreement_rate(top1, top.next_tokens(layer)[:, 0])
    if abs(got - unsigned) < 1e-9:
        raise CheckFailed(f"{ex}: orient each value by the sign of its neuron's top activation: a negative "
                          "activation writes -v, which promotes the tokens at the bottom of v's projection")
    if abs(got - ref.rate_any) < 1e-9:
        raise CheckFailed(f"{ex}: that counts a match with any of the k contexts; the agreement rate uses the top-1 context")
    raise CheckFailed(f"{ex}: expected {ref.rate:.4f}, got {got:.4f}")
