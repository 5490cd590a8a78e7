"""Week 3 exercise checks: right answers pass, the usual slips fail with a useful message."""

from collections import Counter

import pytest
import torch

from interpbook.exercises import CheckFailed, CheckResult
from interpbook.exercises import week03
from interpbook.exercises.week03 import (
    _reference_first_top1_layer as first_top1_layer,
    _reference_nearest_neighbour_inversion as nearest_neighbour_inversion,
    check_first_top1_layer, check_fit_translator, check_kl_from_final, check_nearest_neighbour_inversion,
    check_patchscope, check_token_prf, check_translate,
)
from interpbook.inversion import _token_prf as token_prf


def test_references_are_not_public_under_the_exercise_names():
    for name in ("first_top1_layer", "nearest_neighbour_inversion", "token_prf", "translate",
                 "kl_from_final", "fit_translator"):
        assert name not in week03.__all__ and not hasattr(week03, name)
    import interpbook.inversion as inversion
    assert not hasattr(inversion, "token_prf")


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
    assert isinstance(check_patchscope(ref, m), CheckResult)           # default layers fit any depth
    with pytest.raises(CheckFailed, match="too early"):
        check_patchscope(lambda model, s, l, t: patchscope(model, s, l, -1, t, target_layer=l - 1), m, layers=(5,))
    with pytest.raises(CheckFailed, match="unpatched"):
        check_patchscope(lambda model, s, l, t: model.run(t).last_logits[0], m, layers=(5,))


def _translate(h, A, b):
    return h + h @ A + b


def _kl(lens, final):
    f = torch.log_softmax(final, -1)
    return (f.exp() * (f - torch.log_softmax(lens, -1))).sum(-1).mean()


def test_translate_check():
    assert isinstance(check_translate(_translate), CheckResult)
    with pytest.raises(CheckFailed, match="residual"):
        check_translate(lambda h, A, b: h @ A + b)
    with pytest.raises(CheckFailed, match="transposed"):
        check_translate(lambda h, A, b: h + h @ A.T + b)


def test_kl_check():
    assert isinstance(check_kl_from_final(_kl), CheckResult)
    with pytest.raises(CheckFailed, match="KL\\(lens"):
        check_kl_from_final(lambda lens, final: _kl(final, lens))
    with pytest.raises(CheckFailed, match="summed"):
        check_kl_from_final(lambda lens, final: _kl(lens, final) * len(lens))
    with pytest.raises(CheckFailed, match="one number"):
        check_kl_from_final(lambda lens, final: torch.zeros(len(lens)))


def _fit(h, final, decode, steps=150, lr=1e-2, sign=1):
    A = torch.zeros(h.shape[1], h.shape[1], requires_grad=True)
    b = torch.zeros(h.shape[1], requires_grad=True)
    opt = torch.optim.Adam([A, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = sign * _kl(decode(_translate(h, A, b)), final)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return A.detach(), b.detach()


def test_fit_translator_check():
    assert isinstance(check_fit_translator(_fit), CheckResult)
    d = 16
    with pytest.raises(CheckFailed, match="most of it"):                   # the logit lens itself
        check_fit_translator(lambda h, f, dec: (torch.zeros(d, d), torch.zeros(d)))
    with pytest.raises(CheckFailed, match="most of it"):                   # gradient ascent
        check_fit_translator(lambda h, f, dec: _fit(h, f, dec, steps=30, sign=-1))
    with pytest.raises(CheckFailed, match="pair"):
        check_fit_translator(lambda h, f, dec: torch.zeros(d, d))
