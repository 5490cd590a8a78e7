"""Week 5 exercise checks: right answers pass, usual slips fail with a message. Real model."""

import pytest
import torch

import interpbook as ib
from interpbook import mlp
from interpbook import snmf as S
from interpbook.exercises import CheckFailed
from interpbook.exercises import week05 as w

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    return ib.load_model()


@pytest.fixture(scope="module")
def windows(model):
    from interpbook.corpus import pack, pydoc_passages
    enc = lambda t: model.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return pack(enc, [p.text for p in pydoc_passages()[:40]], 32, max_tokens=256)


def test_top_contexts(model, windows):
    act = model.run(windows, cache=("mlp_act", 2)).cache["mlp_act", 2][..., 7].reshape(-1)
    top = act.topk(3).indices
    pairs = torch.stack([top // 32, top % 32], 1)
    w.check_top_contexts(model, windows, 2, 7, 3, pairs)
    with pytest.raises(CheckFailed, match="wrong order"):
        w.check_top_contexts(model, windows, 2, 7, 3, pairs.flip(0))
    with pytest.raises(CheckFailed, match="no answer"):
        w.check_top_contexts(model, windows, 2, 7, 3, ...)


def test_value_projection(model):
    U = mlp.folded_unembedding(model)
    v = model.anatomy.W_out(20)[5]
    w.check_value_projection(model, 20, 5, (v @ U).topk(10).indices)
    with pytest.raises(CheckFailed, match="final norm"):
        w.check_value_projection(model, 20, 5, (v @ model.anatomy.W_U).topk(10).indices)
    with pytest.raises(CheckFailed, match="suppresses"):
        w.check_value_projection(model, 20, 5, (-(v @ U)).topk(10).indices)


def test_update_Y():
    w.check_update_Y(S.update_Y)
    with pytest.raises(CheckFailed, match="square root"):
        w.check_update_Y(lambda A, Z, Y: Y * ((S.positive_part(Z.T @ A) + S.negative_part(Z.T @ Z) @ Y)
                                              / (S.negative_part(Z.T @ A) + S.positive_part(Z.T @ Z) @ Y)))


def test_agreement_rate(model, windows):
    top = mlp.top_activations(model, windows, [20], k=3, by="abs")
    ref = mlp.key_value_agreement(model, top, 20)
    w.check_agreement_rate(model, top, 20, ref.rate)
    with pytest.raises(CheckFailed):
        w.check_agreement_rate(model, top, 20, ref.rate + 0.5)
