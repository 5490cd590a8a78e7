"""Invariants of the anatomy adapters on tiny random models of every family."""

import pytest
import torch
from tiny_models import CONFIGS, random_ids, tiny_model

import interpbook as ib
from interpbook import lenses
from interpbook.anatomy import norm_as_linear

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


def test_answer_rank_is_the_rank_under_the_full_logit_lens(model):
    ids = random_ids()
    lens = ib.logit_lens(model, ids, pos=-2)
    answers = lens[model.n_layers // 2].argmax(-1)          # top-1 at the middle layer: rank 0 there
    ranks = ib.answer_rank(model, ids, answers, pos=-2)
    want = (lens > lens.gather(-1, answers[None, :, None].expand(model.n_layers, -1, 1))).sum(-1)
    assert torch.equal(ranks, want) and bool((ranks[model.n_layers // 2] == 0).all())


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


# --- norm folding and direct logit attribution ---------------------------------------------
def _norms(a):
    """Every normalisation module of the model, with a name for failure messages."""
    named = [("final", a.final_norm())]
    for layer in range(a.n_layers):
        named += [(f"ln1.{layer}", a.ln1(layer)), (f"ln2.{layer}", a.ln2(layer)),
                  (f"post_attn.{layer}", a.post_attn_norm(layer)), (f"post_mlp.{layer}", a.post_mlp_norm(layer))]
    return named


def test_every_norm_is_centre_scale_gain_plus_bias(model):
    """norm(x) = norm_as_linear(norm, x, x) + bias, whatever the family's norm."""
    x = torch.randn(3, 5, model.d_model) * 3 + 0.5
    for name, norm in _norms(model.anatomy):
        bias = getattr(norm, "bias", None)
        with torch.no_grad():
            expected = norm(x)
        got = norm_as_linear(norm, x, x) + (0 if bias is None else bias)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5, msg=name)


def test_norm_gain_follows_each_parameterisation():
    """Llama's RMSNorm multiplies by g, Gemma's by 1 + g, LayerNorm by its weight."""
    for family, gain_of in [("llama", lambda n: n.weight), ("gemma3", lambda n: 1 + n.weight),
                            ("gpt2", lambda n: n.weight)]:
        a = tiny_model(family).anatomy
        norm = a.final_norm()
        torch.testing.assert_close(a.norm_gain(norm), gain_of(norm).detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.folded_W_U(), gain_of(norm).detach()[:, None] * a.W_U)
    assert torch.equal(ib.anatomy.norm_gain(torch.nn.Identity(), 4), torch.ones(4))
    with pytest.raises(TypeError, match="not a normalisation"):
        ib.anatomy.norm_gain(torch.nn.ReLU(), 4)


def _softcap(model, logits):
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _final_bias_logits(a):
    """The constant part of the logits: the final norm's bias read out, plus b_U."""
    bias = getattr(a.final_norm(), "bias", None)
    out = torch.zeros(a.d_vocab) if bias is None else bias.detach() @ a.W_U.detach()
    return out if a.b_U is None else out + a.b_U.detach()


def test_dla_of_every_component_sums_to_the_logits(model):
    """embedding (with positions) + every attn_out + every mlp_out = the final residual, so
    their direct logit attributions add up to the model's logits (softcap applied after)."""
    ids = random_ids()
    last = model.n_layers - 1
    run = model.run(ids, cache=[("resid_pre", 0), "attn_out", "mlp_out", ("resid_post", last)])
    parts = [run.cache["resid_pre", 0]] + [run.cache[s, l] for l in range(model.n_layers)
                                           for s in ("attn_out", "mlp_out")]
    final = run.cache["resid_post", last]
    torch.testing.assert_close(sum(parts), final, atol=1e-5, rtol=1e-5)
    dla = lenses.direct_logit_attribution(model, torch.stack(parts), final)
    assert dla.shape == (len(parts), *final.shape[:-1], model.d_vocab)
    total = dla.sum(0) + _final_bias_logits(model.anatomy)
    torch.testing.assert_close(_softcap(model, total), run.logits, atol=1e-4, rtol=1e-4)
    # chosen tokens and a single token are columns of the full attribution
    torch.testing.assert_close(lenses.direct_logit_attribution(model, parts[1], final, [5, 2]),
                               dla[1][..., [5, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lenses.direct_logit_attribution(model, parts[1], final, 7),
                               dla[1][..., 7], atol=1e-5, rtol=1e-5)


def test_dla_of_heads_sums_to_the_attention_output(model):
    """Per-head outputs z_h W_O[h] (through the post-attention norm frozen at the layer's
    output, for Gemma) split the attention output's attribution exactly."""
    a = model.anatomy
    layer, last = 1, model.n_layers - 1
    run = model.run(random_ids(), cache=[("attn_z", layer), ("attn_out", layer), ("resid_post", last)])
    z = run.cache["attn_z", layer]
    heads = torch.einsum("bphe,hed->hbpd", z, a.W_O(layer))  # heads first: they broadcast
    b_O = torch.zeros(model.d_model) if a.b_O(layer) is None else a.b_O(layer)
    with torch.no_grad():
        before_norm = heads.sum(0) + b_O
    heads = norm_as_linear(a.post_attn_norm(layer), heads, before_norm)
    final = run.cache["resid_post", last]
    per_head = lenses.direct_logit_attribution(model, heads, final, [3, 4])
    rest = lenses.direct_logit_attribution(model, run.cache["attn_out", layer], final, [3, 4])
    bias = norm_as_linear(a.post_attn_norm(layer), b_O.expand_as(before_norm), before_norm)
    rest = rest - lenses.direct_logit_attribution(model, bias, final, [3, 4])
    torch.testing.assert_close(per_head.sum(0), rest, atol=1e-4, rtol=1e-4)


def test_final_norm_scale(model):
    x = torch.randn(2, 3, model.d_model)
    s = lenses.final_norm_scale(model, x)
    assert s.shape == (2, 3)
    centred = x - x.mean(-1, keepdim=True) if model.anatomy.family in ("gpt2", "gpt_neox") else x
    with torch.no_grad():
        ref = 1 / centred.pow(2).mean(-1).add(ib.anatomy.norm_eps(model.anatomy.final_norm())).sqrt()
    torch.testing.assert_close(s, ref, atol=1e-6, rtol=1e-5)


def test_dla_bad_shapes_are_explained():
    model = tiny_model("llama")
    final = torch.randn(2, model.d_model)
    with pytest.raises(ValueError, match="d_model=32"):
        lenses.direct_logit_attribution(model, torch.randn(2, 7), final)
    with pytest.raises(ValueError, match="put extra dimensions"):
        lenses.direct_logit_attribution(model, torch.randn(2, 4, model.d_model), torch.randn(3, model.d_model))
    with pytest.raises(ValueError, match="token ids in 0..100"):
        lenses.direct_logit_attribution(model, final, final, [model.d_vocab])


def test_token_contributions_sum_to_the_mlp_attribution(model):
    """mlp.token_contributions is in real logit units: its neurons add up to the DLA of the
    layer's mlp_out (less the output bias's share)."""
    from interpbook import mlp

    a = model.anatomy
    layer, last, toks = 1, model.n_layers - 1, [3, 7, 11]
    ids = random_ids()
    contrib = mlp.token_contributions(model, ids, layer, toks)
    assert contrib.shape == (2, model.d_mlp, 3)
    run = model.run(ids, cache=[("mlp_out", layer), ("mlp_act", layer), ("resid_post", last)])
    final = run.cache["resid_post", last][:, -1]
    expected = lenses.direct_logit_attribution(model, run.cache["mlp_out", layer][:, -1], final, toks)
    if a.b_out(layer) is not None:  # sequential: the bias adds after the neurons, no post-norm
        expected = expected - lenses.direct_logit_attribution(model, a.b_out(layer).detach().expand_as(final), final, toks)
    torch.testing.assert_close(contrib.sum(1), expected, atol=1e-4, rtol=1e-4)
