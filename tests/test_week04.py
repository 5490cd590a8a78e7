"""The Week 4 exercise checks: right answers pass, the usual wrong answers fail with a
message that names the slip. Runs on the real offline model."""

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


def test_induction_score_check(model):
    assert isinstance(w.check_induction_score(H.induction_score, model), CheckResult)
    fails("duplicate-token", w.check_induction_score, lambda p, T: H.duplicate_token_score(p, T))
    fails("shape", w.check_induction_score, lambda p, T: H.induction_score(p, T)[None])
    fails("no answer", w.check_induction_score, lambda p, T: ...)


def _src_tgt(model):
    src = torch.tensor([model.token_id(c) for c in [" France", " Japan", " Italy"]])
    tgt = torch.tensor([model.token_id(c) for c in [" Paris", " Tokyo", " Rome"]])
    return src, tgt


def test_ov_map_check(model):
    src, tgt = _src_tgt(model)
    a = model.anatomy
    ref = H.ov_logits(model, 23, 4, src, universe=tgt, first_mlp=False)
    assert isinstance(w.check_ov_map(model, 23, 4, src, tgt, ref), CheckResult)
    fails("norms are missing", w.check_ov_map, model, 23, 4, src, tgt,
          H.ov_logits(model, 23, 4, src, universe=tgt, first_mlp=False, fold_norms=False))
    fails("whole vocabulary", w.check_ov_map, model, 23, 4, src, tgt, H.ov_logits(model, 23, 4, src, first_mlp=False))
    with torch.no_grad():
        no_final = a.ln1(23)(a.W_E[src]) @ a.W_V(23)[4] @ a.W_O(23)[4] @ a.W_U[:, tgt]
    fails("final norm", w.check_ov_map, model, 23, 4, src, tgt, no_final)


def test_k_composition_check(model):
    ref = float(H.composition_scores(model, [(16, 0)], [(18, 6)], kind="k")[0, 0])
    assert isinstance(w.check_k_composition(model, (16, 0), (18, 6), ref), CheckResult)
    q = float(H.composition_scores(model, [(16, 0)], [(18, 6)], kind="q")[0, 0])
    fails("Q-composition", w.check_k_composition, model, (16, 0), (18, 6), q)
    nf = float(H.composition_scores(model, [(16, 0)], [(18, 6)], kind="k", fold_norm=False)[0, 0])
    fails("folded", w.check_k_composition, model, (16, 0), (18, 6), nf)
    fails("expected", w.check_k_composition, model, (16, 0), (18, 6), 0.5)


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
    fails("pair", w.check_name_copying_head, model, src, "23.2", universe=uni)
