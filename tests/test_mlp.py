"""Key-value memories, value projections and sub-updates on tiny random models of every
family (the anatomy API must make them family-independent)."""

import pytest
import torch
from tiny_models import CONFIGS, random_ids, tiny_model

from interpbook import mlp
from interpbook.lenses import direct_logit_attribution

FAMILIES = list(CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def windows():
    return random_ids(batch=5, pos=9, seed=3)


@pytest.mark.parametrize("by", ["value", "abs"])
def test_top_activations_match_brute_force(model, by):
    W = windows()
    top = mlp.top_activations(model, W, [0, 2], k=3, batch_size=2, skip_first=2, by=by)
    run = model.run(W, cache="mlp_act")
    for i, layer in enumerate([0, 2]):
        act = run.cache["mlp_act", layer][:, 2:-1].reshape(-1, model.d_mlp).T  # positions 2..7
        score = act.abs() if by == "abs" else act
        ref = act.gather(1, score.topk(3, dim=1).indices)
        torch.testing.assert_close(top.values[i], ref, atol=1e-5, rtol=1e-5)
        # the stored positions hold those activations, and are never first/last positions
        w, p = top.index[i] // 9, top.index[i] % 9
        torch.testing.assert_close(run.cache["mlp_act", layer][w, p, torch.arange(model.d_mlp)[:, None]],
                                   top.values[i], atol=1e-5, rtol=1e-5)
        assert ((p >= 2) & (p <= 7)).all()
    assert torch.equal(top.next_tokens(2), W.reshape(-1)[top.index[1] + 1])
    assert torch.equal(top.trigger_tokens(0), W.reshape(-1)[top.index[0]])
    with pytest.raises(KeyError):
        top.next_tokens(1)
    with pytest.raises(ValueError):
        mlp.top_activations(model, W, [0], skip_first=8)


def test_contexts(model):
    W = windows()

    class Tok:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    top = mlp.top_activations(model, W, [1], k=2)
    ctx = top.contexts(Tok(), 1, 0, n=2, width=3)
    assert len(ctx) == 2 and ctx[0].activation >= ctx[1].activation
    w, p = divmod(int(top.index[0, 0, 0]), 9)
    assert ctx[0].token == f"<{int(W[w, p])}>" and ctx[0].next_token == f"<{int(W[w, p + 1])}>"
    assert ctx[0].prefix.endswith(ctx[0].token) and ctx[0].prefix.count("<") == min(3, p + 1)


def test_mlp_activations_and_mask(model):
    W = windows()
    acts = mlp.mlp_activations(model, W, 1, batch_size=2, skip_first=1)
    ref = model.run(W, cache=("mlp_act", 1)).cache["mlp_act", 1][:, 1:].reshape(-1, model.d_mlp)
    torch.testing.assert_close(acts, ref, atol=1e-5, rtol=1e-5)
    # a padded batch: padding and skipped positions are dropped
    mask = torch.ones_like(W)
    mask[0, :3] = 0
    acts = mlp.mlp_activations(model, {"input_ids": W, "attention_mask": mask}, 1, skip_first=1)
    assert acts.shape == (W.numel() - 3 - 5, model.d_mlp)
    _, keep = mlp.token_mask({"input_ids": W, "attention_mask": mask}, 1)
    assert not keep[0, :4].any() and keep[0, 4:].all() and not keep[1:, 0].any()


def test_folded_unembedding_reads_like_the_model(model):
    """Folded W_U gives the same ranking as the model's own final norm + unembedding for
    RMSNorm families (a single vector: the norm only rescales it)."""
    U = mlp.folded_unembedding(model)
    assert U.shape == (model.d_model, model.d_vocab)
    v = torch.randn(4, model.d_model)
    if model.anatomy.family in ("llama", "gemma3", "qwen2"):
        with torch.no_grad():
            ref = model.anatomy.final_norm()(v) @ model.anatomy.W_U
        got = v @ U
        ratio = ref / got
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), atol=1e-3, rtol=1e-3)


def test_value_logits(model):
    L = mlp.value_logits(model, 1)
    assert L.shape == (model.d_mlp, model.d_vocab)
    torch.testing.assert_close(mlp.value_logits(model, 1, [3, 0]), L[[3, 0]])
    raw = mlp.value_logits(model, 1, [2], fold_norm=False)
    torch.testing.assert_close(raw[0], model.anatomy.W_out(1)[2] @ model.anatomy.W_U)
    # folded: a value reads in the vocabulary as the model reads it once it reaches the
    # residual stream (after a post-MLP norm, if any): same ranking as the real pipeline
    a = model.anatomy
    with torch.no_grad():
        m = torch.zeros(1, model.d_mlp)
        m[0, 2] = 3.0
        written = a.post_mlp_norm(1)(m @ a.W_out(1))
        ref = a.final_norm()(written) @ a.W_U
    ratio = ref[0] / L[2]
    if a.family != "gpt2" and a.family != "gpt_neox":  # LayerNorm centres: not a pure rescaling
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), atol=1e-3, rtol=1e-3)


def test_agreement(model):
    assert mlp.agreement_rate(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5
    with pytest.raises(ValueError):
        mlp.agreement_rate(torch.tensor([1]), torch.tensor([1, 2]))
    # plant windows whose next tokens are exactly each value's top token
    top = mlp.top_activations(model, windows(), [2], k=2, by="abs")
    logits = mlp.value_logits(model, 2) * top.values[0, :, :1].sign()
    planted = logits.argmax(-1)
    W = top.windows.clone().reshape(-1)
    W[top.index[0, :, 0] + 1] = planted  # several neurons may share a position: then it is one of them
    top.windows = W.view_as(top.windows)
    ag = mlp.key_value_agreement(model, top, 2)
    expected = mlp.agreement_rate(planted, top.next_tokens(2)[:, 0])
    assert ag.rate == pytest.approx(expected) and ag.rate > 0
    assert ag.rate_any >= ag.rate and ag.n_neurons == model.d_mlp
    assert 0 <= ag.shuffled <= 1 and ag.median_rank >= 0
    assert mlp.key_value_agreement(model, top, 2, neurons=[0, 1]).n_neurons == 2
    assert mlp.key_value_agreement(model, top, 2, chunk=3) == ag  # chunking changes nothing


def test_last_token_share():
    top = mlp.TopActivations([0], torch.zeros(1, 2, 4), torch.tensor([[[0, 1, 2, 3], [0, 0, 0, 1]]]),
                             torch.tensor([[5, 5, 6, 7, 8]]))
    torch.testing.assert_close(mlp.last_token_share(top, 0), torch.tensor([0.5, 1.0]))


def test_sub_updates_sum_to_the_mlp_update(model):
    ids = random_ids(batch=2)
    layer = 1
    m = mlp.sub_updates(model, ids, layer)
    assert m.shape == (2, model.d_mlp)
    a = model.anatomy
    run = model.run(ids, cache=[("mlp_out", layer)])
    with torch.no_grad():
        update = m @ a.W_out(layer) + (0 if a.b_out(layer) is None else a.b_out(layer))
        if a.family != "gemma3":  # Gemma normalises the MLP output after W_out
            torch.testing.assert_close(update, run.cache["mlp_out", layer][:, -1], atol=1e-4, rtol=1e-4)
    toks = [3, 7, 11]
    contrib = mlp.token_contributions(model, ids, layer, toks)
    assert contrib.shape == (2, model.d_mlp, 3)
    # real logit units: the sub-updates add up to the DLA of the whole MLP output
    last = model.n_layers - 1
    run = model.run(ids, cache=[("mlp_out", layer), ("resid_post", last)])
    dla = direct_logit_attribution(model, run.cache["mlp_out", layer][:, -1], run.cache["resid_post", last][:, -1], toks)
    if a.b_out(layer) is None:
        torch.testing.assert_close(contrib.sum(1), dla, atol=1e-3, rtol=1e-3)


def test_top_sub_updates(model):
    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"

    model.tokenizer, saved = Tok(), model.tokenizer
    try:
        subs = mlp.top_sub_updates(model, random_ids(batch=1), 0, k=3, n_tokens=4)
    finally:
        model.tokenizer = saved
    assert len(subs) == 3 and all(len(s.tokens) == 4 for s in subs)
    assert subs[0].weight >= subs[1].weight >= subs[2].weight
    m = mlp.sub_updates(model, random_ids(batch=1), 0)[0]
    assert subs[0].coefficient == pytest.approx(float(m[subs[0].neuron]))


def test_visible():
    assert mlp.visible(" Paris") == "␣Paris" and mlp.visible("  x") == "␣␣x" and mlp.visible("s") == "s"
    assert mlp.visible("\n\n") == "↵↵" and mlp.visible(" a\tb") == "␣a⇥b"
