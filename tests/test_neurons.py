"""neurons and sparse_probing: invariants on tiny random models and synthetic data; a few
integration checks on the real model."""

import numpy as np
import pytest
import torch

from interpbook import neurons as N
from interpbook import sparse_probing as sp
from interpbook.lenses import direct_logit_attribution
from interpbook.tracing import edit
from tiny_models import random_ids, tiny_model


# --- sparse probing -----------------------------------------------------------------------
def planted(n=300, d=30, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    X = rng.normal(size=(n, d))
    X[:, 5] += 3 * y
    X[:, 2] -= 2 * y
    return X, y


def test_ranking_finds_planted_neurons_of_both_signs():
    X, y = planted()
    assert sp.mean_difference_ranking(X, y)[:2].tolist() == [5, 2]
    with pytest.raises(ValueError, match="both classes"):
        sp.mean_difference_ranking(X, np.ones(len(X), bool))
    with pytest.raises(ValueError, match="one label per row"):
        sp.mean_difference_ranking(X, y[:-1])


def test_f1_and_chance():
    y = np.array([1, 1, 0, 0], bool)
    assert sp.f1_score(y, y) == 1.0
    assert sp.f1_score(np.zeros(4, bool), y) == 0.0
    assert sp.f1_score(np.ones(4, bool), y) == pytest.approx(sp.chance_f1(y))
    assert sp.chance_f1(y) == pytest.approx(2 * 0.5 / 1.5)


def test_split_is_stratified_and_disjoint():
    _, y = planted()
    tr, te = sp.split_indices(y, 0.4, seed=3)
    assert not set(tr) & set(te) and len(tr) + len(te) == len(y)
    assert abs(y[te].mean() - y.mean()) < 0.03
    with pytest.raises(ValueError, match="test_frac"):
        sp.split_indices(y, 1.5)


def test_sparse_probe_k1_reads_the_planted_neuron_and_sweep_shapes():
    X, y = planted()
    tr, te = sp.split_indices(y, 0.4)
    probe = sp.k_sparse_probe(X, y, 1, tr, te)
    assert probe.neurons == (5,) and probe.f1 > 0.8
    test, train = sp.sparse_probe_sweep([X, X[:, ::-1].copy()], y, [1, 2, 4], tr, te)
    assert test.shape == train.shape == (2, 3)
    assert np.allclose(test[0], test[1])  # permuting neurons changes nothing
    with pytest.raises(ValueError, match="k must be"):
        sp.k_sparse_probe(X, y, 0, tr, te)


def test_po_messages_joins_multiline_strings(tmp_path):
    po = tmp_path / "x.po"
    po.write_text('msgid ""\nmsgstr ""\n"Content-Type: text/plain"\n\nmsgid "Hello"\nmsgstr "Bonjour "\n'
                  '"le \\"monde\\""\n\nmsgid "Empty"\nmsgstr ""\n', encoding="utf-8")
    assert sp.po_messages(po) == ["Content-Type: text/plain", 'Bonjour le "monde"']
    assert sp.po_messages(po, "msgid") == ["Hello", "Empty"]
    with pytest.raises(ValueError, match="field"):
        sp.po_messages(po, "msgctxt")


def test_pack_examples_exact_length_and_bigrams():
    encode = lambda t: [ord(c) for c in t]  # noqa: E731
    seqs = sp.pack_examples(encode, ["ab", "cde"], 7, 3)
    assert [len(s) for s in seqs] == [7, 7, 7]
    w = torch.tensor([[1, 2, 3, 2, 1, 2], [4, 2, 1, 2, 5, 2]])
    a, b, n_ab, n_else = sp.frequent_bigram(w, min_count=1)
    assert (a, b) == (1, 2) and n_ab == 3 and n_else == 3
    at, lab = sp.bigram_labels(w, 1, 2)
    assert len(at) == 6 and int(lab.sum()) == 3
    with pytest.raises(ValueError, match="No bigram"):
        sp.frequent_bigram(w, min_count=10)


# --- neurons on tiny models ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_entropy_total_effect_equals_the_ablated_model(family):
    model = tiny_model(family)
    ids = random_ids(3, 6)
    last = model.n_layers - 1
    means = N.mean_activations(model, ids, last)
    neuron = 4
    eff = N.entropy_effects(model, ids, [neuron], means=means)[0]

    def set_mean(act):
        act = act.clone()
        act[..., neuron] = means[neuron]
        return act

    clean = N.entropy(model.run(ids).logits)
    ablated = N.entropy(model.run(ids, edits=[edit(("mlp_act", last), set_mean)]).logits)
    assert eff.total == pytest.approx(float((ablated - clean).abs().mean()), rel=1e-3, abs=1e-6)
    assert eff.direct > 0 and eff.ratio == pytest.approx(eff.total / eff.direct)


def test_direct_effect_matches_direct_logit_attribution():
    model = tiny_model("llama")  # no softcapping: logits are linear in the frozen-norm stream
    ids = random_ids(2, 5)
    last = model.n_layers - 1
    a = model.anatomy
    run = model.run(ids, cache=[("resid_post", last), ("resid_mid", last)])
    resid = run.cache["resid_post", last]
    act = a.mlp_act_from(last, a.ln2(last)(run.cache["resid_mid", last]))
    delta = -act[..., 3:4] * a.W_out(last)[3]
    logits = run.logits + direct_logit_attribution(model, delta.detach(), resid)
    from interpbook.anatomy import norm_as_linear
    norm = a.final_norm()
    mine = a.logits_from_normed(norm(resid) + norm_as_linear(norm, delta, resid))
    assert torch.allclose(logits, mine, atol=1e-4)


def test_entropy_effects_rejects_bad_neurons():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="neuron indices"):
        N.entropy_effects(model, random_ids(1, 4), [model.d_mlp])


def test_null_space_fraction_of_singular_directions():
    model = tiny_model("llama")
    S, U = N.unembedding_spectrum(model)
    assert (S[:-1] >= S[1:]).all()
    W = model.anatomy.folded_W_U()
    assert torch.allclose(S, torch.linalg.svdvals(W), rtol=1e-3, atol=1e-4)
    rho = N.null_space_fraction(model, 0, k=2, vectors=U.T)
    assert torch.allclose(rho[-2:], torch.ones(2), atol=1e-4) and rho[:-2].abs().max() < 1e-4
    assert N.null_space_fraction(model, 0).shape == (model.d_mlp,)
    with pytest.raises(ValueError, match="bottom singular"):
        N.null_space_fraction(model, 0, k=model.d_model)


def test_frequency_correlations_match_corrcoef_and_ceiling():
    model = tiny_model("gemma3")
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(10, 90)
    logf = torch.randn(len(ids), generator=g)
    V = torch.randn(3, model.d_model, generator=g)
    r = N.frequency_correlations(model, V, ids, logf)
    W = model.anatomy.folded_W_U()[:, ids]
    ref = torch.stack([torch.corrcoef(torch.stack([v @ W, logf]))[0, 1] for v in V])
    assert torch.allclose(r, ref, atol=1e-4)
    assert torch.allclose(N.frequency_correlations(model, 5 * V, ids, logf), r, atol=1e-5)
    ceiling, u = N.best_direction_correlation(model, ids, logf)
    assert float(N.frequency_correlations(model, u[None], ids, logf)[0]) == pytest.approx(ceiling, abs=1e-4)
    assert ceiling >= float(r.abs().max()) - 1e-6


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gate_preactivation_max_matches_a_hook_on_the_gate(family):
    model = tiny_model(family)
    ids = random_ids(2, 6)
    seen = {}
    hooks = [model.anatomy.mlp(l).gate_proj.register_forward_hook(
        lambda m, i, o, l=l: seen.__setitem__(l, o.amax((0, 1)))) for l in range(model.n_layers)]
    try:
        model.run(ids)
    finally:
        for h in hooks:
            h.remove()
    got = N.gate_preactivation_max(model, ids)
    assert torch.allclose(got, torch.stack([seen[l] for l in range(model.n_layers)]), atol=1e-5)
    frac = N.dead_fraction(got)
    assert frac.shape == (model.n_layers,) and ((0 <= frac) & (frac <= 1)).all()
    assert N.dead_fraction(got, threshold=float("inf")).eq(1).all()


# --- the real model -----------------------------------------------------------------------
@pytest.mark.integration
def test_real_model_datasets_and_frequencies():
    import interpbook as ib
    model = ib.load_model()
    strings = sp.language_strings(["en", "fr"])
    assert len(strings["fr"]) > 100 and len(strings["en"]) > 100
    with pytest.raises(ValueError, match="No Sphinx catalogue"):
        sp.language_strings(["xx"])
    ids, logf = N.unigram_log_frequencies(model)
    the = model.token_id(" the")
    assert the in ids.tolist()
    assert float(logf[ids.tolist().index(the)]) > float(logf.median())
