"""Semi-NMF (Shafran et al., 2025; Ding et al., 2010 updates) and its baselines, on
synthetic data with a known answer."""

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from interpbook import snmf as S


def planted(d=40, k=4, n=300, keep=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = S.winner_take_all(torch.randn(d, k, generator=g), keep)
    Y = torch.rand(k, n, generator=g) * (torch.rand(k, n, generator=g) < 0.4)
    return Z, Y, Z @ Y


def test_parts():
    X = torch.tensor([[-2.0, 3.0], [0.0, -0.5]])
    assert torch.equal(S.positive_part(X) - S.negative_part(X), X)
    assert (S.positive_part(X) >= 0).all() and (S.negative_part(X) >= 0).all()


def test_update_Z_is_least_squares():
    g = torch.Generator().manual_seed(1)
    A, Y = torch.randn(10, 50, generator=g), torch.rand(3, 50, generator=g)
    ref = torch.linalg.lstsq(Y.T, A.T).solution.T
    torch.testing.assert_close(S.update_Z(A, Y, reg=0.0), ref, atol=1e-4, rtol=1e-4)


def test_winner_take_all_keeps_largest():
    Z = torch.tensor([[1.0, -5.0], [-3.0, 0.5], [2.0, 4.0], [0.1, -0.2]])
    W = S.winner_take_all(Z, keep=0.5)
    assert ((W != 0).sum(0) == 2).all()
    assert torch.equal(W[:, 0], torch.tensor([0.0, -3.0, 2.0, 0.0]))
    assert torch.equal(W[:, 1], torch.tensor([0.0, 0.0, 4.0, 0.0]) + torch.tensor([-5.0, 0, 0, 0]))
    assert ((S.winner_take_all(Z, keep=0.01) != 0).sum(0) == 1).all()  # at least one survives


def test_update_Y_nonnegative_and_monotone():
    Z, _, A = planted()
    A = A + 0.01 * torch.randn(A.shape, generator=torch.Generator().manual_seed(3))
    Y = torch.rand(Z.shape[1], A.shape[1], generator=torch.Generator().manual_seed(4)) + 0.1
    err = [float((A - Z @ Y).norm())]
    for _ in range(20):
        Y = S.update_Y(A, Z, Y)
        assert (Y >= 0).all()
        err.append(float((A - Z @ Y).norm()))
    assert all(b <= a + 1e-4 for a, b in zip(err, err[1:])), err
    assert err[-1] < 0.5 * err[0]


@pytest.mark.parametrize("init", ["kmeans", "random"])
def test_snmf_fits_planted_factorisation(init):
    Z, Y, A = planted()
    fit = S.snmf(A, 4, keep=0.25, max_iter=300, init=init, seed=0)
    assert fit.Z.shape == (40, 4) and fit.Y.shape == (4, 300)
    assert (fit.Y >= 0).all()
    assert ((fit.Z != 0).sum(0) <= math.ceil(0.25 * 40)).all()
    assert fit.error == min(fit.errors) <= fit.errors[0] + 1e-6
    assert fit.error < 0.2
    assert fit.error == pytest.approx(S.relative_error(A, fit.Z, fit.Y), abs=1e-4)  # the cheap error formula
    assert fit.converged and len(fit.errors) < 300
    # each planted feature is matched by a learned one (cosine)
    cos = torch.nn.functional.normalize(Z, dim=0).T @ torch.nn.functional.normalize(fit.Z, dim=0)
    assert cos.abs().max(1).values.min() > 0.8
    assert len(fit.support(0)) == (fit.Z[:, 0] != 0).sum()


def test_snmf_bad_arguments():
    with pytest.raises(ValueError, match="init"):
        S.snmf(torch.rand(5, 10), 2, init="svd?")
    with pytest.raises(ValueError, match="keep"):
        S.snmf(torch.rand(5, 10), 2, keep=0.0)


def test_snmf_stopping_rule():
    """More inner Y steps converge in fewer iterations; a zero tolerance runs to the cap."""
    _, _, A = planted(seed=2)
    one = S.snmf(A, 4, keep=0.25, y_steps=1, max_iter=400, seed=0)
    ten = S.snmf(A, 4, keep=0.25, y_steps=10, max_iter=400, seed=0)
    assert ten.converged and len(ten.errors) < len(one.errors)
    capped = S.snmf(A, 4, keep=0.25, max_iter=7, tol=0.0, seed=0)
    assert not capped.converged and len(capped.errors) == 7


def test_kmeans_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = torch.cat([c + 0.1 * torch.randn(30, 2, generator=g) for c in centres])
    C, labels = S.kmeans(X, 3, seed=1)
    assert len(set(labels[:30].tolist())) == 1 and len(set(labels.tolist())) == 3
    assert torch.cdist(centres, C).min(1).values.max() < 0.2
    with pytest.raises(ValueError):
        S.kmeans(X[:2], 3)


def test_encode_recovers_coefficients():
    Z, Y, A = planted(k=3, d=30)
    Yhat = S.encode(Z, A, n_iter=200)
    assert (Yhat >= 0).all()
    assert float((A - Z @ Yhat).norm() / A.norm()) < 0.02


def test_auroc_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(200, generator=g) < 0.3
    scores = torch.randn(200, 3, generator=g) + labels[:, None] * torch.tensor([0.0, 1.0, 3.0])
    scores[:20, 0] = 0.0  # ties
    got = S.auroc(scores, labels)
    for j in range(3):
        assert got[j].item() == pytest.approx(roc_auc_score(labels.numpy(), scores[:, j].numpy()), abs=1e-6)
    assert S.auroc(scores[:, 2], labels).shape == ()
    with pytest.raises(ValueError):
        S.auroc(scores, torch.zeros(200, dtype=torch.bool))


def test_feature_directions():
    W_out = torch.randn(6, 4)
    Z = torch.zeros(6, 2)
    Z[1, 0], Z[3, 1], Z[4, 1] = 2.0, 1.0, -1.0
    F = S.feature_directions(W_out, Z)
    torch.testing.assert_close(F[0], 2 * W_out[1])
    torch.testing.assert_close(F[1], W_out[3] - W_out[4])
