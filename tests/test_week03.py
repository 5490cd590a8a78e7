"""Week 3 exercise checks: right answers pass, the usual slips fail with a useful message."""

from collections import Counter

import pytest
import torch

from interpbook.exercises import CheckFailed, CheckResult
from interpbook.exercises.week03 import (
    check_first_top1_layer, check_nearest_neighbour_inversion, check_patchscope, check_token_prf,
    first_top1_layer, nearest_neighbour_inversion,
)
from interpbook.inversion import token_prf


def test_token_prf_check():
    assert isinstance(check_token_prf(token_prf), CheckResult)
    def as_sets(p, r):  # ignores multiplicity
        o = len(set(p) & set(r))
        pr, rc = (o / len(p) if p else 0.0), (o / len(r) if r else 0.0)
        return pr, rc, (2 * pr * rc / (pr + rc) if pr + rc else 0.0)
    with pytest.raises(CheckFailed, match="multiset"):
        check_token_prf(as_sets)
    with pytest.raises(CheckFailed, match="fractions"):
        check_token_prf(lambda p, r: tuple(100 * x for x in token_prf(p, r)))
    with pytest.raises(CheckFailed, match="no answer"):
        check_token_prf(lambda p, r: ...)


def test_nearest_neighbour_check():
    assert isinstance(check_nearest_neighbour_inversion(nearest_neighbour_inversion), CheckResult)
    def euclid(train, ids, test):
        return [ids[i] for i in torch.cdist(test, train).argmin(-1).tolist()]
    with pytest.raises(CheckFailed, match="cosine"):
        check_nearest_neighbour_inversion(euclid)


def test_first_top1_layer_reference():
    logits = torch.zeros(5, 3)
    for layer, best in enumerate([2, 1, 2, 2, 2]):
        logits[layer, best] = 1
    assert first_top1_layer(logits, 2) == 2
    assert first_top1_layer(logits, 1) == -1


@pytest.mark.integration
def test_checks_on_the_real_model():
    import interpbook as ib
    from interpbook.patchscopes import patchscope
    m = ib.load_model()
    assert isinstance(check_first_top1_layer(first_top1_layer, m), CheckResult)
    def first_any(logits, token):
        hits = (logits.argmax(-1) == token).nonzero()
        return int(hits[0]) if len(hits) else -1
    try:
        check_first_top1_layer(first_any, m)
    except CheckFailed as err:
        assert "stay top-1" in str(err)
    ref = lambda model, s, l, t: patchscope(model, s, l, -1, t)
    assert isinstance(check_patchscope(ref, m, layers=(5,)), CheckResult)
    with pytest.raises(CheckFailed, match="too early"):
        check_patchscope(lambda model, s, l, t: patchscope(model, s, l, -1, t, target_layer=l - 1), m, layers=(5,))
    with pytest.raises(CheckFailed, match="unpatched"):
        check_patchscope(lambda model, s, l, t: model.run(t).last_logits[0], m, layers=(5,))
