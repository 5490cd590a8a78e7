"""Week 7 exercise checks: right answers pass, usual slips fail with a message."""

import pytest
import torch

from interpbook.exercises import CheckFailed
from interpbook.exercises import week07 as w


def topk_sae(x, W_enc, b_enc, W_dec, b_dec, k):
    pre = (x - b_dec) @ W_enc + b_enc
    v, i = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, i, v.relu())
    return z, z @ W_dec + b_dec


def test_topk_sae():
    w.check_topk_sae(topk_sae)

    def no_bias(x, W_enc, b_enc, W_dec, b_dec, k):  # forgot to subtract b_dec
        return topk_sae(x + b_dec, W_enc, b_enc, W_dec, b_dec, k)

    with pytest.raises(CheckFailed, match="b_dec"):
        w.check_topk_sae(no_bias)

    def absolute(x, W_enc, b_enc, W_dec, b_dec, k):  # keeps the largest |pre|, sign kept
        pre = (x - b_dec) @ W_enc + b_enc
        i = pre.abs().topk(k, dim=-1).indices
        z = torch.zeros_like(pre).scatter(-1, i, pre.gather(-1, i))
        return z, z @ W_dec + b_dec

    with pytest.raises(CheckFailed, match="non-negative"):
        w.check_topk_sae(absolute)

    def dense(x, W_enc, b_enc, W_dec, b_dec, k):  # a ReLU autoencoder, no TopK
        z = ((x - b_dec) @ W_enc + b_enc).relu()
        return z, z @ W_dec + b_dec

    with pytest.raises(CheckFailed, match="non-zero latents"):
        w.check_topk_sae(dense)
    with pytest.raises(CheckFailed, match="no function"):
        w.check_topk_sae(...)


def test_fvu():
    w.check_fvu(lambda x, xh: ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    with pytest.raises(CheckFailed, match="mean squared error"):
        w.check_fvu(lambda x, xh: ((x - xh) ** 2).mean())
    with pytest.raises(CheckFailed, match="centre"):
        w.check_fvu(lambda x, xh: ((x - xh) ** 2).sum() / (x ** 2).sum())


def test_sae_beats_pca():
    g = torch.Generator().manual_seed(0)
    # sparse data: each point is one of 40 directions times a positive scale, plus a little noise
    dirs = torch.randn(40, 16, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    which = torch.randint(40, (600,), generator=g)
    acts = dirs[which] * (1 + torch.rand(600, 1, generator=g)) + 0.01 * torch.randn(600, 16, generator=g)
    train, test = acts[:400], acts[400:]
    zero = torch.zeros(16)

    def dictionary(x):  # the true sparse code: one active latent per point
        z = (x @ dirs.T).relu()
        v, i = z.topk(1, dim=-1)
        z = torch.zeros_like(z).scatter(-1, i, v)
        return z, z @ dirs

    w.check_sae_beats_pca(dictionary, train, test, k=1)
    with pytest.raises(CheckFailed, match="not below PCA"):
        w.check_sae_beats_pca(lambda x: (torch.zeros(len(x), 40), zero.expand_as(x)), train, test, k=1)
    with pytest.raises(CheckFailed, match="active latents"):
        w.check_sae_beats_pca(lambda x: ((x @ dirs.T).relu(), x), train, test, k=1)


def test_l1_sae_loss():
    def right(x, W_enc, b_enc, W_dec, b_dec, c):
        f = ((x - b_dec) @ W_enc + b_enc).relu()
        mse = ((x - f @ W_dec - b_dec) ** 2).sum(-1).mean()
        l1 = f.sum(-1).mean()
        return mse + c * l1, mse, l1

    w.check_l1_sae_loss(right)

    def mean_mse(x, W_enc, b_enc, W_dec, b_dec, c):  # mean over dimensions too
        loss, mse, l1 = right(x, W_enc, b_enc, W_dec, b_dec, c)
        return mse / x.shape[1] + c * l1, mse / x.shape[1], l1

    with pytest.raises(CheckFailed, match="mse"):
        w.check_l1_sae_loss(mean_mse)

    def minus(x, W_enc, b_enc, W_dec, b_dec, c):  # sign slip in the loss
        loss, mse, l1 = right(x, W_enc, b_enc, W_dec, b_dec, c)
        return mse - c * l1, mse, l1

    with pytest.raises(CheckFailed, match="loss = mse"):
        w.check_l1_sae_loss(minus)


def test_dead_fraction():
    w.check_dead_fraction(lambda z: ((z > 0).sum(0) == 0).float().mean())
    with pytest.raises(CheckFailed, match="every"):
        w.check_dead_fraction(lambda z: (z == 0).float().mean())


def test_causal_whiten():
    w.check_causal_whiten(w._reference_causal_whiten)

    def cholesky(gamma):  # another valid whitening: same inner products
        c = gamma - gamma.mean(0)
        L = torch.linalg.cholesky(c.T @ c / len(c))
        return torch.linalg.solve_triangular(L, c.T, upper=False).T

    w.check_causal_whiten(cholesky)
    with pytest.raises(CheckFailed, match="centred"):
        w.check_causal_whiten(lambda gamma: gamma @ torch.linalg.inv(torch.linalg.cholesky(gamma.T @ gamma / len(gamma))).T)

    def over(gamma):  # Cov^-1 instead of Cov^-1/2
        c = gamma - gamma.mean(0)
        return c @ torch.linalg.inv(c.T @ c / len(c))

    with pytest.raises(CheckFailed, match="identity"):
        w.check_causal_whiten(over)


def test_hierarchy_cosine():
    g = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    parent, child = list(range(20)), list(range(5))
    cos = torch.nn.functional.cosine_similarity

    def right(g, p, c):
        return cos(g[p].mean(0), g[c].mean(0) - g[p].mean(0), dim=0)

    w.check_hierarchy_cosine(right, g, parent, child)
    with pytest.raises(CheckFailed, match="sign"):
        w.check_hierarchy_cosine(lambda g, p, c: -right(g, p, c), g, parent, child)
    with pytest.raises(CheckFailed, match="difference"):
        w.check_hierarchy_cosine(lambda g, p, c: cos(g[p].mean(0), g[c].mean(0), dim=0), g, parent, child)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_geometry_checks_on_a_tiny_model(family):
    """The exercise-3 pipeline on a tiny random model's unembedding: the reference passes, a
    sign flip and a skipped whitening fail."""
    from tiny_models import tiny_model

    model = tiny_model(family)
    gamma = model.anatomy.W_U.detach().float().T
    g = w._reference_causal_whiten(gamma)
    assert torch.allclose(g.T @ g / len(g), torch.eye(g.shape[1]), atol=1e-3)
    parent, child = list(range(0, 40)), list(range(0, 12))

    def right(g, p, c):
        return torch.nn.functional.cosine_similarity(g[p].mean(0), g[c].mean(0) - g[p].mean(0), dim=0)

    w.check_hierarchy_cosine(right, g, parent, child)
    with pytest.raises(CheckFailed, match="sign"):
        w.check_hierarchy_cosine(lambda g, p, c: -right(g, p, c), g, parent, child)
    with pytest.raises(CheckFailed, match="expected"):  # the raw unembedding instead of the whitened one
        w.check_hierarchy_cosine(lambda g_, p, c: right(gamma, p, c), g, parent, child)
