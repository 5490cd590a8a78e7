"""Concept geometry in the unembedding space under the causal inner product.

Park et al. (*The Linear Representation Hypothesis and the Geometry of Large Language
Models*; *The Geometry of Categorical and Hierarchical Concepts in Large Language Models*)
read concepts off the unembedding vectors ``γ(y)`` of the tokens ``y``. They choose the
inner product that makes the unembedding whitened, ``g(y) = Cov(γ)^{-1/2} (γ(y) - E[γ])``
(the *causal inner product*), estimate a concept's vector from the ``g`` of its words, and
test that hierarchy is orthogonality: ``ℓ_parent ⟂ ℓ_child - ℓ_parent``.

Used by the *Concept geometry* page of Week 7::

    ids = word_token_ids(model)                    # a frequent-word vocabulary
    basis = causal_basis(unembedding_vectors(model, ids))
    g = basis.whiten(unembedding_vectors(model, single_token_ids(model, words)[0]))
    ell = concept_vector(g)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from .snmf import auroc

__all__ = [
    "CausalBasis", "causal_basis", "unembedding_vectors", "word_token_ids", "single_token_ids",
    "ledoit_wolf", "concept_vector", "hierarchy_cosine", "random_nested_cosines", "concept_auroc",
    "difference_auroc", "counterfactual_direction", "pair_accuracy",
]

_WORD = re.compile(r" [A-Za-z]{2,}")


@dataclass
class CausalBasis:
    """The whitening ``g = A (γ - mean)`` with ``A = Cov(γ)^{-1/2}`` (symmetric).

    In these coordinates the causal inner product is the plain dot product.
    """

    mean: torch.Tensor  #: E[γ] over the vocabulary used ``[d]``
    A: torch.Tensor  #: Cov(γ)^{-1/2} ``[d, d]``

    def whiten(self, gamma: torch.Tensor) -> torch.Tensor:
        """Whitened coordinates ``g`` of unembedding vectors ``gamma`` ``[n, d]``."""
        return (gamma.double() - self.mean) @ self.A

    def to_residual(self, ell: torch.Tensor) -> torch.Tensor:
        """The (normalised) residual-stream direction whose effect on every logit is the
        causal inner product with ``ell``: adding ``A ell`` changes ``logit(y)`` by
        ``ell · g(y)`` up to a constant shared by all tokens."""
        return ell.double() @ self.A


def causal_basis(gamma: torch.Tensor, eps: float = 1e-8) -> CausalBasis:
    """Fit the whitening to unembedding vectors ``gamma`` ``[n, d]`` (one row per token).

    Raises ``ValueError`` when there are not more vectors than dimensions (the covariance
    would be singular) or the covariance is not positive definite.
    """
    if gamma.ndim != 2:
        raise ValueError(f"causal_basis needs a [tokens, d_model] matrix, got shape {tuple(gamma.shape)}.")
    n, d = gamma.shape
    if n <= d:
        raise ValueError(f"causal_basis needs more vectors than dimensions to estimate Cov(γ): got {n} vectors "
                         f"of dimension {d}. Use a larger vocabulary subset.")
    x = gamma.double()
    mean = x.mean(0)
    cov = torch.cov(x.T)
    evals, evecs = torch.linalg.eigh(cov)
    if evals.min() <= eps * evals.max():
        raise ValueError("Cov(γ) is (numerically) singular: the vectors span fewer than d_model directions.")
    A = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return CausalBasis(mean=mean, A=(A + A.T) / 2)


def unembedding_vectors(model, token_ids: Sequence[int]) -> torch.Tensor:
    """The unembedding vectors ``γ(y)`` ``[n, d]`` of ``token_ids``, with the final norm's gain
    folded in (``diag(gain) W_U``), so that a logit is ``(x / rms(x)) · γ(y)`` for the residual
    ``x``: then a direction in γ-space maps back to a residual-stream direction. Only the
    needed columns are folded (Gemma's vocabulary is 262k)."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("unembedding_vectors needs at least one token id.")
    anatomy = model.anatomy
    with torch.no_grad():
        gain = anatomy.norm_gain(anatomy.final_norm())
        return (anatomy.W_U[:, ids] * gain[:, None]).T.double()


def word_token_ids(model, max_tokens: int = 20000, seed: int = 0) -> list[int]:
    """Vocabulary ids whose token is a space plus two or more ASCII letters (``" house"``),
    at most ``max_tokens`` of them (a seeded sample when there are more): the vocabulary
    over which the causal basis is estimated, so that it describes words, not code pieces
    or byte fragments."""
    tok = model.tokenizer
    vocab = model.anatomy.W_U.shape[1]
    strings = tok.batch_decode([[i] for i in range(vocab)])
    ids = [i for i, s in enumerate(strings) if _WORD.fullmatch(s)]
    if len(ids) > max_tokens:
        pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:max_tokens]
        ids = sorted(ids[i] for i in pick.tolist())
    return ids


def single_token_ids(model, words: Sequence[str]) -> tuple[list[int], list[str]]:
    """Ids of ``" " + word`` for the words that are a single token that way, and the words kept.

    Raises ``ValueError`` for an empty list or when none is a single token."""
    words = list(words)
    if not words:
        raise ValueError("single_token_ids got no words.")
    ids, kept = [], []
    for w in words:
        piece = model.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if len(piece) == 1:
            ids.append(piece[0])
            kept.append(w)
    if not ids:
        raise ValueError(f"None of the {len(words)} words (e.g. {words[0]!r}) is a single token after a space "
                         "for this tokenizer; the unembedding method needs one row per word.")
    return ids, kept


def _shrinkage(gram: torch.Tensor, d: int) -> tuple[float, torch.Tensor]:
    """Ledoit-Wolf intensity ``s`` and target scale ``mu = tr S / d`` from the Gram matrix
    ``X Xᵀ`` of ``n`` centred rows (cheaper than ``S = Xᵀ X / n`` when ``n < d``)."""
    n = gram.shape[0]
    trace_S = torch.trace(gram) / n
    mu = trace_S / d
    frob_S = (gram ** 2).sum() / n ** 2
    beta = ((torch.diagonal(gram) ** 2).sum() / n - frob_S) / n  # spread of the rank-one terms around S
    delta = frob_S - 2 * mu * trace_S + d * mu ** 2  # ||S - mu I||_F^2
    s = 0.0 if delta <= 0 else float(torch.clamp(beta / delta, 0.0, 1.0))
    return s, mu


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance of the rows of ``x`` ``[n, d]`` and the shrinkage in [0, 1]:
    ``(1 - s) S + s (tr S / d) I``. Needed because a concept has fewer words than dimensions."""
    n, d = x.shape
    xc = x - x.mean(0)
    s, mu = _shrinkage(xc @ xc.T, d)
    return (1 - s) * (xc.T @ xc / n) + s * mu * torch.eye(d, dtype=x.dtype), s


def concept_vector(g: torch.Tensor) -> torch.Tensor:
    """Park et al.'s vector ``ℓ_w`` of a concept from the whitened unembeddings ``g`` ``[n, d]``
    of its words: the LDA-like direction ``w ∝ Cov(g_w)^{-1} E[g_w]`` (Ledoit-Wolf shrunk),
    scaled so that the members' mean projection is its length, ``ℓ_w = (w · E[g_w]) w``.

    With fewer words than dimensions the solve goes through the ``n × n`` Gram matrix
    (Woodbury identity), which gives the same ``w`` far faster."""
    if g.ndim != 2 or g.shape[0] < 2:
        raise ValueError(f"concept_vector needs the vectors of at least 2 words as [n, d]; got shape {tuple(g.shape)}.")
    g = g.double()
    n, d = g.shape
    mean = g.mean(0)
    xc = g - mean
    gram = xc @ xc.T
    s, mu = _shrinkage(gram, d)
    if n < d and s > 0:  # (s mu I + (1-s)/n XᵀX)^{-1} m  ∝  m - Xᵀ (s mu n/(1-s) I + X Xᵀ)^{-1} X m
        ridge = s * mu * n / (1 - s) if s < 1 else torch.inf
        w = mean if s == 1 else mean - xc.T @ torch.linalg.solve(gram + ridge * torch.eye(n, dtype=g.dtype), xc @ mean)
    else:
        w = torch.linalg.solve((1 - s) * (xc.T @ xc / n) + s * mu * torch.eye(d, dtype=g.dtype), mean)
    w = w / w.norm()
    return (w @ mean) * w


def hierarchy_cosine(parent: torch.Tensor, child: torch.Tensor) -> float:
    """``cos(ℓ_parent, ℓ_child - ℓ_parent)``: 0 when the child adds only an orthogonal part."""
    diff = child - parent
    return float(parent @ diff / (parent.norm() * diff.norm()))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_nested_cosines(pool: torch.Tensor, n_parent: int, n_child: int, draws: int = 20,
                          seed: int = 0) -> torch.Tensor:
    """The hierarchy cosine of random nested word sets (the control): a random parent of
    ``n_parent`` rows of ``pool`` and a random child of ``n_child`` of those, ``draws`` times."""
    if not 2 <= n_child < n_parent <= pool.shape[0]:
        raise ValueError(f"need 2 <= n_child < n_parent <= {pool.shape[0]} (pool size); got {n_child}, {n_parent}.")
    gen, out = _generator(seed), []
    for _ in range(draws):
        parent = torch.randperm(pool.shape[0], generator=gen)[:n_parent]
        child = parent[torch.randperm(n_parent, generator=gen)[:n_child]]
        out.append(hierarchy_cosine(concept_vector(pool[parent]), concept_vector(pool[child])))
    return torch.tensor(out)


def _halves(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return perm[: n // 2], perm[n // 2:]


def concept_auroc(members: torch.Tensor, others: torch.Tensor, seed: int = 0) -> float:
    """Held-out separability of a concept: estimate ``ℓ`` on half of the ``members``' vectors,
    then the AUROC of the projections of the other half against half of ``others``."""
    if members.shape[0] < 4 or others.shape[0] < 2:
        raise ValueError("concept_auroc needs at least 4 members and 2 non-members.")
    gen = _generator(seed)
    train, test = _halves(members.shape[0], gen)
    _, others_test = _halves(others.shape[0], gen)
    ell = concept_vector(members[train])
    scores = torch.cat([members[test] @ ell, others[others_test] @ ell])
    labels = torch.cat([torch.ones(len(test)), torch.zeros(len(others_test))]).bool()
    return float(auroc(scores, labels))


def difference_auroc(parent: torch.Tensor, is_child: torch.Tensor, seed: int = 0) -> float:
    """Does ``ℓ_child - ℓ_parent`` pick out the child among the parent's words? Both vectors are
    estimated on the same random half of the parent's words (the child's part of that half);
    returns the AUROC of held-out child words against held-out other parent words."""
    is_child = is_child.bool()
    if parent.shape[0] != is_child.shape[0]:
        raise ValueError("is_child must have one entry per parent word.")
    gen = _generator(seed)
    train, test = _halves(parent.shape[0], gen)
    child_train = train[is_child[train]]
    if len(child_train) < 2 or is_child[test].all() or not is_child[test].any():
        raise ValueError("difference_auroc needs child and non-child words in both halves of the parent.")
    diff = concept_vector(parent[child_train]) - concept_vector(parent[train])
    return float(auroc(parent[test] @ diff, is_child[test]))


def counterfactual_direction(base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The unit direction of a concept with natural pairs (male → female): the mean of the
    whitened differences ``g(target) - g(base)`` over the pairs (rows)."""
    if base.shape != target.shape or base.shape[0] == 0:
        raise ValueError("counterfactual_direction needs two equally shaped, non-empty [pairs, d] matrices.")
    d = (target - base).double().mean(0)
    return d / d.norm()


def pair_accuracy(direction: torch.Tensor, base: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of pairs whose target word projects further along ``direction`` than its base word."""
    return float(((target - base).double() @ direction.double() > 0).double().mean())
