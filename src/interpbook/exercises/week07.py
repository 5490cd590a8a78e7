"""Checks for the Week 7 exercises (book chapter ``07-feature-representations``, page *Exercises*).

Exercise 1 builds a TopK sparse autoencoder (forward pass, FVU, training) and checks the
trained one against PCA with as many dimensions as the autoencoder has active latents.
Exercise 2 computes an L1 autoencoder's loss and its dead-latent fraction. Exercise 3
whitens the unembedding (the causal inner product) and measures hierarchical
orthogonality. The references are private to this module (``_reference_*``), written
with plain torch, so a reader cannot import the answer under the name they write, and
they do not use :mod:`interpbook.sae`.
"""

from __future__ import annotations

import torch

from . import CheckFailed, CheckResult, as_array

__all__ = [
    "check_topk_sae", "check_fvu", "check_sae_beats_pca", "check_l1_sae_loss", "check_dead_fraction",
    "check_causal_whiten", "check_hierarchy_cosine",
]


def _missing(ex: str, answer: object, what: str) -> None:
    if answer is None or answer is Ellipsis:
        raise CheckFailed(f"{ex}: no {what} yet; replace the `...`")


def _random_sae(seed: int = 0, n: int = 12, d: int = 10, d_sae: int = 24) -> dict[str, torch.Tensor]:
    """A small random autoencoder with unit-norm decoder rows and non-zero biases, and inputs."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d, generator=g)
    return dict(x=torch.randn(n, d, generator=g) * 2 + 1, W_enc=torch.randn(d, d_sae, generator=g),
                b_enc=torch.randn(d_sae, generator=g) * 0.5, W_dec=W_dec / W_dec.norm(dim=1, keepdim=True),
                b_dec=torch.randn(d, generator=g))


def _reference_topk_sae(x, W_enc, b_enc, W_dec, b_dec, k):
    pre = (x - b_dec) @ W_enc + b_enc
    values, indices = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return z, z @ W_dec + b_dec


def _reference_fvu(x, x_hat):
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _tensor(value, name: str) -> torch.Tensor:
    return torch.as_tensor(as_array(value, name), dtype=torch.float32)


def check_topk_sae(topk_sae) -> CheckResult:
    """Exercise 1a: ``topk_sae(x, W_enc, b_enc, W_dec, b_dec, k)`` returns ``(z, x_hat)``:
    the latents (the ``k`` largest pre-activations of ``(x - b_dec) @ W_enc + b_enc``, made
    non-negative, the rest zero) and the reconstruction ``z @ W_dec + b_dec``."""
    ex = "Exercise 1a (TopK autoencoder forward)"
    _missing(ex, topk_sae, "function")
    p = _random_sae()
    k = 4
    with torch.no_grad():
        out = topk_sae(p["x"], p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], k)
    if not isinstance(out, tuple) or len(out) != 2:
        raise CheckFailed(f"{ex}: return a pair (z, x_hat)")
    z, x_hat = _tensor(out[0], "z"), _tensor(out[1], "x_hat")
    z_ref, x_ref = _reference_topk_sae(p["x"], p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], k)
    if z.shape != z_ref.shape:
        raise CheckFailed(f"{ex}: z should have shape {tuple(z_ref.shape)} [tokens, d_sae], got {tuple(z.shape)}")
    active = (z != 0).sum(-1)
    if int(active.max()) > k:
        raise CheckFailed(f"{ex}: a token has {int(active.max())} non-zero latents; keep at most k={k}")
    if (z < 0).any():
        raise CheckFailed(f"{ex}: latents must be non-negative (apply a ReLU to the k kept values)")
    if torch.allclose(z, z_ref, atol=1e-4) and torch.allclose(x_hat, x_ref, atol=1e-4):
        return CheckResult(ex, f"latents and reconstruction match (k={k} of {z.shape[1]} latents)")
    pre_abs = p["x"] @ p["W_enc"] + p["b_enc"]
    v, i = pre_abs.topk(k, dim=-1)
    if torch.allclose(z, torch.zeros_like(pre_abs).scatter(-1, i, v.relu()), atol=1e-4):
        raise CheckFailed(f"{ex}: subtract the decoder bias b_dec from x before encoding")
    if torch.allclose(z, z_ref, atol=1e-4):
        raise CheckFailed(f"{ex}: the latents are right but x_hat is not; decode as z @ W_dec + b_dec")
    raise CheckFailed(f"{ex}: the latents differ from the reference (largest difference "
                      f"{float((z - z_ref).abs().max()):.3g}); keep the k *largest* pre-activations, not "
                      "the largest in absolute value")


def check_fvu(fvu) -> CheckResult:
    """Exercise 1b: ``fvu(x, x_hat)``, the fraction of variance unexplained: the summed squared
    error divided by the summed squared deviation of ``x`` from its mean over tokens."""
    ex = "Exercise 1b (fraction of variance unexplained)"
    _missing(ex, fvu, "function")
    p = _random_sae(seed=1)
    x = p["x"]
    x_hat = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    want = _reference_fvu(x, x_hat)
    got = float(as_array(fvu(x, x_hat), "your FVU"))
    if abs(got - want) <= 1e-4 * max(1.0, want):
        perfect = float(as_array(fvu(x, x.clone()), "your FVU"))
        mean_only = float(as_array(fvu(x, x.mean(0).expand_as(x)), "your FVU"))
        if abs(perfect) > 1e-6 or abs(mean_only - 1) > 1e-4:
            raise CheckFailed(f"{ex}: a perfect reconstruction should give 0 and the mean 1; got {perfect:.3g} and "
                              f"{mean_only:.3g}")
        return CheckResult(ex, f"FVU {want:.4f}; 0 for a perfect reconstruction, 1 for the mean")
    mse = float(((x - x_hat) ** 2).mean())
    if abs(got - mse) < 1e-5:
        raise CheckFailed(f"{ex}: that is the plain mean squared error ({mse:.4f}); divide the squared error by the "
                          "variance of x around its mean so that the number has no units")
    raw = float(((x - x_hat) ** 2).sum() / (x ** 2).sum())
    if abs(got - raw) < 1e-5:
        raise CheckFailed(f"{ex}: you divided by the squared norm of x; centre x on its mean over tokens first")
    raise CheckFailed(f"{ex}: expected {want:.4f}, got {got:.4f}")


def _pca_fvu(train: torch.Tensor, test: torch.Tensor, k: int) -> float:
    """FVU on ``test`` of the best rank-``k`` affine reconstruction fitted on ``train`` (PCA)."""
    mean = train.mean(0)
    basis = torch.linalg.svd(train - mean, full_matrices=False).Vh[:k]
    return _reference_fvu(test, (test - mean) @ basis.T @ basis + mean)


def check_sae_beats_pca(sae_forward, train: torch.Tensor, test: torch.Tensor, k: int) -> CheckResult:
    """Exercise 1c: the trained ``sae_forward(x) -> (z, x_hat)`` keeps at most ``k`` active
    latents per token and explains more of the variance of the held-out ``test``
    activations than PCA with ``k`` components fitted on ``train``: the same number of
    active dimensions per token, but chosen per token instead of once for all."""
    ex = "Exercise 1c (a trained TopK autoencoder)"
    _missing(ex, sae_forward, "trained autoencoder")
    test = _tensor(test, "test").float()
    with torch.no_grad():
        z, x_hat = sae_forward(test)
    z, x_hat = _tensor(z, "z"), _tensor(x_hat, "x_hat")
    if x_hat.shape != test.shape:
        raise CheckFailed(f"{ex}: x_hat has shape {tuple(x_hat.shape)}, expected {tuple(test.shape)}")
    most = int((z != 0).sum(-1).max())
    if most > k:
        raise CheckFailed(f"{ex}: a token has {most} active latents; a fair comparison with {k} principal "
                          f"components needs at most k={k}")
    ours, pca = _reference_fvu(test, x_hat), _pca_fvu(_tensor(train, "train"), test, k)
    if ours < pca:
        return CheckResult(ex, f"held-out FVU {ours:.3f} with {k} active latents, below PCA with {k} components "
                               f"({pca:.3f})")
    raise CheckFailed(f"{ex}: held-out FVU {ours:.3f} is not below PCA with {k} components ({pca:.3f}). Train "
                      "longer or with a larger learning rate, initialise b_dec at the mean of the activations and "
                      "W_enc as W_dec transposed, and renormalise the decoder rows after each step")


def _reference_l1_sae_loss(x, W_enc, b_enc, W_dec, b_dec, l1_coeff):
    f = ((x - b_dec) @ W_enc + b_enc).relu()
    x_hat = f @ W_dec + b_dec
    mse = ((x - x_hat) ** 2).sum(-1).mean()
    l1 = f.abs().sum(-1).mean()
    return mse + l1_coeff * l1, mse, l1


def check_l1_sae_loss(l1_sae_loss) -> CheckResult:
    """Exercise 2a: ``l1_sae_loss(x, W_enc, b_enc, W_dec, b_dec, l1_coeff)`` returns
    ``(loss, mse, l1)``: latents ``relu((x - b_dec) @ W_enc + b_enc)``; ``mse`` the squared
    error summed over dimensions, averaged over tokens; ``l1`` the latents' L1 norm averaged
    over tokens; ``loss = mse + l1_coeff * l1``."""
    ex = "Exercise 2a (L1 autoencoder loss)"
    _missing(ex, l1_sae_loss, "function")
    p = _random_sae(seed=3)
    args = (p["x"], p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], 0.05)
    with torch.no_grad():
        out = l1_sae_loss(*args)
    if not isinstance(out, tuple) or len(out) != 3:
        raise CheckFailed(f"{ex}: return a triple (loss, mse, l1)")
    got = [float(as_array(v, name)) for v, name in zip(out, ("loss", "mse", "l1"))]
    want = [float(v) for v in _reference_l1_sae_loss(*args)]
    names = ("loss", "mse", "l1")
    wrong = [n for n, g_, w_ in zip(names, got, want) if abs(g_ - w_) > 1e-4 * max(1.0, abs(w_))]
    if not wrong:
        return CheckResult(ex, f"loss {want[0]:.3f} = mse {want[1]:.3f} + 0.05 x l1 {want[2]:.3f}")
    d, d_sae = p["W_enc"].shape
    hints = {"mse": f"sum the squared error over the {d} dimensions and average over tokens (a mean over both "
                    f"is {d} times smaller)",
             "l1": f"sum |z| over the {d_sae} latents and average over tokens",
             "loss": "loss = mse + l1_coeff * l1"}
    raise CheckFailed(f"{ex}: {', '.join(wrong)} differ from the reference "
                      f"({', '.join(f'{n} {g_:.4f} vs {w_:.4f}' for n, g_, w_ in zip(names, got, want))}); "
                      + "; ".join(hints[n] for n in wrong))


def check_dead_fraction(dead_fraction) -> CheckResult:
    """Exercise 2b: ``dead_fraction(z)``, the fraction of latents (columns of ``z [tokens,
    d_sae]``) that are zero on every token."""
    ex = "Exercise 2b (dead latents)"
    _missing(ex, dead_fraction, "function")
    g = torch.Generator().manual_seed(4)
    z = torch.randn(50, 40, generator=g).relu() * (torch.rand(50, 40, generator=g) < 0.1)
    z[:, :10] = 0  # ten latents never fire
    want = float(((z > 0).sum(0) == 0).float().mean())
    got = float(as_array(dead_fraction(z), "your fraction"))
    if abs(got - want) < 1e-6:
        return CheckResult(ex, f"{want:.3f} of the latents are dead in the test batch")
    if abs(got - float((z == 0).float().mean())) < 1e-6:
        raise CheckFailed(f"{ex}: that is the fraction of zero entries ({got:.3f}); a latent is dead only if it "
                          "is zero on *every* token")
    raise CheckFailed(f"{ex}: expected {want:.3f}, got {got:.3f}")


def _reference_causal_whiten(gamma: torch.Tensor) -> torch.Tensor:
    centred = gamma - gamma.mean(0)
    cov = centred.T @ centred / len(gamma)
    evals, evecs = torch.linalg.eigh(cov)
    return centred @ evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T


def _skewed_unembedding(seed: int = 5, vocab: int = 300, d: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, d, generator=g) @ torch.randn(d, d, generator=g) + 3 * torch.randn(d, generator=g)


def check_causal_whiten(causal_whiten) -> CheckResult:
    """Exercise 3a: ``causal_whiten(gamma)`` maps unembedding vectors ``gamma [vocab, d]`` to
    ``g = A (gamma - mean)`` with ``A^T A = Cov(gamma)^{-1}``, so that the Euclidean inner
    product of ``g`` is the causal inner product. Any such ``A`` passes: the check compares
    inner products, which do not depend on the choice."""
    ex = "Exercise 3a (causal whitening)"
    _missing(ex, causal_whiten, "function")
    gamma = _skewed_unembedding()
    with torch.no_grad():
        g = _tensor(causal_whiten(gamma.clone()), "g")
    if g.shape != gamma.shape:
        raise CheckFailed(f"{ex}: g should have shape {tuple(gamma.shape)} [vocab, d], got {tuple(g.shape)}")
    want = _reference_causal_whiten(gamma)
    if torch.allclose(g @ g[:20].T, want @ want[:20].T, atol=1e-3, rtol=1e-3):
        return CheckResult(ex, "inner products match the causal inner product; Cov(g) is the identity")
    if g.mean(0).abs().max() > 1e-3:
        raise CheckFailed(f"{ex}: g is not centred (largest mean {float(g.mean(0).abs().max()):.3g}); subtract the "
                          "mean unembedding vector first")
    cov = g.T @ g / len(g)
    eye = torch.eye(g.shape[1])
    if not torch.allclose(cov, eye, atol=1e-2):
        raise CheckFailed(f"{ex}: Cov(g) should be the identity; its diagonal is "
                          f"{[round(float(v), 3) for v in cov.diagonal()[:4]]}... Multiply by Cov^(-1/2), "
                          "not Cov^(-1) or Cov (and use the population covariance, dividing by vocab)")
    raise CheckFailed(f"{ex}: Cov(g) is the identity but the inner products differ from the reference; whiten "
                      "with the covariance of gamma itself, not a random rotation of it")


def _reference_hierarchy_cosine(g: torch.Tensor, parent_ids, child_ids) -> float:
    parent, child = g[list(parent_ids)].mean(0), g[list(child_ids)].mean(0)
    return float(torch.nn.functional.cosine_similarity(parent, child - parent, dim=0))


def check_hierarchy_cosine(hierarchy_cosine, g: torch.Tensor, parent_ids, child_ids) -> CheckResult:
    """Exercise 3b: ``hierarchy_cosine(g, parent_ids, child_ids)``, the cosine between the
    parent's vector (mean of ``g`` over ``parent_ids``) and the child-minus-parent
    difference (child vector the mean over ``child_ids``)."""
    ex = "Exercise 3b (hierarchical orthogonality)"
    _missing(ex, hierarchy_cosine, "function")
    g = _tensor(g, "g")
    with torch.no_grad():
        got = float(as_array(hierarchy_cosine(g, parent_ids, child_ids), "your cosine"))
    want = _reference_hierarchy_cosine(g, parent_ids, child_ids)
    if abs(got - want) < 1e-4:
        return CheckResult(ex, f"cos(parent, child - parent) = {want:+.3f}")
    child = g[list(child_ids)].mean(0)
    parent = g[list(parent_ids)].mean(0)
    if abs(got - float(torch.nn.functional.cosine_similarity(parent, child, dim=0))) < 1e-4:
        raise CheckFailed(f"{ex}: that is cos(parent, child); the claim is about the *difference* child - parent")
    if abs(got + want) < 1e-4:
        raise CheckFailed(f"{ex}: the sign is flipped; take child - parent, not parent - child")
    raise CheckFailed(f"{ex}: expected {want:+.4f}, got {got:+.4f}")
