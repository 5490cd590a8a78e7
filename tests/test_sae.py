"""Sparse autoencoders and transcoders on tiny random models of several families."""

import pytest
import torch

from interpbook import sae as S
from interpbook.feature_scores import orient, token_set_scores, top_contexts
from interpbook.sae import SAE, SAEConfig, evaluate, fvu, load_or_train, loss_recovered, splice, train_sae
from tiny_models import random_ids, tiny_model

QUICK = SAEConfig(expansion=2, k=4, steps=30, batch_size=32, lr=3e-3)


def _data(n=256, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3 + 1


@pytest.mark.parametrize("activation,k", [("topk", 5), ("relu", None)])
def test_shapes_and_decoder_norm(activation, k):
    sae = SAE(8, 24, activation, k)
    x = torch.randn(3, 7, 8)
    z = sae.encode(x)
    assert z.shape == (3, 7, 24) and (z >= 0).all()
    assert sae.decode(z).shape == (3, 7, 8) and sae(x).shape == (3, 7, 8)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(24))
    assert {n: tuple(p.shape) for n, p in sae.named_parameters()} == {
        "W_enc": (8, 24), "W_dec": (24, 8), "b_enc": (24,), "b_dec": (8,)}


def test_topk_l0_is_k_and_forward_equals_decode_encode():
    sae = SAE(8, 24, "topk", 5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)                       # every pre-activation positive: exactly k fire
    x = torch.randn(50, 8)
    assert ((sae.encode(x) > 0).sum(-1) == 5).all()
    torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)))


@pytest.mark.parametrize("config", [QUICK, SAEConfig(expansion=2, activation="relu", k=None, l1_coeff=1e-3,
                                                     steps=30, batch_size=32, lr=3e-3)])
def test_training_keeps_unit_decoder_learns_and_is_deterministic(config):
    x = _data()
    a, history = train_sae(x, config)
    b, _ = train_sae(x, config)
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name      # same seed, same weights
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(a.d_sae))
    assert len(history["fvu"]) == config.steps
    assert history["fvu"][-1] < history["fvu"][0]
    assert fvu(x, a(x)) < 1.0                                    # scales were folded back correctly
    c, _ = train_sae(x, SAEConfig(**{**config.__dict__, "seed": 1}))
    assert not torch.equal(a.W_dec, c.W_dec)


def test_transcoder_maps_inputs_to_targets():
    x = _data()
    y = x @ torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    tc, history = train_sae(x, SAEConfig(**{**QUICK.__dict__, "steps": 60}), targets=y)
    assert not tc.apply_b_dec_to_input and tc(x).shape == (256, 12)
    assert history["fvu"][-1] < history["fvu"][0]
    assert abs(fvu(y, tc(x)) - history["fvu"][-1]) < 0.25      # scales folded back: raw units fit as well


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="k <= d_sae"):
        SAE(8, 4, "topk", 5)
    with pytest.raises(ValueError, match="'topk' or 'relu'"):
        SAE(8, 4, "gelu")
    with pytest.raises(ValueError, match="d_in=8"):
        SAE(8, 16, "topk", 2).encode(torch.randn(3, 9))
    with pytest.raises(ValueError, match="l1_coeff"):
        SAEConfig(activation="relu", k=None)
    with pytest.raises(ValueError, match="inputs must be"):
        train_sae(torch.randn(10), QUICK)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox"])
def test_identity_splice_leaves_logits_unchanged(family):
    m = tiny_model(family)
    d = m.d_model
    identity = SAE(d, 2 * d, "relu")            # relu(x) - relu(-x) = x, with unit decoder rows
    eye = torch.eye(d)
    with torch.no_grad():
        identity.W_enc.copy_(torch.cat([eye, -eye], 1))
        identity.W_dec.copy_(torch.cat([eye, -eye], 0))
    ids = random_ids(batch=2, pos=6)
    clean = m.run(ids).logits
    for skip in (0, 1):
        out = m.run(ids, edits=[splice(identity, ("resid_post", 1), skip=skip)]).logits
        torch.testing.assert_close(out, clean, atol=1e-5, rtol=1e-5)
    broken = m.run(ids, edits=[splice(SAE(d, 2 * d, "topk", 1), ("resid_post", 1))]).logits
    assert not torch.allclose(broken, clean)    # the splice really is in the forward pass


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_load_or_train_caches_and_transcoder_reads_mlp(family, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPBOOK_CACHE", str(tmp_path))
    m = tiny_model(family)
    windows = random_ids(batch=8, pos=12, seed=4)
    first = load_or_train(m, 1, windows, QUICK)
    assert first.site == ("resid_post", 1) and first.sae.d_in == m.d_model

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(S, "train_sae", no_training)
    again = load_or_train(m, 1, windows, QUICK)
    for name, p in first.sae.state_dict().items():
        assert torch.equal(p, again.sae.state_dict()[name])
    assert again.history == first.history
    with pytest.raises(AssertionError, match="trained again"):
        load_or_train(m, 2, windows, QUICK)                                  # another layer
    with pytest.raises(AssertionError, match="trained again"):
        load_or_train(m, 1, windows, SAEConfig(**{**QUICK.__dict__, "k": 3}))   # another k
    monkeypatch.undo()
    monkeypatch.setenv("INTERPBOOK_CACHE", str(tmp_path))
    tc = load_or_train(m, 1, windows, QUICK, transcoder=True)
    assert tc.out_site == ("mlp_out", 1) and not tc.sae.apply_b_dec_to_input
    both = load_or_train(m, 1, windows, [QUICK, SAEConfig(**{**QUICK.__dict__, "k": 2})])
    assert [t.sae.k for t in both] == [4, 2]
    assert torch.equal(both[0].sae.W_dec, first.sae.W_dec)
    with pytest.raises(ValueError, match="outside"):
        load_or_train(m, m.n_layers, windows, QUICK)
    with pytest.raises(ValueError, match="site="):
        load_or_train(m, 1, windows, QUICK, site="attn_z")


def test_token_set_score_finds_a_token_detector():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4000,), generator=g)
    detector = (ids == 7).float() + 0.01 * torch.randn(4000, generator=g)
    noise = torch.randn(4000, generator=g)
    scores = token_set_scores(torch.stack([detector, noise, -detector], 1), ids, top=10)
    assert scores.f1[0] > 0.9 and scores.f1[1] < 0.3
    assert orient(torch.stack([-detector], 1)).max() > 0.9
    with pytest.raises(ValueError, match="token_ids"):
        token_set_scores(torch.randn(10, 2), ids)


def test_top_contexts_shows_the_peak_token():
    class Tok:
        def decode(self, ids):
            return " t" + str(ids[0])

    windows = torch.arange(20).view(2, 10)
    acts = torch.zeros(18)
    acts[12] = 5.0                              # window 1, position 4 (skip=1): token 14
    (line,) = top_contexts(Tok(), windows, acts, n=1, before=2)
    assert line.endswith("[␣t14]") and "␣t12" in line


def test_evaluate_and_loss_recovered_on_identity():
    m = tiny_model("llama")
    d = m.d_model
    identity = SAE(d, 2 * d, "relu")
    eye = torch.eye(d)
    with torch.no_grad():
        identity.W_enc.copy_(torch.cat([eye, -eye], 1))
        identity.W_dec.copy_(torch.cat([eye, -eye], 0))
    x = torch.randn(40, d)
    stats = evaluate(identity, x)
    assert stats["fvu"] < 1e-10 and 0 < stats["l0"] <= d
    windows = random_ids(batch=3, pos=8, seed=5)
    for mean in (None, torch.zeros(d) + 0.5):
        ce = loss_recovered(m, identity, ("resid_post", 1), windows, mean=mean)
        assert abs(ce["spliced"] - ce["clean"]) < 1e-4
        assert abs(ce["recovered (zero)"] - 1) < 1e-3
        assert ("recovered (mean)" in ce) == (mean is not None)


def test_docstring_passages_are_deterministic_prose_with_a_source():
    from interpbook.corpus import docstring_passages, package_source

    first = docstring_passages(("json",), max_words=300)
    assert first == docstring_passages(("json",), max_words=300)
    assert first and all(p.topic.startswith("json") and ":" in p.topic for p in first)
    assert all(len(p.text.split()) >= 12 and ">>>" not in p.text for p in first)
    assert sum(len(p.text.split()) for p in first) < 300 + max(len(p.text.split()) for p in first)
    assert "torch" in package_source("torch")
    with pytest.raises(ValueError, match="not installed"):
        docstring_passages(("no_such_package_here",))
