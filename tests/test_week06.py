"""Week 6 exercise checks: right answers pass, usual slips fail with a message."""

import numpy as np
import pytest
import torch

from interpbook import neurons as N
from interpbook import sparse_probing as sp
from interpbook.exercises import CheckFailed
from interpbook.exercises import week06 as w
from tiny_models import random_ids, tiny_model


def test_rank_neurons():
    w.check_rank_neurons(sp.mean_difference_ranking)
    with pytest.raises(CheckFailed, match="absolute"):
        w.check_rank_neurons(lambda X, y: np.argsort(-(X[y].mean(0) - X[~y].mean(0)), kind="stable"))
    with pytest.raises(CheckFailed, match="no function"):
        w.check_rank_neurons(...)


def test_sparse_f1():
    w.check_sparse_f1(lambda X, y, k, tr, te: sp.k_sparse_probe(X, y, k, tr, te).f1)

    def accuracy(X, y, k, tr, te):  # a common slip: accuracy instead of F1
        cols = sp.mean_difference_ranking(X[tr], y[tr])[:k]
        return float(((X[te][:, cols].mean(1) > 1.0) == y[te]).mean())

    with pytest.raises(CheckFailed, match="reference test F1"):
        w.check_sparse_f1(accuracy)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("gemma3")


def test_entropy_effect(tiny):
    ids = random_ids(2, 6)
    ref = N.entropy_effects(tiny, ids, [3])[0]
    w.check_entropy_effect(tiny, ids, 3, ref.total, ref.direct)
    if abs(ref.total - ref.direct) > 0.05 * max(ref.total, ref.direct):
        with pytest.raises(CheckFailed, match="swapped"):
            w.check_entropy_effect(tiny, ids, 3, ref.direct, ref.total)
    with pytest.raises(CheckFailed, match="direct should be"):
        w.check_entropy_effect(tiny, ids, 3, ref.total, ref.direct * 2 + 1)
    with pytest.raises(CheckFailed, match="no answer"):
        w.check_entropy_effect(tiny, ids, 3, ..., ref.direct)


def test_frequency_correlation(tiny):
    ids = torch.arange(5, 80)
    logf = torch.randn(len(ids), generator=torch.Generator().manual_seed(1))
    right = lambda m, v, t, f: N.frequency_correlations(m, v[None], t, f)[0]  # noqa: E731
    w.check_frequency_correlation(tiny, right, ids, logf)
    unfolded = lambda m, v, t, f: torch.corrcoef(torch.stack([v @ m.anatomy.W_U[:, t], f]))[0, 1]  # noqa: E731
    with pytest.raises(CheckFailed, match="gain"):
        w.check_frequency_correlation(tiny, unfolded, ids, logf)
