"""Checks for the Week 2 exercises (book chapter ``02-probing``, page *Exercises*).

Each ``check_*`` grades a reader's function or number against a reference (built from
:mod:`interpbook.probes`, or private here) on data it makes itself, returns a
:class:`~interpbook.exercises.CheckResult` when it matches and raises
:class:`~interpbook.exercises.CheckFailed` naming the likely slip when it does not.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import numpy as np
import torch

from .. import probes as P
from . import CheckFailed, CheckResult, as_array

__all__ = [
    "check_ridge_closed_form",
    "check_uuas",
    "check_control_task",
    "check_selectivity",
    "check_attribute_probe",
    "check_tree_distances",
    "check_probe_distances",
    "check_probe_loss",
]


# --- Exercise 1: ridge in closed form ------------------------------------------------------
def _ridge_variants(X, Y, alpha):
    """The reference and the usual slips, each as (W, b)."""
    n, d = X.shape
    ref = P.ridge_fit(X, Y, alpha)
    Xb = np.hstack([X, np.ones((n, 1))])
    Wb = np.linalg.solve(Xb.T @ Xb + alpha * np.eye(d + 1), Xb.T @ Y)
    no_center = np.linalg.solve(X.T @ X + alpha * np.eye(d), X.T @ Y)
    ols = P.ridge_fit(X, Y, 0.0)
    return ref, {
        "the intercept is penalised too (append the ones column after centring, or centre "
        "X and Y and leave b out of the penalty)": (Wb[:-1], Wb[-1]),
        "X and Y are not centred, so the weights absorb the intercept": (no_center, np.zeros(Y.shape[1])),
        "the penalty alpha * I is missing (this is ordinary least squares)": ols,
    }


def check_ridge_closed_form(ridge: Callable) -> CheckResult:
    """``ridge(X, Y, alpha) -> (W [d, k], b [k])`` must match ridge regression with an
    unpenalised intercept on three random problems (more samples than features, fewer,
    and a strong penalty)."""
    ex = "Exercise 1 (ridge in closed form)"
    rng = np.random.default_rng(0)
    for n, d, k, alpha in [(50, 8, 2, 1.0), (12, 20, 3, 0.5), (40, 5, 1, 100.0)]:
        X = rng.normal(size=(n, d)) + 2.0
        Y = X @ rng.normal(size=(d, k)) + 5.0 + rng.normal(size=(n, k))
        out = ridge(X, Y, alpha)
        if out is None or out is Ellipsis or not isinstance(out, (tuple, list)) or len(out) != 2:
            raise CheckFailed(f"{ex}: return a pair (W, b); got {type(out).__name__}")
        W, b = as_array(out[0], "W"), as_array(out[1], "b")
        (W_ref, b_ref), slips = _ridge_variants(X, Y, alpha)
        if W.shape != W_ref.shape or b.reshape(-1).shape != b_ref.shape:
            raise CheckFailed(f"{ex}: with X {X.shape} and Y {Y.shape}, W should be {W_ref.shape} and b "
                              f"{b_ref.shape}; got {W.shape} and {b.shape}")
        if np.allclose(W, W_ref, atol=1e-6, rtol=1e-5) and np.allclose(b.reshape(-1), b_ref, atol=1e-6, rtol=1e-5):
            continue
        for message, (Ws, bs) in slips.items():
            if np.allclose(W, Ws, atol=1e-6, rtol=1e-5):
                raise CheckFailed(f"{ex}: on n={n}, d={d}, alpha={alpha} your weights match the slip: {message}")
        diff = np.abs(W - W_ref).max()
        raise CheckFailed(f"{ex}: on n={n}, d={d}, alpha={alpha} the weights differ from ridge by up to {diff:.3g}")
    return CheckResult(ex, "weights and intercept match ridge regression on 3 random problems")


# --- Exercise 2: UUAS ------------------------------------------------------------------------
def check_uuas(sentence_uuas: Callable) -> CheckResult:
    """``sentence_uuas(dist [n, n], heads) -> float`` for one sentence: the fraction of gold
    edges recovered by the minimum spanning tree of ``dist``."""
    ex = "Exercise 2 (UUAS)"
    rng = np.random.default_rng(1)
    from ..datasets import toy_treebank

    sents = toy_treebank(12, seed=5)
    for s in sents:
        gold = P.tree_distances(s.heads).astype(float)
        cases = {
            "the tree's own distances": gold,
            "noisy tree distances": gold + rng.uniform(0, 1.5, gold.shape) * (1 - np.eye(len(s))),
            "a random distance matrix": (lambda m: m + m.T)(rng.uniform(0, 1, gold.shape)) * (1 - np.eye(len(s))),
            "word-order distance": np.abs(np.subtract.outer(np.arange(len(s)), np.arange(len(s)))).astype(float),
        }
        for name, dist in cases.items():
            want = P.uuas([dist], [s.heads])
            got = sentence_uuas(dist.copy(), list(s.heads))
            if got is None or got is Ellipsis:
                raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
            got = float(as_array(got, "your UUAS"))
            if abs(got - want) > 1e-9:
                maxst = -dist
                hint = ""
                if abs(got - P.uuas([maxst], [s.heads])) < 1e-9:
                    hint = " It equals the score of the *maximum* spanning tree: take the smallest distances."
                elif abs(got - 2 * want) < 1e-9 or got > 1:
                    hint = " Count each undirected edge once ((i, j) and (j, i) are the same edge)."
                raise CheckFailed(f"{ex}: on {name} for '{s.text}' you return {got:.3f}, expected {want:.3f}.{hint}")
    return CheckResult(ex, "matches the reference on 48 distance matrices (exact, noisy, random, linear)")


# --- Exercise 3: control task ----------------------------------------------------------------
def _reference_control_labels(words: Sequence[str], tags: Sequence[str], seed: int = 0) -> list[str]:
    """The reference control task (Hewitt & Liang, 2019): every word *type* gets one label,
    drawn at random from the empirical distribution of the real tags; every occurrence of
    the type carries it."""
    rng = np.random.default_rng(seed)
    counts = Counter(tags)
    labels, p = list(counts), np.array(list(counts.values()), dtype=float)
    types = sorted(set(w.lower() for w in words))
    pick = dict(zip(types, rng.choice(len(labels), size=len(types), p=p / p.sum())))
    return [labels[pick[w.lower()]] for w in words]


def check_control_task(fn: Callable) -> CheckResult:
    """``fn(words, tags, seed) -> labels``: one label per token, the same for every
    occurrence of a word type (case-insensitive), drawn from the real tag set, not the
    real tags themselves, different for different seeds."""
    ex = "Exercise 3 (control task)"
    from ..datasets import toy_treebank

    sents = toy_treebank(60, seed=11)
    words = [w for s in sents for w in s.words]
    tags = [t for s in sents for t in s.tags]
    out = fn(words, tags, 0)
    if out is None or out is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {out!r}); replace the `...`")
    out = list(out)
    if len(out) != len(words):
        raise CheckFailed(f"{ex}: one label per token: expected {len(words)}, got {len(out)}")
    if not set(out) <= set(tags):
        raise CheckFailed(f"{ex}: labels must come from the real tag set {sorted(set(tags))}; "
                          f"got {sorted(set(map(str, out)) - set(tags))}")
    if out == list(tags):
        raise CheckFailed(f"{ex}: these are the real tags; the control task assigns *random* labels per type")
    by_type: dict[str, set] = {}
    for w, lab in zip(words, out):
        by_type.setdefault(w.lower(), set()).add(lab)
    mixed = [w for w, labs in by_type.items() if len(labs) > 1]
    if mixed:
        raise CheckFailed(f"{ex}: a word type must always get the same label; '{mixed[0]}' gets "
                          f"{sorted(by_type[mixed[0]])}. Draw one label per type, not per token.")
    if list(fn(words, tags, 1)) == out:
        raise CheckFailed(f"{ex}: seed 0 and seed 1 give the same labels; use the seed")
    return CheckResult(ex, f"consistent random labels for {len(by_type)} word types")


def check_selectivity(selectivity: float, real_acc: float, control_acc: float) -> CheckResult:
    """Selectivity is real-task accuracy minus control-task accuracy (Hewitt & Liang)."""
    ex = "Exercise 3 (selectivity)"
    if selectivity is None or selectivity is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet; replace the `...`")
    want = real_acc - control_acc
    if abs(float(selectivity) - want) > 1e-9:
        raise CheckFailed(f"{ex}: selectivity = real accuracy - control accuracy = {want:.3f}; got {float(selectivity):.3f}")
    return CheckResult(ex, f"selectivity {want:.3f}")


# --- Exercise 4: probe a new attribute -------------------------------------------------------
def check_attribute_probe(accuracy: float, features, labels, *, seed: int = 0,
                          test_frac: float = 0.2, tolerance: float = 0.05) -> CheckResult:
    """A held-out ``accuracy`` of a classification probe for ``labels`` from ``features``
    ``[n, d]``: it must beat the majority-class baseline and a shuffled-label control, and
    come within ``tolerance`` of the reference logistic probe on the same split."""
    ex = "Exercise 4 (a new attribute)"
    if accuracy is None or accuracy is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet; replace the `...`")
    accuracy = float(accuracy)
    labels = np.asarray(labels)
    tr, te = P.train_test_split(len(labels), test_frac, seed)
    majority = Counter(labels[tr]).most_common(1)[0][0]
    base = float((labels[te] == majority).mean())
    ref, _ = P.logistic_probe(features, labels, split=(tr, te))
    shuffled = labels.copy()
    shuffled[tr] = labels[tr][np.random.default_rng(seed).permutation(len(tr))]
    ctrl, _ = P.logistic_probe(features, shuffled, split=(tr, te))
    if not 0 <= accuracy <= 1:
        raise CheckFailed(f"{ex}: an accuracy is between 0 and 1; got {accuracy}")
    if accuracy <= base:
        raise CheckFailed(f"{ex}: {accuracy:.3f} does not beat predicting the majority class ({base:.3f})")
    if accuracy < ref - tolerance:
        raise CheckFailed(f"{ex}: {accuracy:.3f} is well below the reference logistic probe ({ref:.3f}) on "
                          f"the split train_test_split(n, {test_frac}, seed={seed}); check the split and scaling")
    if accuracy > ref + 0.15:
        raise CheckFailed(f"{ex}: {accuracy:.3f} is far above the reference ({ref:.3f}); is the test set leaking "
                          "into training?")
    return CheckResult(ex, f"held-out accuracy {accuracy:.3f} vs majority {base:.3f}, shuffled-label control "
                           f"{ctrl:.3f}, reference {ref:.3f}")


# --- Exercise 5: a structural probe from scratch ---------------------------------------------
def check_tree_distances(tree_distance_matrix: Callable) -> CheckResult:
    """``tree_distance_matrix(heads) -> [n, n]``: the number of edges on the path between
    every pair of words of the tree given by head indices."""
    ex = "Exercise 5a (tree distances)"
    from ..datasets import toy_treebank

    for s in toy_treebank(12, seed=7):
        want = P.tree_distances(s.heads)
        got = tree_distance_matrix(list(s.heads))
        if got is None or got is Ellipsis:
            raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
        got = as_array(got, "distances")
        n = len(s.heads)
        if got.shape != (n, n):
            raise CheckFailed(f"{ex}: for the {n}-word sentence '{s.text}' the matrix should be ({n}, {n}), "
                              f"got {got.shape}")
        if np.array_equal(got, want):
            continue
        if np.array_equal(got, (want == 1).astype(got.dtype)):
            raise CheckFailed(f"{ex}: this is the adjacency matrix (1 for an edge); distances count the edges "
                              "on the path between *every* pair of words (breadth-first search from each word)")
        if not np.array_equal(got, got.T):
            raise CheckFailed(f"{ex}: the matrix is not symmetric; the tree's edges are undirected "
                              "(a word and its head are 1 apart both ways)")
        i, j = np.argwhere(got != want)[0]
        raise CheckFailed(f"{ex}: in '{s.text}', words {i} ({s.words[i]!r}) and {j} ({s.words[j]!r}) are "
                          f"{want[i, j]} edges apart in the tree; you give {got[i, j]}")
    return CheckResult(ex, "exact on 12 trees")


def _squared_probe_distances(h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    diff = (h[:, None, :] - h[None, :, :]) @ B.T  # [n, n, rank]
    return (diff ** 2).sum(-1)


def check_probe_distances(probe_distances: Callable) -> CheckResult:
    """``probe_distances(h [n, d], B [rank, d]) -> [n, n]``: the squared distance
    ``(B(h_i - h_j))ᵀ(B(h_i - h_j))`` for every pair of words, as a differentiable tensor."""
    ex = "Exercise 5b (probe distances)"
    g = torch.Generator().manual_seed(0)
    h, B = torch.randn(7, 10, generator=g), torch.randn(4, 10, generator=g, requires_grad=True)
    with torch.enable_grad():  # the book runs with gradients off; the probe needs them
        got = probe_distances(h, B)
    if got is None or got is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
    if not isinstance(got, torch.Tensor) or not got.requires_grad:
        raise CheckFailed(f"{ex}: return a torch tensor computed from B (so that the loss can be "
                          "differentiated with respect to B); avoid numpy and .detach()")
    want = _squared_probe_distances(h, B)
    if tuple(got.shape) != (7, 7):
        raise CheckFailed(f"{ex}: with h [7, 10] and B [4, 10] the answer is [7, 7], got {tuple(got.shape)}")
    with torch.no_grad():
        if torch.allclose(got, want.sqrt(), atol=1e-4):
            raise CheckFailed(f"{ex}: these are distances, not *squared* distances: drop the square root")
        if torch.allclose(got, _squared_probe_distances(h, torch.eye(10)), atol=1e-4):
            raise CheckFailed(f"{ex}: B is not used: project the differences with B first")
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise CheckFailed(f"{ex}: the squared distances differ from (B(h_i - h_j))·(B(h_i - h_j)) by up to "
                              f"{float((got - want).abs().max()):.3g}")
    return CheckResult(ex, "squared probe distances match and carry gradients")


def check_probe_loss(probe_loss: Callable) -> CheckResult:
    """``probe_loss(pred [n, n], gold [n, n]) -> scalar``: Hewitt and Manning's per-sentence
    loss, the absolute differences summed over all word pairs and divided by ``n²``."""
    ex = "Exercise 5c (probe loss)"
    g = torch.Generator().manual_seed(1)
    gold = torch.as_tensor(P.tree_distances([1, 2, -1, 2, 3, 4]), dtype=torch.float32)
    pred = (gold + torch.randn(6, 6, generator=g)).abs().requires_grad_()
    with torch.enable_grad():
        got = probe_loss(pred, gold)
    if got is None or got is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {got!r}); replace the `...`")
    if not isinstance(got, torch.Tensor) or got.numel() != 1:
        raise CheckFailed(f"{ex}: return a scalar torch tensor, got {type(got).__name__}")
    n = gold.shape[0]
    with torch.no_grad():
        diff = (gold - pred).abs()
        want = diff.sum() / n ** 2
        if torch.isclose(got, ((gold - pred) ** 2).sum() / n ** 2, atol=1e-5):
            raise CheckFailed(f"{ex}: this is a squared error; the paper uses the absolute difference (L1)")
        if torch.isclose(got, diff.sum(), atol=1e-5):
            raise CheckFailed(f"{ex}: divide by n² (the number of word pairs), so that long sentences do not "
                              "dominate the loss")
        if torch.isclose(got, diff.sum() / n, atol=1e-5):
            raise CheckFailed(f"{ex}: divide by n², not by n: there are n² word pairs")
        if not torch.isclose(got, want, atol=1e-5):
            raise CheckFailed(f"{ex}: expected {float(want):.4f}, got {float(got.detach()):.4f}")
    if not got.requires_grad:
        raise CheckFailed(f"{ex}: the loss must stay differentiable (no .item(), numpy or .detach())")
    return CheckResult(ex, f"loss {float(want):.4f} matches")
