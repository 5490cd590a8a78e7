"""The tuned lens on tiny random models of every family, plus the real model."""

import pytest
import torch

from interpbook import tuned_lens as tl
from interpbook.lenses import logit_lens
from interpbook.tuned_lens import (
    TunedLens, TunedLensConfig, compare_lenses, fit_tuned_lens, train_tuned_lens, tuned_lens_logits,
)
from tiny_models import CONFIGS, random_ids, tiny_model

QUICK = TunedLensConfig(steps=60, batch_size=32, lr=1e-2, train_vocab=64)


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def model(request):
    return tiny_model(request.param)


def test_an_untrained_tuned_lens_is_the_logit_lens(model):
    ids = random_ids(batch=2, pos=6)
    lens = TunedLens(model.n_layers, model.d_model)
    torch.testing.assert_close(tuned_lens_logits(model, lens, ids), logit_lens(model, ids), rtol=1e-4, atol=1e-4)


def test_the_last_layer_is_the_model_output_also_after_training(model):
    ids = random_ids(batch=2, pos=6, seed=2)
    lens = train_tuned_lens(model, random_ids(batch=8, pos=12, seed=3), QUICK)
    assert lens.weight.abs().sum() > 0                           # it did train
    got = tuned_lens_logits(model, lens, ids)
    assert got.shape == (model.n_layers, 2, model.d_vocab)
    torch.testing.assert_close(got[-1], model.run(ids).last_logits, rtol=1e-4, atol=1e-4)


def test_training_lowers_the_kl_at_every_layer_but_the_last(model):
    windows = random_ids(batch=16, pos=12, seed=4)
    lens = train_tuned_lens(model, windows, QUICK)
    cmp = compare_lenses(model, lens, windows)
    assert (cmp.kl_tuned[:-1] < cmp.kl_logit[:-1]).all(), (cmp.kl_tuned, cmp.kl_logit)
    assert cmp.kl_tuned[-1] == pytest.approx(0, abs=1e-5) and cmp.kl_logit[-1] == pytest.approx(0, abs=1e-5)
    assert cmp.top1_tuned[-1] == 1 and cmp.top1_logit[-1] == 1
    assert 0 < cmp.train_vocab_mass <= 1 + 1e-6
    assert cmp.n_tokens == 16 * (12 - QUICK.skip)


def test_training_is_seeded():
    m = tiny_model("llama")
    windows = random_ids(batch=4, pos=10, seed=5)
    a, b = (train_tuned_lens(m, windows, QUICK) for _ in range(2))
    torch.testing.assert_close(a.weight, b.weight)
    c = train_tuned_lens(m, windows, TunedLensConfig(**{**QUICK.__dict__, "seed": 1}))
    assert not torch.allclose(a.weight, c.weight)


def test_training_leaves_the_model_untouched():
    m = tiny_model("gemma3")
    before = {k: v.clone() for k, v in m.hf.state_dict().items()}
    train_tuned_lens(m, random_ids(batch=4, pos=10, seed=6), QUICK)
    for k, v in m.hf.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert all(p.grad is None for p in m.hf.parameters())


def test_fit_caches_by_model_config_and_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPBOOK_CACHE", str(tmp_path))
    m = tiny_model("llama")
    windows = random_ids(batch=4, pos=10, seed=7)
    first = fit_tuned_lens(m, windows, QUICK)
    files = list((tmp_path / "tuned-lens").iterdir())
    assert len(files) == 1 and files[0].name.startswith("tiny-llama-")

    def no_training(*args, **kwargs):
        raise AssertionError("a cached lens was trained again")

    monkeypatch.setattr(tl, "train_tuned_lens", no_training)
    again = fit_tuned_lens(m, windows, QUICK)
    torch.testing.assert_close(again.weight, first.weight)
    torch.testing.assert_close(again.train_vocab, first.train_vocab)
    with pytest.raises(AssertionError, match="trained again"):       # another corpus is another key
        fit_tuned_lens(m, random_ids(batch=4, pos=10, seed=8), QUICK)
    with pytest.raises(AssertionError, match="trained again"):       # another config too
        fit_tuned_lens(m, windows, TunedLensConfig(**{**QUICK.__dict__, "steps": 61}))
    assert not [p for p in (tmp_path / "tuned-lens").iterdir() if p.suffix != ".pt"]   # no temp files left


def test_bad_input_is_named():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="steps"):
        TunedLensConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TunedLensConfig(lr=0)
    with pytest.raises(ValueError, match="layers"):
        tuned_lens_logits(m, TunedLens(m.n_layers + 1, m.d_model), random_ids())
    with pytest.raises(ValueError, match="n_layers"):
        TunedLens(m.n_layers, m.d_model).translate(torch.zeros(m.n_layers - 1, 2, m.d_model))
    with pytest.raises(ValueError, match="seq_len"):
        tl.collect_states(m, random_ids(batch=2, pos=3), skip=3)


@pytest.mark.integration
def test_pydoc_windows_on_the_real_model():
    import interpbook as ib
    m = ib.load_model()
    train, test = tl.pydoc_windows(m, n_train=4, n_test=2, seq_len=32)
    assert train.shape == (4, 32) and test.shape == (2, 32)
    prefix = m.tokenizer("")["input_ids"]
    assert all(row[: len(prefix)].tolist() == prefix for row in torch.cat([train, test]))
    texts = {m.tokenizer.decode(r) for r in train} & {m.tokenizer.decode(r) for r in test}
    assert not texts
