"""Attention-head helpers (interpbook.heads) on tiny random models of every family."""

import pytest
import torch
from tiny_models import CONFIGS, random_ids, tiny_model

import interpbook as ib
from interpbook import heads as H

FAMILIES = list(CONFIGS)
RMS_FAMILIES = ["llama", "qwen2", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def test_pattern_scores_on_constructed_patterns():
    n, period = 8, 4
    prev = torch.zeros(1, 2, n, n)
    prev[0, 0, 0, 0] = 1
    prev[0, 0, torch.arange(1, n), torch.arange(0, n - 1)] = 1
    prev[0, 1] = torch.eye(n)
    assert H.previous_token_score(prev).tolist() == [1.0, 0.0]
    ind = torch.zeros(1, 1, n, n)
    q = torch.arange(period, n)
    ind[0, 0, q, q - period + 1] = 1
    assert H.induction_score(ind, period).item() == 1.0
    assert H.duplicate_token_score(ind, period).item() == 0.0
    # the same pattern shifted by one position (a BOS in front): scored from start=period + 1
    shifted = torch.zeros(1, 1, n + 1, n + 1)
    shifted[0, 0, q + 1, q - period + 2] = 1
    assert H.induction_score(shifted, period, start=period + 1).item() == 1.0
    with pytest.raises(ValueError, match="period"):
        H.induction_score(ind, period, start=period - 1)


def test_attention_scores_shapes_and_range(model):
    ids = H.repeated_tokens(model, 2, 6, seed=0)
    p = len(H.bos_prefix(model))
    assert ids.shape == (2, p + 12) and torch.equal(ids[:, p:p + 6], ids[:, p + 6:])
    sc = H.attention_scores(model, ids, 6)
    for key in ("previous_token", "induction", "duplicate"):
        assert sc[key].shape == (model.n_layers, model.n_heads)
        assert (sc[key] >= 0).all() and (sc[key] <= 1 + 1e-6).all()
    assert sc["loss"].shape == (2, p + 11)


def _brute_ov(model, layer, head, src):
    a = model.anatomy
    x = H.source_inputs(model, src, first_mlp=layer > 0)
    with torch.no_grad():
        v = a.ln1(layer)(x) @ a.W_V(layer)[head]
        if a.b_V(layer) is not None:
            v = v + a.b_V(layer)[head]
        return a.unembed(v @ a.W_O(layer)[head])


def test_ov_logits_full_and_on_a_subset(model):
    src = torch.tensor([3, 7, 50])
    uni = torch.tensor([5, 9, 60, 99])
    for layer in range(model.n_layers):
        full = H.ov_logits(model, layer, 1, src)
        assert full.shape == (3, model.d_vocab)
        brute = _brute_ov(model, layer, 1, src)
        if model.anatomy.family != "gemma3":   # Gemma soft-caps logits; ranking is the same
            torch.testing.assert_close(full, brute, atol=1e-4, rtol=1e-4)
        assert torch.equal(full.argsort(-1), brute.argsort(-1)) or model.anatomy.family == "gemma3"
        torch.testing.assert_close(H.ov_logits(model, layer, 1, src, universe=uni), full[:, uni], atol=1e-5, rtol=1e-5)


def test_relation_scores_agree_with_ov_logits(model):
    src, tgt = torch.tensor([3, 4, 5, 6]), torch.tensor([10, 11, 12, 13])
    sc = H.relation_scores(model, src, tgt, k=20)
    assert sc["relation"].shape == (model.n_layers, model.n_heads)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            want = H.topk_hit_rate(H.ov_logits(model, layer, head, src), tgt, 20)
            assert abs(float(sc["relation"][layer, head]) - float(want)) < 1e-6
    uni = torch.arange(3, 40)
    sub = H.relation_scores(model, src, tgt, k=20, universe=uni)
    assert sub["relation"].shape == sc["relation"].shape
    with pytest.raises(ValueError, match="universe"):
        H.relation_scores(model, src, torch.tensor([10, 11, 12, 90]), universe=uni)


def test_topk_hit_rate():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 2.0]])
    assert H.topk_hit_rate(logits, torch.tensor([1, 2]), 1).item() == 0.5
    assert H.topk_hit_rate(logits, torch.tensor([1, 2]), 2).item() == 1.0


def test_qk_scores_match_the_bilinear_form(model):
    a = model.anatomy
    q_ids, k_ids = torch.tensor([3, 4]), torch.tensor([5, 6, 7])
    got = H.qk_scores(model, 1, 2, q_ids, k_ids)
    xq, xk = H.source_inputs(model, q_ids, first_mlp=False), H.source_inputs(model, k_ids, first_mlp=False)
    with torch.no_grad():
        q = a.ln1(1)(xq) @ a.W_Q(1)[2] + (0 if a.b_Q(1) is None else a.b_Q(1)[2])
        k = a.ln1(1)(xk) @ a.W_K(1)[2] + (0 if a.b_K(1) is None else a.b_K(1)[2])
    torch.testing.assert_close(got, q @ k.T)


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_folded_W_OV_equals_norm_then_weights(family):
    model = tiny_model(family)
    a = model.anatomy
    x = torch.randn(5, model.d_model)
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    with torch.no_grad():
        direct = a.ln1(2)(x) @ a.W_V(2)[3] @ _folded_W_O(model, 2, 3)    # post-attention gain: Gemma
        q_direct = a.ln1(2)(x) @ a.W_Q(2)[3] @ (a.ln1(2)(x) @ a.W_K(2)[3]).T
    torch.testing.assert_close((x / rms) @ H.W_OV(model, 2, 3), direct, atol=1e-4, rtol=1e-4)
    if family != "gemma3":   # Gemma normalises q and k again inside attention
        torch.testing.assert_close((x / rms) @ H.W_QK(model, 2, 3) @ (x / rms).T, q_direct, atol=1e-4, rtol=1e-4)


def test_composition_scores(model):
    A = torch.randn(6, 6)
    assert 0 <= H.composition_score(A, torch.linalg.pinv(A)) <= 1
    cs = H.composition_scores(model, [(0, 0), (0, 1)], [(2, 0), (2, 3), (1, 1)], kind="k")
    assert cs.shape == (2, 3) and (cs > 0).all() and (cs <= 1).all()
    for kind in ("q", "v"):
        assert H.composition_scores(model, [(0, 0)], [(1, 0)], kind=kind).shape == (1, 1)
    with pytest.raises(ValueError):
        H.composition_scores(model, [(0, 0)], [(1, 0)], kind="x")


def test_ov_components_reconstruct_the_circuit(model):
    a = model.anatomy
    comp = H.ov_components(model, 1, 2)
    rebuilt = torch.einsum("r,rd,re->de", comp["S"], comp["read"], comp["write"])
    torch.testing.assert_close(rebuilt, H.W_OV(model, 1, 2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(comp["z"] @ _folded_W_O(model, 1, 2), comp["write"], atol=1e-4, rtol=1e-3)
    cc = H.component_composition(model, (1, 2), (2, 0))
    assert cc.shape == (a.d_head,) and (cc >= 0).all() and (cc <= 1 + 1e-6).all()
    # the channels' squared compositions add up to the full composition score (K side)
    full = H.composition_scores(model, [(1, 2)], [(2, 0)], kind="k")[0, 0]
    weighted = (cc.pow(2) * comp["S"].pow(2)).sum().sqrt() / comp["S"].pow(2).sum().sqrt()
    assert abs(float(weighted) - float(full)) < 1e-4


def _folded_W_O(model, layer, head):
    """W_O of one head times the post-attention norm's gain (Gemma; ones elsewhere)."""
    a = model.anatomy
    return a.W_O(layer)[head].detach() * a.norm_gain(a.post_attn_norm(layer))


def _head_output(model, layer, head, edits=()):
    run = model.run(random_ids(), cache=[("attn_z", layer)], edits=list(edits))
    z = run.cache["attn_z", layer][:, :, head]
    return z @ _folded_W_O(model, layer, head)


def test_W_OV_points_where_the_block_writes(model):
    """What the block adds to the residual for a head attending to x (input norm, W_V W_O,
    post-attention norm) is parallel to x @ W_OV for normalised x: the folding is exact up
    to the RMS scalings, which never change a direction."""
    a = model.anatomy
    x = torch.randn(5, model.d_model)
    with torch.no_grad():
        v = a.ln1(1)(x) @ a.W_V(1)[2]
        if a.b_V(1) is not None:
            return  # a value bias is an offset, not part of the linear map
        written = a.post_attn_norm(1)(v @ a.W_O(1)[2])
        x_hat = x - x.mean(-1, keepdim=True) if isinstance(a.ln1(1), torch.nn.LayerNorm) else x
        folded = x_hat @ H.W_OV(model, 1, 2)
    cos = torch.nn.functional.cosine_similarity(written, folded, dim=-1)
    assert (cos > 1 - 1e-4).all(), cos


def test_remove_components_projects_out_channels(model):
    comp = H.ov_components(model, 1, 2)
    clean = _head_output(model, 1, 2)
    out = _head_output(model, 1, 2, [H.remove_components(model, 1, 2, [0, 3])])
    b = comp["write"][[0, 3]]
    expected = clean - (clean @ b.T) @ b
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    everything = _head_output(model, 1, 2, [H.remove_components(model, 1, 2, range(model.d_head))])
    assert everything.abs().max() < 1e-3 * max(1.0, float(clean.abs().max()))
    rows_only = _head_output(model, 1, 2, [H.remove_components(model, 1, 2, [0], rows=[1])])
    torch.testing.assert_close(rows_only[0], clean[0])


def test_ablate_heads_rows_and_positions(model):
    clean = model.run(random_ids(), cache=[("attn_z", 1)]).cache["attn_z", 1]
    run = model.run(random_ids(), cache=[("attn_z", 1)], edits=H.ablate_heads([(1, 2), (1, 0)], rows=[0]))
    z = run.cache["attn_z", 1]
    assert z[0, -1, [0, 2]].abs().max() == 0
    torch.testing.assert_close(z[1], clean[1])
    torch.testing.assert_close(z[0, :-1], clean[0, :-1])


def test_dynamic_scores_run_on_tiny_models(model):
    ids = random_ids(3, 6)
    src = ids[:, 2]
    tgt = torch.tensor([5, 6, 7])
    out = H.dynamic_relation_scores(model, ids, src, tgt, k=10, batch_size=2)
    for key in ("with_context", "without_context"):
        assert out[key].shape == (model.n_layers, model.n_heads)
    assert out["predictions"].shape == (3,)


def test_top_heads():
    s = torch.zeros(3, 4)
    s[2, 1], s[0, 3] = 2.0, 1.0
    assert H.top_heads(s, 2) == [(2, 1), (0, 3)]


# --- the real model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    return ib.load_model()


@pytest.mark.integration
def test_induction_and_previous_token_heads_on_smollm(smollm):
    ids = H.repeated_tokens(smollm, 2, 30, seed=0)
    sc = H.attention_scores(smollm, ids, 30)
    layer, _ = H.top_heads(sc["induction"], 1)[0]
    assert 15 <= layer <= 25 and sc["induction"].max() > 0.5
    assert sc["previous_token"].max() > 0.7
    loss = sc["loss"]
    assert loss[:, 30:].mean() < loss[:, :29].mean() - 5


@pytest.mark.integration
def test_capital_heads_on_smollm(smollm):
    from interpbook.relations import country_capital

    _, src, tgt = country_capital().single_token(smollm.tokenizer)
    uni = torch.unique(torch.cat([torch.arange(2048), tgt]))
    sc = H.relation_scores(smollm, src[:20], tgt[:20], k=10, universe=uni, layers=range(20, 26))
    assert sc["relation"].max() > 0.5


def test_factored_composition_equals_dense(model):
    for kind in ("q", "k", "v"):
        got = H.composition_scores(model, [(0, 1), (1, 3)], [(2, 0)], kind=kind)
        for i, s in enumerate([(0, 1), (1, 3)]):
            ov, qk, ov_r = H.W_OV(model, *s), H.W_QK(model, 2, 0), H.W_OV(model, 2, 0)
            A, B = {"k": (qk, ov.T), "q": (ov, qk), "v": (ov, ov_r)}[kind]
            assert abs(float(got[i, 0]) - H.composition_score(A, B)) < 1e-4
