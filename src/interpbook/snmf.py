"""Semi-nonnegative matrix factorisation of MLP activations (Shafran et al., 2025), and
the baselines the book compares it with (book chapter ``05-mlp-layers``).

Collect the MLP activations (``mlp_act``) of ``n`` tokens as the columns of
``A in R^{d_mlp x n}`` and factor ``A ~ Z Y`` with

* ``Z in R^{d_mlp x k}`` unconstrained in sign but *sparse*: after every update only
  the largest ``keep`` fraction of each column (by magnitude) survives (a hard
  winner-take-all), so each feature is a small group of co-activated neurons; its
  residual-stream direction is ``z W_out`` (a mix of those neurons' values);
* ``Y in R^{k x n}_{>=0}``: how much of each feature each token contains (non-negative,
  so features add up, like the neuron terms ``m_i v_i`` of the MLP output).

The updates are the semi-NMF rules of Ding, Li and Jordan (2010): ``Z`` in closed form
(least squares given ``Y``), ``Y`` by a multiplicative step that keeps it non-negative::

    Z <- A Y^T (Y Y^T)^{-1}
    Y <- Y * sqrt(([Z^T A]^+ + [Z^T Z]^- Y) / ([Z^T A]^- + [Z^T Z]^+ Y))

with ``[X]^+ = (|X| + X) / 2`` and ``[X]^- = (|X| - X) / 2``; the rows of ``Y`` are
rescaled to unit norm after each ``Z`` step (``Z`` absorbs the scale). Initialisation
from k-means, as in the paper; k-means itself is the special case where every column of
``Y`` is one-hot, which makes it the natural unsupervised baseline here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "SNMF", "positive_part", "negative_part", "update_Z", "winner_take_all", "update_Y",
    "snmf", "relative_error", "kmeans", "encode", "auroc", "feature_directions",
]


def positive_part(X: torch.Tensor) -> torch.Tensor:
    """``[X]^+ = (|X| + X) / 2``"""
    return (X.abs() + X) / 2


def negative_part(X: torch.Tensor) -> torch.Tensor:
    """``[X]^- = (|X| - X) / 2`` (non-negative; ``X = [X]^+ - [X]^-``)"""
    return (X.abs() - X) / 2


def update_Z(A: torch.Tensor, Y: torch.Tensor, reg: float = 1e-6) -> torch.Tensor:
    """Least-squares ``Z`` for fixed ``Y``: ``A Y^T (Y Y^T + reg I)^{-1}`` ``[d, k]``."""
    k = Y.shape[0]
    gram = Y @ Y.T + reg * torch.eye(k, dtype=Y.dtype, device=Y.device)
    return torch.linalg.solve(gram, Y @ A.T).T


def winner_take_all(Z: torch.Tensor, keep: float) -> torch.Tensor:
    """Zero all but the ``ceil(keep * d)`` largest-magnitude entries of each column."""
    d = Z.shape[0]
    m = max(1, math.ceil(keep * d))
    idx = Z.abs().topk(m, dim=0).indices
    return torch.zeros_like(Z).scatter_(0, idx, Z.gather(0, idx))


def update_Y(A: torch.Tensor, Z: torch.Tensor, Y: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """One multiplicative semi-NMF step for ``Y >= 0`` with ``Z`` fixed (Ding et al., 2010)."""
    return _multiplicative_step(Z.T @ A, Z.T @ Z, Y, eps)


def _multiplicative_step(ZtA: torch.Tensor, ZtZ: torch.Tensor, Y: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """:func:`update_Y` from the precomputed products ``Z^T A`` and ``Z^T Z``."""
    numer = positive_part(ZtA) + negative_part(ZtZ) @ Y
    denom = negative_part(ZtA) + positive_part(ZtZ) @ Y
    return Y * torch.sqrt(numer / (denom + eps))


@dataclass
class SNMF:
    """A fitted factorisation ``A ~ Z Y``: ``Z`` ``[d_mlp, k]`` (sparse columns = features),
    ``Y`` ``[k, n]`` (>= 0), the relative reconstruction error ``||A - ZY|| / ||A||`` after
    each iteration, and whether the stopping rule (not the iteration cap) ended the fit."""

    Z: torch.Tensor
    Y: torch.Tensor
    errors: list[float] = field(default_factory=list)
    converged: bool = False

    @property
    def k(self) -> int:
        return self.Z.shape[1]

    @property
    def error(self) -> float:
        """The relative error of the returned (best) iterate."""
        return min(self.errors)

    def support(self, feature: int) -> torch.Tensor:
        """The neurons a feature uses (its non-zero entries)."""
        return self.Z[:, feature].nonzero()[:, 0]


def relative_error(A: torch.Tensor, Z: torch.Tensor, Y: torch.Tensor) -> float:
    """``||A - Z Y|| / ||A||`` (Frobenius)."""
    return float((A - Z @ Y).norm() / A.norm())


def _relative_error_from(sq_norm_A: float, ZtA: torch.Tensor, ZtZ: torch.Tensor, Y: torch.Tensor) -> float:
    """``||A - ZY|| / ||A||`` from ``Z^T A`` and ``Z^T Z``, without forming ``ZY``:
    ``||A - ZY||^2 = ||A||^2 - 2 <Z^T A, Y> + <Z^T Z Y, Y>``."""
    sq = sq_norm_A - 2 * float((ZtA.double() * Y.double()).sum()) + float(((ZtZ.double() @ Y.double()) * Y.double()).sum())
    return math.sqrt(max(sq, 0.0) / sq_norm_A)


def kmeans(X: torch.Tensor, k: int, *, n_iter: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (Lloyd) on the rows of ``X`` ``[n, d]``: ``(centroids [k, d], labels [n])``.

    Initial centres are ``k`` distinct rows drawn with ``seed``; stops when no label
    changes, or after ``n_iter`` rounds. An empty cluster is re-seeded with the point
    farthest from its centre.
    """
    n = X.shape[0]
    if k > n:
        raise ValueError(f"k={k} clusters need at least k points, got {n}")
    g = torch.Generator().manual_seed(seed)
    x2 = (X * X).sum(1, keepdim=True)
    sq_dist = lambda C: (x2 - 2 * X @ C.T + (C * C).sum(1)[None]).clamp(min=0)  # noqa: E731
    C = X[torch.randperm(n, generator=g)[:k]].clone()
    labels = None
    for _ in range(n_iter):
        dist = sq_dist(C)
        new = dist.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        C = torch.zeros_like(C).index_add_(0, labels, X) / counts.clamp(min=1)[:, None]
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):
            far = dist.gather(1, labels[:, None])[:, 0].topk(len(empty)).indices
            C[empty] = X[far]
    return C, sq_dist(C).argmin(1)


def snmf(A: torch.Tensor, k: int, *, keep: float = 0.05, max_iter: int = 300, y_steps: int = 10,
         init: str = "kmeans", seed: int = 0, tol: float = 1e-4, window: int = 5) -> SNMF:
    """Factor ``A`` ``[d_mlp, n]`` as ``Z Y`` with sparse ``Z`` and ``Y >= 0``.

    ``keep``: fraction of neurons each feature may use (winner-take-all on ``Z``).
    ``init``: ``"kmeans"`` (centroids and one-hot memberships, as in the paper) or
    ``"random"``. Each iteration solves for ``Z`` and then takes ``y_steps``
    multiplicative ``Y`` steps (they share ``Z^T A``, the expensive product, so extra
    steps are nearly free and the fit converges in far fewer iterations).

    Stopping rule: the fit stops (``converged=True``) once the best error has improved
    by less than a fraction ``tol`` over the last ``window`` iterations; otherwise after
    ``max_iter``. The winner-take-all step is not a descent step, so the error need not
    fall monotonically: the best iterate is returned.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
    if y_steps < 1 or max_iter < 1 or window < 1:
        raise ValueError(f"y_steps, max_iter and window must be >= 1, got {y_steps}, {max_iter}, {window}")
    A = A.float()
    d, n = A.shape
    g = torch.Generator().manual_seed(seed)
    if init == "kmeans":
        _, labels = kmeans(A.T, k, seed=seed)
        Y = torch.full((k, n), 0.05)  # one-hot memberships; no exact zeros (they would stay zero)
        Y[labels, torch.arange(n)] = 1.0
    elif init == "random":
        Y = torch.rand(k, n, generator=g) + 1e-3
    else:
        raise ValueError(f"init must be 'kmeans' or 'random', got {init!r}")
    sq_norm_A = float(A.double().pow(2).sum())
    best, errors, converged = None, [], False
    for _ in range(max_iter):
        Z = winner_take_all(update_Z(A, Y), keep)
        scale = Y.norm(dim=1).clamp(min=1e-12)
        Y, Z = Y / scale[:, None], Z * scale[None]
        ZtA, ZtZ = Z.T @ A, Z.T @ Z
        for _ in range(y_steps):
            Y = _multiplicative_step(ZtA, ZtZ, Y)
        errors.append(_relative_error_from(sq_norm_A, ZtA, ZtZ, Y))
        if best is None or errors[-1] < best[0]:
            best = (errors[-1], Z.clone(), Y.clone())
        if len(errors) > window:
            before = min(errors[:-window])
            if before - best[0] < tol * before:
                converged = True
                break
    return SNMF(best[1], best[2], errors, converged)


def encode(Z: torch.Tensor, A: torch.Tensor, *, n_iter: int = 50) -> torch.Tensor:
    """Non-negative coefficients ``Y`` ``[k, n]`` of new activations ``A`` ``[d, n]`` in a
    fixed dictionary ``Z`` (semi-NMF ``Y`` steps, started from the least-squares fit
    clipped at zero). Used to read SNMF and k-means features on held-out text."""
    A = A.float()
    Y = torch.linalg.lstsq(Z, A).solution.clamp(min=0) + 1e-4
    ZtA, ZtZ = Z.T @ A, Z.T @ Z
    for _ in range(n_iter):
        Y = _multiplicative_step(ZtA, ZtZ, Y)
    return Y


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of ``scores`` ``[n, ...]`` for boolean ``labels`` ``[n]``,
    per trailing column (ties count one half). 0.5 is chance, 1 is perfect detection."""
    labels = labels.bool()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        raise ValueError("auroc needs both positive and negative examples")
    s = scores.float().reshape(scores.shape[0], -1)
    # average ranks (1-based) with ties
    order = s.argsort(0)
    ranks = torch.empty_like(s)
    ar = torch.arange(1, s.shape[0] + 1, dtype=s.dtype)[:, None].expand_as(s)
    ranks.scatter_(0, order, ar)
    sorted_s = s.gather(0, order)
    # tie correction: for runs of equal values, replace ranks by their mean
    for j in range(s.shape[1]):
        vals, inv, counts = torch.unique_consecutive(sorted_s[:, j], return_inverse=True, return_counts=True)
        if len(vals) < s.shape[0]:
            csum = counts.cumsum(0).to(s.dtype)
            mean_rank = csum - (counts.to(s.dtype) - 1) / 2
            ranks[order[:, j], j] = mean_rank[inv]
    u = ranks[labels].sum(0) - pos * (pos + 1) / 2
    return (u / (pos * neg)).reshape(scores.shape[1:])


def feature_directions(W_out: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """Residual-stream direction of each MLP-space feature: ``Z^T W_out`` ``[k, d_model]``
    (``W_out`` ``[d_mlp, d_model]``; a feature is a signed mix of the neurons' values)."""
    return Z.T.float() @ W_out.float()
