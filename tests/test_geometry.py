"""interpbook.geometry: the causal basis, concept vectors and their controls, on synthetic
data where the answer is known, on tiny random models, and on the real model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from interpbook import geometry as geo
from tiny_models import tiny_model


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix + 3.0


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def planted_hierarchy(d=64, n_parent=120, n_child=40, noise=0.3, seed=0):
    """Whitened-like word vectors with a planted parent vector and an orthogonal child offset."""
    gen = torch.Generator().manual_seed(seed)
    parent = 3 * unit(torch.randn(d, generator=gen, dtype=torch.float64))
    offset = torch.randn(d, generator=gen, dtype=torch.float64)
    offset = 3 * unit(offset - (offset @ parent) / (parent @ parent) * parent)
    words = parent + noise * torch.randn(n_parent, d, generator=gen, dtype=torch.float64)
    words[:n_child] += offset
    is_child = torch.zeros(n_parent, dtype=torch.bool)
    is_child[:n_child] = True
    others = torch.randn(500, d, generator=gen, dtype=torch.float64)
    return parent, offset, words, is_child, others


# --- the causal basis --------------------------------------------------------------------
def test_whitening_gives_identity_covariance_and_zero_mean():
    gamma = correlated(2000, 16)
    basis = geo.causal_basis(gamma)
    g = basis.whiten(gamma)
    assert torch.allclose(torch.cov(g.T), torch.eye(16, dtype=g.dtype), atol=1e-8)
    assert g.mean(0).abs().max() < 1e-10
    assert torch.allclose(basis.A, basis.A.T)


def test_to_residual_turns_logit_differences_into_causal_inner_products():
    gamma = correlated(500, 12, seed=1)
    basis = geo.causal_basis(gamma)
    ell = torch.randn(12, dtype=torch.float64)
    lam = basis.to_residual(ell)
    logits = gamma @ lam  # what adding lam to the normalised residual does to each logit
    g = basis.whiten(gamma)
    assert torch.allclose(logits - logits[0], (g - g[0]) @ ell, atol=1e-8)


def test_causal_basis_refuses_too_few_vectors_and_singular_covariance():
    with pytest.raises(ValueError, match="more vectors than dimensions"):
        geo.causal_basis(torch.randn(10, 16))
    flat = torch.randn(100, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        geo.causal_basis(torch.cat([flat, flat[:, :1]], dim=1))
    with pytest.raises(ValueError, match="tokens, d_model"):
        geo.causal_basis(torch.randn(5))


# --- the estimator -----------------------------------------------------------------------
def test_ledoit_wolf_shrinkage_is_in_range_and_keeps_the_trace():
    x = correlated(30, 20)
    cov, s = geo.ledoit_wolf(x)
    assert 0 <= s <= 1
    xc = x - x.mean(0)
    assert torch.isclose(torch.trace(cov), torch.trace(xc.T @ xc / 30))


@pytest.mark.parametrize("n", [10, 50, 200])
def test_concept_vector_matches_the_direct_lda_solve(n):
    """The Gram-matrix shortcut (n < d) and the direct solve (n >= d) give the same vector."""
    g = torch.randn(n, 64, dtype=torch.float64) + torch.linspace(0, 1, 64, dtype=torch.float64)
    cov, _ = geo.ledoit_wolf(g)
    w = unit(torch.linalg.solve(cov, g.mean(0)))
    assert torch.allclose(geo.concept_vector(g), (w @ g.mean(0)) * w, atol=1e-10)


def test_concept_vector_members_project_to_its_length():
    _, _, words, _, _ = planted_hierarchy()
    ell = geo.concept_vector(words)
    assert torch.isclose(words.mean(0) @ unit(ell), ell.norm())


def test_planted_hierarchy_is_recovered_and_orthogonal():
    parent, offset, words, is_child, _ = planted_hierarchy()
    assert float(unit(geo.concept_vector(words[~is_child])) @ unit(parent)) > 0.95
    ell_p, ell_c = geo.concept_vector(words), geo.concept_vector(words[is_child])
    assert float(unit(ell_c - ell_p) @ unit(offset)) > 0.8
    assert abs(geo.hierarchy_cosine(ell_p, ell_c)) < 0.1


def test_hierarchy_cosine_of_planted_vectors():
    p = torch.tensor([1.0, 0.0, 0.0])
    assert geo.hierarchy_cosine(p, p + torch.tensor([0.0, 2.0, 0.0])) == pytest.approx(0.0)
    assert geo.hierarchy_cosine(p, 2 * p) == pytest.approx(1.0)
    assert geo.hierarchy_cosine(p, torch.tensor([0.0, 1.0, 0.0])) == pytest.approx(-2 ** -0.5)


def test_random_nested_sets_are_near_orthogonal_too():
    """The control: in many dimensions, nested random sets pass the test by construction."""
    pool = torch.randn(3000, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cos = geo.random_nested_cosines(pool, 200, 40, draws=8, seed=0)
    assert cos.shape == (8,) and cos.abs().median() < 0.1
    disjoint = geo.hierarchy_cosine(geo.concept_vector(pool[:200]), geo.concept_vector(pool[200:240]))
    assert disjoint < -0.3  # not nested: far from orthogonal
    with pytest.raises(ValueError, match="n_child < n_parent"):
        geo.random_nested_cosines(pool, 40, 40)


def test_held_out_aurocs_separate_planted_concepts_not_random_ones():
    _, _, words, is_child, others = planted_hierarchy()
    assert geo.concept_auroc(words, others) > 0.95
    assert geo.difference_auroc(words, is_child) > 0.95
    assert abs(geo.concept_auroc(others[:100], others[100:]) - 0.5) < 0.2
    shuffled = is_child[torch.randperm(len(is_child), generator=torch.Generator().manual_seed(3))]
    assert abs(geo.difference_auroc(others[:120], shuffled) - 0.5) < 0.2


def test_counterfactual_direction_probes_planted_pairs():
    gen = torch.Generator().manual_seed(0)
    concept = unit(torch.randn(32, generator=gen, dtype=torch.float64))
    base = torch.randn(20, 32, generator=gen, dtype=torch.float64)
    target = base + 2 * concept + 0.1 * torch.randn(20, 32, generator=gen, dtype=torch.float64)
    direction = geo.counterfactual_direction(base[:10], target[:10])
    assert float(direction @ concept) > 0.95
    assert geo.pair_accuracy(direction, base[10:], target[10:]) == 1.0
    assert geo.pair_accuracy(-direction, base[10:], target[10:]) == 0.0


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="at least 2 words"):
        geo.concept_vector(torch.randn(1, 8))
    with pytest.raises(ValueError, match="equally shaped"):
        geo.counterfactual_direction(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="one entry per parent word"):
        geo.difference_auroc(torch.randn(10, 4), torch.zeros(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one token id"):
        geo.unembedding_vectors(tiny_model("llama"), [])


def test_single_token_ids_keeps_single_tokens_and_refuses_none():
    chars = SimpleNamespace(tokenizer=lambda text, add_special_tokens=False: {"input_ids": [ord(c) for c in text]})
    # a character tokenizer: " " + "a" is two tokens, so nothing is a single token
    with pytest.raises(ValueError, match="single token after a space"):
        geo.single_token_ids(chars, ["a", "bc"])
    with pytest.raises(ValueError, match="no words"):
        geo.single_token_ids(chars, [])
    pieces = {" cat": [7], " dog": [8], " zebra": [9, 10]}
    words = SimpleNamespace(tokenizer=lambda text, add_special_tokens=False: {"input_ids": pieces[text]})
    assert geo.single_token_ids(words, ["cat", "zebra", "dog"]) == ([7, 8], ["cat", "dog"])


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_unembedding_vectors_fold_the_final_norm_gain(family):
    model = tiny_model(family)
    ids = [3, 5, 40]
    got = geo.unembedding_vectors(model, ids)
    assert torch.allclose(got, model.anatomy.folded_W_U()[:, ids].T.double())


# --- the real model -----------------------------------------------------------------------
@pytest.mark.integration
def test_real_model_word_vocabulary_and_single_tokens():
    import interpbook as ib
    model = ib.load_model()
    ids = geo.word_token_ids(model, max_tokens=2000, seed=0)
    assert len(ids) == 2000 and ids == sorted(ids)
    assert all(model.tokenizer.decode([i]).startswith(" ") for i in ids[:50])
    kept_ids, kept = geo.single_token_ids(model, ["France", "Qwxzpvbjk"])
    assert kept == ["France"] and kept_ids == [model.token_id(" France")]
    basis = geo.causal_basis(geo.unembedding_vectors(model, ids))
    assert basis.A.shape == (model.d_model, model.d_model)
