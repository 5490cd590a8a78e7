"""The Week 2 exercise checks: right answers pass, the usual wrong answers fail with a
message that names the slip. No model needed."""

import numpy as np
import pytest

from interpbook import probes as P
from interpbook.exercises import CheckFailed, CheckResult
from interpbook.exercises import week02 as w


def fails(match, fn, *args, **kwargs):
    with pytest.raises(CheckFailed, match=match):
        fn(*args, **kwargs)


# --- Exercise 1 ---------------------------------------------------------------------------
def test_ridge_right_answer_passes():
    assert isinstance(w.check_ridge_closed_form(P.ridge_fit), CheckResult)


def test_ridge_slips_are_named():
    def penalised_intercept(X, Y, alpha):
        Xb = np.hstack([X, np.ones((len(X), 1))])
        Wb = np.linalg.solve(Xb.T @ Xb + alpha * np.eye(Xb.shape[1]), Xb.T @ Y)
        return Wb[:-1], Wb[-1]

    def not_centred(X, Y, alpha):
        return np.linalg.solve(X.T @ X + alpha * np.eye(X.shape[1]), X.T @ Y), np.zeros(Y.shape[1])

    def ols(X, Y, alpha):
        return P.ridge_fit(X, Y, 0.0)

    fails("intercept is penalised", w.check_ridge_closed_form, penalised_intercept)
    fails("not centred", w.check_ridge_closed_form, not_centred)
    fails("penalty", w.check_ridge_closed_form, ols)
    fails("no answer|pair", w.check_ridge_closed_form, lambda X, Y, a: ...)
    fails("should be", w.check_ridge_closed_form, lambda X, Y, a: (np.zeros((3, 3)), np.zeros(3)))


# --- Exercise 2 ---------------------------------------------------------------------------
def test_uuas_right_answer_passes():
    assert isinstance(w.check_uuas(lambda d, h: P.uuas([d], [h])), CheckResult)


def test_uuas_slips_are_named():
    fails("maximum", w.check_uuas, lambda d, h: P.uuas([-d], [h]))
    fails("no answer", w.check_uuas, lambda d, h: None)

    def directed_twice(d, h):
        mst = P.min_spanning_tree(d)
        gold = P.tree_edges(h)
        both = mst | {(j, i) for i, j in mst}
        return len({e for e in both if tuple(sorted(e)) in gold}) / len(gold)

    fails("once", w.check_uuas, directed_twice)


# --- Exercise 3 ---------------------------------------------------------------------------
def test_control_task_reference_passes_and_slips_fail():
    assert isinstance(w.check_control_task(w._reference_control_labels), CheckResult)
    fails("real tags", w.check_control_task, lambda words, tags, seed: list(tags))
    fails("same label", w.check_control_task,
          lambda words, tags, seed: list(np.random.default_rng(seed).choice(sorted(set(tags)), len(tags))))
    fails("use the seed", w.check_control_task, lambda words, tags, seed: w._reference_control_labels(words, tags, 0))
    fails("tag set", w.check_control_task, lambda words, tags, seed: ["X"] * len(words))
    fails("one label per token", w.check_control_task, lambda words, tags, seed: ["NOUN"])


def test_selectivity():
    assert isinstance(w.check_selectivity(0.3, 0.9, 0.6), CheckResult)
    fails("real accuracy - control", w.check_selectivity, 0.6 - 0.9, 0.9, 0.6)


# --- Exercise 4 ---------------------------------------------------------------------------
def test_attribute_probe():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8))
    labels = np.array(["a", "b", "c"])[(X @ rng.normal(size=(8, 3))).argmax(1)]
    tr, te = P.train_test_split(300, 0.2, seed=0)
    acc, _ = P.logistic_probe(X, labels, split=(tr, te))
    assert isinstance(w.check_attribute_probe(acc, X, labels), CheckResult)
    fails("majority", w.check_attribute_probe, 0.2, X, labels)
    fails("below the reference", w.check_attribute_probe, acc - 0.3 if acc - 0.3 > 0.45 else 0.5, X, labels)
    fails("between 0 and 1", w.check_attribute_probe, 1.5, X, labels)
    fails("no answer", w.check_attribute_probe, ..., X, labels)


# --- Exercise 5 ---------------------------------------------------------------------------
def test_tree_distances_check():
    assert isinstance(w.check_tree_distances(P.tree_distances), CheckResult)
    fails("adjacency", w.check_tree_distances, lambda h: (P.tree_distances(h) == 1).astype(int))
    fails("no answer", w.check_tree_distances, lambda h: ...)
    fails("edges apart", w.check_tree_distances, lambda h: P.tree_distances(h) * 2)


def test_probe_distances_check():
    import torch

    def right(h, B):
        z = h @ B.T
        sq = (z ** 2).sum(-1)
        return sq[:, None] + sq[None, :] - 2 * z @ z.T

    assert isinstance(w.check_probe_distances(right), CheckResult)
    fails("squared", w.check_probe_distances, lambda h, B: right(h, B).clamp(min=0).sqrt())
    fails("B is not used", w.check_probe_distances, lambda h, B: right(h, torch.eye(h.shape[1])) + 0 * B.sum())
    fails("differentiated", w.check_probe_distances, lambda h, B: right(h, B).detach())


def test_probe_loss_check():
    n2 = lambda p, g: p.shape[0] ** 2
    assert isinstance(w.check_probe_loss(lambda p, g: (p - g).abs().sum() / n2(p, g)), CheckResult)
    assert isinstance(w.check_probe_loss(lambda p, g: (p - g).abs().mean()), CheckResult)
    fails("squared error", w.check_probe_loss, lambda p, g: ((p - g) ** 2).sum() / n2(p, g))
    fails("divide by n", w.check_probe_loss, lambda p, g: (p - g).abs().sum())
    fails("not by n", w.check_probe_loss, lambda p, g: (p - g).abs().sum() / p.shape[0])


def test_gradient_checks_work_with_gradients_turned_off():
    import torch

    with torch.no_grad():
        w.check_probe_loss(lambda p, g: (p - g).abs().mean())
