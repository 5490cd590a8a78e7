"""Invariants of the anatomy adapters on tiny random models of every family."""

import pytest
import torch
from tiny_models import CONFIGS, random_ids, tiny_model

import interpbook as ib

FAMILIES = list(CONFIGS)
ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def _raw_logits(model, ids):
    with torch.no_grad():
        return model.hf(input_ids=ids).logits


def test_tracing_leaves_logits_identical(model):
    ids = random_ids()
    every_site = [s for s in ib.SITES if not (s == "resid_mid" and model.anatomy.parallel_residual)]
    run = model.run(ids, cache=every_site)
    assert torch.equal(run.logits, _raw_logits(model, ids))


def test_logit_lens_at_last_layer_is_the_output(model):
    ids = random_ids()
    lens = ib.logit_lens(model, ids, pos=-1)
    assert lens.shape == (model.n_layers, 2, model.d_vocab)
    torch.testing.assert_close(lens[-1], _raw_logits(model, ids)[:, -1], atol=ATOL, rtol=0)


def test_heads_through_W_O_sum_to_attention_output(model):
    a = model.anatomy
    run = model.run(random_ids(), cache=["attn_z", "attn_out"])
    for layer in range(model.n_layers):
        z = run.cache["attn_z", layer]
        per_head = torch.einsum("bphe,hed->bphd", z, a.W_O(layer))
        total = per_head.sum(2) + (0 if a.b_O(layer) is None else a.b_O(layer))
        with torch.no_grad():
            expected = run.cache["attn_out", layer]
            total = a.post_attn_norm(layer)(total)
        torch.testing.assert_close(total, expected, atol=ATOL, rtol=1e-5)


def _block_by_hand(a, cache, layer):
    """One block from weight views and the cached attention pattern; returns
    (attn_z, mlp_act, resid_post)."""
    x = cache["resid_pre", layer]
    h = a.ln1(layer)(x)
    v = torch.einsum("bpd,hde->bphe", h, a.W_V(layer))
    if a.b_V(layer) is not None:
        v = v + a.b_V(layer)
    z = torch.einsum("bhqk,bkhe->bqhe", cache["attn_pattern", layer], v)
    o = torch.einsum("bqhe,hed->bqd", z, a.W_O(layer))
    if a.b_O(layer) is not None:
        o = o + a.b_O(layer)
    attn = a.post_attn_norm(layer)(o)
    mid = x if a.parallel_residual else x + attn
    act = a.mlp_act_from(layer, a.ln2(layer)(mid))
    m = act @ a.W_out(layer) + (0 if a.b_out(layer) is None else a.b_out(layer))
    out = x + attn + a.post_mlp_norm(layer)(m) if a.parallel_residual else mid + a.post_mlp_norm(layer)(m)
    return z, act, out


def test_forward_by_hand_from_weight_views(model):
    a = model.anatomy
    run = model.run(random_ids(), cache=["resid_pre", "attn_pattern", "attn_z", "mlp_act", "resid_post"])
    with torch.no_grad():
        for layer in range(model.n_layers):
            z, act, out = _block_by_hand(a, run.cache, layer)
            torch.testing.assert_close(z, run.cache["attn_z", layer], atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(act, run.cache["mlp_act", layer], atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(out, run.cache["resid_post", layer], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(a.unembed(run.cache["resid_post", -1]), run.logits, atol=ATOL, rtol=1e-5)


def test_qkv_weight_views_match_projections(model):
    a = model.anatomy
    run = model.run(random_ids(), cache=["resid_pre", "q", "k", "v"])
    group = a.n_heads // a.n_kv_heads
    with torch.no_grad():
        for layer in range(model.n_layers):
            h = a.ln1(layer)(run.cache["resid_pre", layer])
            for name, W, b in (("q", a.W_Q, a.b_Q), ("k", a.W_K, a.b_K), ("v", a.W_V, a.b_V)):
                ours = torch.einsum("bpd,hde->bphe", h, W(layer)) + (0 if b(layer) is None else b(layer))
                cached = run.cache[name, layer]
                if name != "q":
                    cached = cached.repeat_interleave(group, dim=2)
                torch.testing.assert_close(ours, cached, atol=ATOL, rtol=1e-5)


def test_embedding_views(model):
    a = model.anatomy
    ids = random_ids()
    run = model.run(ids, cache="embed")
    torch.testing.assert_close(run.cache["embed"], a.W_E[ids] * a.embed_scale, atol=ATOL, rtol=1e-5)
    assert a.W_U.shape == (model.d_model, model.d_vocab)
    for layer in (0, -1):
        assert a.W_Q(layer).shape == a.W_K(layer).shape == a.W_V(layer).shape == (a.n_heads, a.d_model, a.d_head)
        assert a.W_O(layer).shape == (a.n_heads, a.d_head, a.d_model)
        assert a.W_in(layer).shape == (a.d_model, a.d_mlp) and a.W_out(layer).shape == (a.d_mlp, a.d_model)
        assert (a.W_gate(layer) is not None) == a.gated


def test_llama_attention_pattern_by_hand_with_rotary():
    """The full attention computation, rotary embedding included, from weight views."""
    model = tiny_model("llama")
    a = model.anatomy
    ids = random_ids(pos=6)
    run = model.run(ids, cache=["q", "k", "attn_pattern"])
    pos = torch.arange(ids.shape[1])
    inv_freq = 1.0 / (model.hf.config.rope_parameters["rope_theta"] ** (torch.arange(0, a.d_head, 2) / a.d_head))
    angles = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)  # [pos, d_head]

    def rotate(x):  # x [b, p, h, d]
        x1, x2 = x.chunk(2, dim=-1)
        return x * angles.cos()[:, None] + torch.cat([-x2, x1], dim=-1) * angles.sin()[:, None]

    group = a.n_heads // a.n_kv_heads
    for layer in range(model.n_layers):
        q = rotate(run.cache["q", layer])
        k = rotate(run.cache["k", layer]).repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / a.d_head**0.5
        scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
        torch.testing.assert_close(scores.softmax(-1), run.cache["attn_pattern", layer], atol=ATOL, rtol=1e-5)


def test_left_padding_gives_the_same_last_logits(model):
    ids = random_ids(batch=1, pos=5)
    alone = model.run(ids).last_logits
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    both = torch.cat([padded, random_ids(batch=1, pos=8, seed=5)])
    run = model.run({"input_ids": both, "attention_mask": torch.cat([mask, torch.ones(1, 8, dtype=torch.long)])})
    torch.testing.assert_close(run.last_logits[:1], alone, atol=1e-4, rtol=1e-4)


def test_unknown_architecture_is_named():
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "rwkv"})()
    with pytest.raises(NotImplementedError, match="rwkv.*supported: .*llama"):
        ib.anatomy_for(Fake())
