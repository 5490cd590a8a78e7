"""Checks for the Week 6 exercises (book chapter ``06-neurons``, page *Exercises*).

Exercise 1 builds a k-sparse probe from scratch in two steps (ranking, then probe and F1);
the references are private to this module (``_reference_*``) and computed with numpy and
scikit-learn directly, so the reader cannot import the answer under the name they write.
Exercises 2 and 3 compare with :mod:`interpbook.neurons` on the reader's own model.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import neurons as N
from . import CheckFailed, CheckResult, as_array

__all__ = ["check_rank_neurons", "check_sparse_f1", "check_entropy_effect", "check_frequency_correlation"]


def _planted(seed: int = 0, n: int = 200, d: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic activations: neuron 7 fires on positives, neuron 3 is *lower* on them,
    the rest is noise; positives are a third of the rows."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 1 / 3
    X = rng.normal(size=(n, d))
    X[:, 7] += 2.5 * y
    X[:, 3] -= 1.5 * y
    X[:, 11] += 0.8 * y
    return X, y


def _reference_ranking(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    diff = X[y].mean(0) - X[~y].mean(0)
    return np.argsort(-np.abs(diff), kind="stable")


def check_rank_neurons(rank_neurons) -> CheckResult:
    """Exercise 1a: ``rank_neurons(X, y)`` returns neuron indices by decreasing
    ``|mean(X[y]) - mean(X[~y])|``."""
    ex = "Exercise 1a (rank neurons by mean difference)"
    if rank_neurons is None or rank_neurons is Ellipsis:
        raise CheckFailed(f"{ex}: no function yet; define rank_neurons(X, y)")
    X, y = _planted()
    got = as_array(rank_neurons(X, y), "your ranking").astype(int).ravel()
    want = _reference_ranking(X, y)
    if got.shape != want.shape:
        raise CheckFailed(f"{ex}: return all {len(want)} neuron indices, got {got.shape[0]}")
    if (got[:3] == want[:3]).all():
        return CheckResult(ex, f"top neurons {want[:3].tolist()} in the right order (planted: 7 up, 3 down, 11 up)")
    diff = X[y].mean(0) - X[~y].mean(0)
    if (got[:3] == np.argsort(-diff, kind="stable")[:3]).all():
        raise CheckFailed(f"{ex}: you ranked by the signed difference; neuron 3 fires *less* on the feature and "
                          "is just as informative: rank by the absolute difference")
    if (got[:3] == want[::-1][:3]).all():
        raise CheckFailed(f"{ex}: that is the least informative neuron first; sort in decreasing order")
    raise CheckFailed(f"{ex}: expected the ranking to start {want[:3].tolist()}, got {got[:3].tolist()}")


def _reference_sparse_f1(X, y, k, train, test) -> float:
    from sklearn.linear_model import LogisticRegression

    cols = _reference_ranking(X[train], y[train])[:k]
    Xtr, Xte = X[train][:, cols], X[test][:, cols]
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    clf = LogisticRegression(class_weight="balanced", max_iter=1000).fit((Xtr - mu) / sd, y[train])
    pred = clf.predict((Xte - mu) / sd)
    tp = float((pred & y[test]).sum())
    return 0.0 if tp == 0 else 2 * tp / (pred.sum() + y[test].sum())


def check_sparse_f1(sparse_f1, tol: float = 0.05) -> CheckResult:
    """Exercise 1b: ``sparse_f1(X, y, k, train, test)`` ranks on the training rows, fits a
    logistic probe on the top ``k`` neurons and returns the test F1."""
    ex = "Exercise 1b (k-sparse probe F1)"
    if sparse_f1 is None or sparse_f1 is Ellipsis:
        raise CheckFailed(f"{ex}: no function yet; define sparse_f1(X, y, k, train, test)")
    X, y = _planted(seed=1)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = np.sort(order[:120]), np.sort(order[120:])
    for k in (1, 3):
        got = float(sparse_f1(X, y, k, train, test))
        want = _reference_sparse_f1(X, y, k, train, test)
        if not 0 <= got <= 1:
            raise CheckFailed(f"{ex}: F1 must be in [0, 1]; got {got:.3f} for k={k}")
        if abs(got - want) > tol:
            acc = float(((X[test][:, 7] > np.median(X[:, 7])) == y[test]).mean())
            hint = (" Did you rank on all rows instead of the training rows, score accuracy instead of F1"
                    f" (a one-neuron accuracy here is about {acc:.2f}), or forget to standardise?")
            raise CheckFailed(f"{ex}: for k={k} the reference test F1 is {want:.3f}, yours {got:.3f}.{hint}")
    return CheckResult(ex, f"test F1 matches the reference within {tol} for k = 1 and 3")


def check_entropy_effect(model, windows: torch.Tensor, neuron: int, total: object, direct: object,
                         rtol: float = 0.05) -> CheckResult:
    """Exercise 2: the mean absolute entropy change (nats) of mean-ablating ``neuron`` of the
    last layer over ``windows``: ``total`` through the model, ``direct`` with the final
    norm's scale frozen."""
    ex = "Exercise 2 (direct and total effect)"
    for name, v in (("total", total), ("direct", direct)):
        if v is None or v is Ellipsis:
            raise CheckFailed(f"{ex}: no answer yet for {name}; replace the `...`")
    ref = N.entropy_effects(model, windows, [neuron])[0]
    got_t, got_d = float(as_array(total, "total")), float(as_array(direct, "direct"))
    ok_t = abs(got_t - ref.total) <= rtol * ref.total + 1e-6
    ok_d = abs(got_d - ref.direct) <= rtol * ref.direct + 1e-6
    if ok_t and ok_d:
        return CheckResult(ex, f"total {ref.total:.4f}, direct {ref.direct:.4f} nats (ratio {ref.ratio:.2f})")
    if abs(got_t - ref.direct) <= rtol * ref.direct + 1e-6 and abs(got_d - ref.total) <= rtol * ref.total + 1e-6:
        raise CheckFailed(f"{ex}: total and direct are swapped")
    if ok_t:
        raise CheckFailed(f"{ex}: total is right ({ref.total:.4f}); direct should be {ref.direct:.4f}, yours "
                          f"{got_d:.4f}. Freeze the final norm's scale at the *clean* residual stream "
                          "(interpbook.anatomy.norm_as_linear(norm, delta, clean_resid)) and add the result to "
                          "the clean normed stream.")
    raise CheckFailed(f"{ex}: expected total {ref.total:.4f} and direct {ref.direct:.4f} nats, got {got_t:.4f} and "
                      f"{got_d:.4f}. Set the neuron to its mean over all positions of windows (not 0), and "
                      "average |H_ablated - H_clean| over every position.")


def check_frequency_correlation(model, frequency_correlation, token_ids: torch.Tensor,
                                log_freq: torch.Tensor) -> CheckResult:
    """Exercise 3: ``frequency_correlation(model, vector, token_ids, log_freq)``, the Pearson
    correlation over ``token_ids`` between the logits ``vector`` writes through the
    norm-folded unembedding and ``log_freq``."""
    ex = "Exercise 3 (frequency correlation)"
    if frequency_correlation is None or frequency_correlation is Ellipsis:
        raise CheckFailed(f"{ex}: no function yet")
    g = torch.Generator().manual_seed(0)
    vectors = torch.cat([torch.randn(2, model.d_model, generator=g),
                         model.anatomy.W_out(model.n_layers - 1)[:1].detach().float()])
    want = N.frequency_correlations(model, vectors, token_ids, log_freq)
    with torch.no_grad():
        got = torch.tensor([float(frequency_correlation(model, v, token_ids, log_freq)) for v in vectors])
    if torch.allclose(got, want, atol=2e-3):
        return CheckResult(ex, f"correlations match: {[round(float(x), 3) for x in want]}")
    W = model.anatomy.W_U[:, token_ids].detach().float()
    raw = torch.stack([torch.corrcoef(torch.stack([v @ W, log_freq.float()]))[0, 1] for v in vectors])
    if torch.allclose(got, raw, atol=2e-3):
        raise CheckFailed(f"{ex}: you used W_U without the final norm's gain; use model.anatomy.folded_W_U()")
    raise CheckFailed(f"{ex}: expected {[round(float(x), 3) for x in want]}, got {[round(float(x), 3) for x in got]}")
