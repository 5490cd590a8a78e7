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
    layer = round(0.1 * model.n_layers)
    act = model.run(windows, cache=("mlp_act", layer)).cache["mlp_act", layer][..., 7].reshape(-1)
    top = act.topk(3).indices
    pairs = torch.stack([top // 32, top % 32], 1)
    w.check_top_contexts(model, windows, layer, 7, 3, pairs)
    with pytest.raises(CheckFailed, match="wrong order"):
        w.check_top_contexts(model, windows, layer, 7, 3, pairs.flip(0))
    with pytest.raises(CheckFailed, match="no answer"):
        w.check_top_contexts(model, windows, layer, 7, 3, ...)


def test_value_projection(model):
    a = model.anatomy
    layer, neuron = round(0.7 * model.n_layers), 5
    ref = mlp.value_logits(model, layer, [neuron])[0]
    w.check_value_projection(model, layer, neuron, ref.topk(10).indices)
    v = a.W_out(layer)[neuron]
    with pytest.raises(CheckFailed, match="final norm"):
        w.check_value_projection(model, layer, neuron, (v @ a.W_U).topk(10).indices)
    with pytest.raises(CheckFailed, match="suppresses"):
        w.check_value_projection(model, layer, neuron, (-ref).topk(10).indices)


def test_y_step():
    w.check_y_step(S.update_Y)
    with pytest.raises(CheckFailed, match="square root"):
        w.check_y_step(lambda A, Z, Y: Y * ((S.positive_part(Z.T @ A) + S.negative_part(Z.T @ Z) @ Y)
                                            / (S.negative_part(Z.T @ A) + S.positive_part(Z.T @ Z) @ Y)))
    with pytest.raises(CheckFailed, match="no answer"):
        w.check_y_step(lambda A, Z, Y: None)


def test_z_step():
    w.check_z_step(lambda A, Y: S.update_Z(A, Y, reg=0.0))
    with pytest.raises(CheckFailed, match=r"\[d, k\]"):
        w.check_z_step(lambda A, Y: S.update_Z(A, Y, reg=0.0).T)


def test_keep_top():
    w.check_keep_top(S.winner_take_all)
    with pytest.raises(CheckFailed, match="magnitudes"):
        w.check_keep_top(lambda Z, keep: torch.zeros_like(Z).scatter(0, Z.topk(2, dim=0).indices, Z.gather(0, Z.topk(2, dim=0).indices)))


def test_fit_semi_nmf():
    def fit(A, k, keep, n_iter, seed):
        f = S.snmf(A, k, keep=keep, max_iter=n_iter, seed=seed, init="random")
        return f.Z, f.Y, f.errors

    w.check_fit_semi_nmf(fit)
    with pytest.raises(CheckFailed, match="keep"):  # no winner-take-all: dense columns
        w.check_fit_semi_nmf(lambda A, k, keep, n_iter, seed: fit(A, k, 1.0, n_iter, seed))
    with pytest.raises(CheckFailed, match="tuple"):
        w.check_fit_semi_nmf(lambda *args: 3)


def test_agreement_rate(model, windows):
    layer = round(0.7 * model.n_layers)
    top = mlp.top_activations(model, windows, [layer], k=3, by="abs")
    ref = mlp.key_value_agreement(model, top, layer)
    w.check_agreement_rate(model, top, layer, ref.rate)
    if ref.rate > 0:
        with pytest.raises(CheckFailed, match="percentage"):
            w.check_agreement_rate(model, top, layer, ref.rate * 100)
    with pytest.raises(CheckFailed):
        w.check_agreement_rate(model, top, layer, ref.rate + 0.5)
