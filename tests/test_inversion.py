"""Language-model inversion helpers: prompt generator, inverter, metrics."""

import pytest
import torch

from interpbook.inversion import (
    TEMPLATES, Vocabulary, bag_of_tokens, inversion_scores, majority_baseline, make_prompts,
    position_accuracy, predict_tokens, train_inverter,
)


def test_prompts_are_distinct_seeded_and_split():
    a, b = make_prompts(300, seed=1), make_prompts(300, seed=1)
    assert a == b and make_prompts(300, seed=2) != a
    assert len(a.train) == 240 and len(a.test) == 60
    assert not set(a.train) & set(a.test)
    assert len(set(a.train + a.test)) == 300
    # every template contributes
    starts = {t.split("{")[0] for t in TEMPLATES}
    assert all(any(p.startswith(s) for p in a.train) for s in starts if s)


def test_token_prf_counts_multisets():
    from interpbook.inversion import _token_prf as token_prf

    assert token_prf([1, 2, 3], [1, 2, 3]) == (1.0, 1.0, 1.0)
    p, r, f = token_prf([7, 7, 7], [7, 8])
    assert (p, r) == (1 / 3, 1 / 2) and abs(f - 0.4) < 1e-9
    assert token_prf([], [1]) == (0.0, 0.0, 0.0)


def test_scores_and_position_accuracy():
    pred, ref = [[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]]
    s = inversion_scores(pred, ref)
    assert s["exact"] == 50.0 and abs(s["f1"] - 75.0) < 1e-9
    acc = position_accuracy(pred, ref, 3)
    assert acc.tolist() == [1.0, 1.0, 0.5]  # last position: 3 == 3, 5 != 6
    with pytest.raises(ValueError):
        inversion_scores(pred, ref[:1])


def test_vocabulary_right_aligns_and_round_trips():
    ids = [[5, 6, 7], [8, 9]]
    v = Vocabulary.from_prompts(ids)
    y = v.targets(ids)
    assert y.shape == (2, 3) and y[1, 0] == 0
    assert v.decode(y) == ids
    assert v.targets([[99]])[0, -1] == -100  # unseen token is ignored in the loss


def test_inverter_learns_an_invertible_map():
    g = torch.Generator().manual_seed(0)
    ids = [[int(a), int(b), int(c)] for a, b, c in torch.randint(10, 20, (300, 3), generator=g)]
    onehot = torch.cat([torch.nn.functional.one_hot(torch.tensor(ids)[:, k] - 10, 10) for k in range(3)], 1).float()
    features = onehot @ torch.randn(30, 64, generator=g)
    inv, vocab = train_inverter(features[:250], ids[:250], hidden=128, epochs=30)
    scores = inversion_scores(predict_tokens(inv, vocab, features[250:]), ids[250:])
    assert scores["exact"] > 90
    base = inversion_scores(majority_baseline(ids[:250], vocab, 50), ids[250:])
    assert base["exact"] < 10


def test_bag_of_tokens_drops_padding():
    x = bag_of_tokens(torch.tensor([[1, 1, 0], [2, 0, 0]]), 4, pad_id=0)
    assert x.tolist() == [[0, 2, 0, 0], [0, 0, 1, 0]]


@pytest.mark.integration
def test_collect_outputs_on_the_real_model():
    import interpbook as ib
    from interpbook.inversion import collect_outputs
    m = ib.load_model()
    prompts = ["Alice lives in Paris and loves", "My old car is in Rome", "The cat"]
    out = collect_outputs(m, prompts, dim=64, continuation_tokens=3, batch_size=2)
    assert out.features.shape == (3, 64) and out.continuation.shape == (3, 3)
    assert out.prompt_ids[2] == m.tokenizer("The cat")["input_ids"]
    # the first step of generation is the model's next-token distribution
    assert int(out.top1[0]) == int(m.run(prompts[0]).last_logits.argmax())


def test_training_works_with_gradients_turned_off():
    features, ids = torch.randn(20, 8), [[1, 2]] * 10 + [[3, 4]] * 10
    with torch.no_grad():
        inv, vocab = train_inverter(features, ids, hidden=16, epochs=2)
    assert len(predict_tokens(inv, vocab, features)) == 20
