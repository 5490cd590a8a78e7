"""The Week 4 exercise checks: right answers pass, the usual wrong answers fail with a
message that names the slip. Runs on the real offline model; every head is found by a
score, so the tests hold on any model."""

import pytest
import torch

import interpbook as ib
from interpbook import heads as H
from interpbook.exercises import CheckFailed, CheckResult
from interpbook.exercises import week04 as w

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ib.load_model()


def fails(match, fn, *args, **kwargs):
    with pytest.raises(CheckFailed, match=match):
        fn(*args, **kwargs)


def _prefix_matching(pattern, period, start):
    q = torch.arange(start, pattern.shape[-1])
    return pattern[:, :, q, q - period + 1].mean(dim=(0, 2))


def test_prefix_matching_check():
    assert isinstance(w.check_prefix_matching(_prefix_matching), CheckResult)
    fails("duplicate-token", w.check_prefix_matching,
          lambda p, T, s: p[:, :, torch.arange(s, p.shape[-1]), torch.arange(s, p.shape[-1]) - T].mean(dim=(0, 2)))
    fails("shape", w.check_prefix_matching, lambda p, T, s: _prefix_matching(p, T, s)[None])
    fails("start", w.check_prefix_matching, lambda p, T, s: _prefix_matching(p, T, s - 1))
    fails("no answer", w.check_prefix_matching, lambda p, T, s: ...)
    fails("function itself", w.check_prefix_matching, 0.5)


def _head_map(model, ids, period, start=None):
    run = model.run(ids, cache="attn_pattern")
    start = ids.shape[1] - period if start is None else start
    return torch.stack([_prefix_matching(run.cache["attn_pattern", l], period, start) for l in range(model.n_layers)])


def test_induction_head_map_check(model):
    assert isinstance(w.check_induction_head_map(_head_map, model), CheckResult)
    fails("shape", w.check_induction_head_map, lambda m, ids, T: _head_map(m, ids, T)[0], model)
    if H.bos_prefix(model):
        fails("BOS", w.check_induction_head_map, lambda m, ids, T: _head_map(m, ids, T, start=T), model)


def _repeat_loss(model, ids, period, heads):
    run = model.run(ids, edits=H.ablate_heads(heads, pos=None) if heads else [])
    return float(H.token_losses(run.logits, run.input_ids)[:, ids.shape[1] - period:].mean())


def test_repeat_loss_check(model):
    assert isinstance(w.check_repeat_loss(_repeat_loss, model), CheckResult)

    def whole_sequence(model, ids, period, heads):
        run = model.run(ids, edits=H.ablate_heads(heads, pos=None) if heads else [])
        return float(H.token_losses(run.logits, run.input_ids).mean())
    fails("whole sequence", w.check_repeat_loss, whole_sequence, model)
    fails("ablated", w.check_repeat_loss, lambda m, ids, T, heads: _repeat_loss(m, ids, T, []), model)


def _capital_head(model):
    from interpbook.relations import country_capital

    _, src, tgt = country_capital().single_token(model.tokenizer)
    src, tgt = src[:3], tgt[:3]
    sc = H.relation_scores(model, src, tgt, k=1, universe=tgt, first_mlp=False)["relation"]
    return H.top_heads(sc, 1)[0], src, tgt


def test_ov_map_check(model):
    (layer, head), src, tgt = _capital_head(model)
    a = model.anatomy
    ref = H.ov_logits(model, layer, head, src, universe=tgt, first_mlp=False)
    assert isinstance(w.check_ov_map(model, layer, head, src, tgt, ref), CheckResult)
    fails("norms are missing", w.check_ov_map, model, layer, head, src, tgt,
          H.ov_logits(model, layer, head, src, universe=tgt, first_mlp=False, fold_norms=False))
    fails("whole vocabulary", w.check_ov_map, model, layer, head, src, tgt,
          H.ov_logits(model, layer, head, src, first_mlp=False))
    with torch.no_grad():
        no_final = a.ln1(layer)(a.W_E[src]) @ a.W_V(layer)[head] @ a.W_O(layer)[head] @ a.W_U[:, tgt]
    fails("final norm", w.check_ov_map, model, layer, head, src, tgt, no_final)


def _sender_receiver(model):
    sc = H.attention_scores(model, H.repeated_tokens(model, 2, 20, seed=0), 20)
    receiver = H.top_heads(sc["induction"], 1)[0]
    return H.top_heads(sc["previous_token"][:receiver[0]], 1)[0], receiver


def test_k_composition_check(model):
    s, r = _sender_receiver(model)
    ref = float(H.composition_scores(model, [s], [r], kind="k")[0, 0])
    assert isinstance(w.check_k_composition(model, s, r, ref), CheckResult)
    q = float(H.composition_scores(model, [s], [r], kind="q")[0, 0])
    fails("Q-composition", w.check_k_composition, model, s, r, q)
    nf = float(H.composition_scores(model, [s], [r], kind="k", fold_norm=False)[0, 0])
    fails("folded", w.check_k_composition, model, s, r, nf)
    fails("expected", w.check_k_composition, model, s, r, ref * 0.5 + 0.01)


def test_name_copying_check(model):
    from interpbook.relations import name_copying

    _, src, _ = name_copying().single_token(model.tokenizer)
    src = src[:15]
    uni = torch.unique(torch.cat([torch.arange(1024), src]))
    sc = H.relation_scores(model, src, src, k=1, universe=uni, layers=range(model.n_layers))["relation"]
    best = H.top_heads(sc, 1)[0]
    assert isinstance(w.check_name_copying_head(model, src, best, universe=uni), CheckResult)
    worst = H.top_heads(-sc, 1)[0]
    fails("scores", w.check_name_copying_head, model, src, worst, universe=uni)
    fails("pair", w.check_name_copying_head, model, src, "2.3", universe=uni)
