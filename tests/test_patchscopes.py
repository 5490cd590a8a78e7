"""Patchscopes on tiny random models of every family, plus the real model."""

import pytest
import torch

from interpbook.lenses import logit_lens
from interpbook.patchscopes import (
    ENTITY_FACTS, first_clause, interpretation_prompt, logit_lens_patchscope, patchscope, precision_at_1,
    source_states, states_a_fact,
)
from tiny_models import CONFIGS, random_ids, tiny_model


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def model(request):
    return tiny_model(request.param)


def test_logit_lens_is_a_patchscope(model):
    ids = random_ids(batch=1, pos=6)
    lens = logit_lens(model, ids)[:, 0]
    scope = logit_lens_patchscope(model, ids[0])
    assert scope.shape == (model.n_layers, model.d_vocab)
    torch.testing.assert_close(scope, lens, rtol=1e-4, atol=1e-4)


def test_logit_lens_patchscope_at_an_earlier_position(model):
    ids = random_ids(batch=1, pos=6, seed=3)
    lens = logit_lens(model, ids, pos=2)[:, 0]
    torch.testing.assert_close(logit_lens_patchscope(model, ids[0], pos=2), lens, rtol=1e-4, atol=1e-4)


def test_patching_a_state_into_its_own_prompt_changes_nothing(model):
    ids = random_ids(batch=1, pos=5, seed=4)
    clean = model.run(ids).logits[0, -1]
    for layer in range(model.n_layers):
        got = patchscope(model, ids[0], layer, -1, target_prompt=ids, target_pos=-1)
        torch.testing.assert_close(got, clean, rtol=1e-4, atol=1e-4)


def test_batched_rows_equal_one_at_a_time(model):
    src = random_ids(batch=2, pos=5, seed=5)
    tgt = random_ids(batch=1, pos=4, seed=6)
    both = patchscope(model, src, [0, 2], -1, target_prompt=tgt, target_layer=[1, 0])
    assert both.shape == (2, 2, model.d_vocab)
    for p in range(2):
        for j, (ls, lt) in enumerate([(0, 1), (2, 0)]):
            one = patchscope(model, src[p], ls, -1, target_prompt=tgt, target_layer=lt)
            torch.testing.assert_close(both[p, j], one, rtol=1e-4, atol=1e-4)


def test_mapping_is_applied(model):
    src, tgt = random_ids(batch=1, pos=5, seed=7), random_ids(batch=1, pos=4, seed=8)
    zero = patchscope(model, src[0], 1, -1, tgt, mapping=lambda h: torch.zeros_like(h))
    other = random_ids(batch=1, pos=3, seed=9)
    zero2 = patchscope(model, other[0], 1, -1, tgt, mapping=lambda h: torch.zeros_like(h))
    torch.testing.assert_close(zero, zero2)  # the source no longer matters


def test_source_positions_skip_left_padding(model):
    a, b = random_ids(batch=1, pos=6, seed=10), random_ids(batch=1, pos=4, seed=11)
    batch = {"input_ids": torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)]),
             "attention_mask": torch.cat([torch.ones(1, 6), torch.cat([torch.zeros(1, 2), torch.ones(1, 4)], 1)]).long()}
    states = source_states(model, batch, [1], pos=1)
    alone = source_states(model, b, [1], pos=1)
    torch.testing.assert_close(states[1], alone[0], rtol=1e-4, atol=1e-4)


def test_generation_returns_one_continuation_per_row(model):
    src, tgt = random_ids(batch=2, pos=5, seed=12), random_ids(batch=1, pos=4, seed=13)
    out = patchscope(model, src, [0, 1], -1, tgt, decode="generate", max_new_tokens=3, return_ids=True)
    assert len(out) == 2 and len(out[0]) == 2 and out[0][0].shape == (3,)
    # the first generated token is the next-token patchscope's argmax
    nxt = patchscope(model, src, [0, 1], -1, tgt)
    assert out[1][1][0] == nxt[1, 1].argmax()


def test_errors_are_explained(model):
    ids = random_ids(batch=1, pos=4)
    with pytest.raises(IndexError, match="outside"):
        patchscope(model, ids[0], 0, 9, ids)
    with pytest.raises(IndexError, match="Target layer"):
        patchscope(model, ids[0], 0, -1, ids, target_layer=model.n_layers)
    with pytest.raises(ValueError, match="decode"):
        patchscope(model, ids[0], 0, -1, ids, decode="beam")
    with pytest.raises(ValueError, match="mapping"):
        patchscope(model, ids[0], 0, -1, ids, mapping=lambda h: h[:, :3])


def test_precision_at_1():
    ref = torch.tensor([[0., 1.], [1., 0.]])
    dec = torch.tensor([[[0., 1.], [1., 0.]], [[0., 1.], [1., 0.]]])  # [n=2, layer=2, vocab]
    torch.testing.assert_close(precision_at_1(dec, ref), torch.tensor([0.5, 0.5]))


@pytest.mark.integration
def test_real_model_identity_patchscope_reads_a_token():
    import interpbook as ib
    from interpbook.patchscopes import IDENTITY_PROMPT
    m = ib.load_model()
    logits = patchscope(m, "The Eiffel Tower is in the city of", 25, -1, IDENTITY_PROMPT)
    assert m.tokenizer.decode(logits.argmax()).strip() == "Paris"  # the logit lens still reads punctuation there
    lens = ib.logit_lens(m, "The capital of France is")[:, 0]
    torch.testing.assert_close(logit_lens_patchscope(m, "The capital of France is"), lens, rtol=1e-3, atol=1e-3)


def test_prefix_cache_gives_the_same_answer_as_a_full_pass(model):
    src, tgt = random_ids(batch=2, pos=5, seed=14), random_ids(batch=1, pos=6, seed=15)
    n = tgt.shape[1]
    cached = patchscope(model, src, [0, 2], -1, tgt, target_pos=-1, batch_size=3)
    full = patchscope(model, src, [0, 2], -1, tgt, target_pos=n - 1)  # same position, no cache path? both last
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    gen = patchscope(model, src, [0, 2], -1, tgt, decode="generate", max_new_tokens=2, return_ids=True, batch_size=3)
    assert [int(g[0]) for row in gen for g in row] == cached.argmax(-1).flatten().tolist()


WRONG = [  # fluent descriptions a small model produces that are false of the entity
    ("Harry Potter", "American comic book writer"), ("Harry Potter", "American actor"),
    ("Mount Everest", "mountain in Colorado"), ("Amazon River", "American multinational technology company"),
    ("Barack Obama", "American actor"), ("Taylor Swift", "American actor"), ("Eiffel Tower", "Tower in London"),
    ("Pacific Ocean", "Ocean in the Middle East"), ("Coca-Cola", "Country in the Middle East"),
    ("Albert Einstein", "American actor"), ("New York City", "Country in the Middle East"),
    ("Leonardo da Vinci", "American actor"), ("World War II", "South Korean multinational"),
]
RIGHT = [
    ("Harry Potter", "Fictional wizard"), ("Mount Everest", "Highest mountain on Earth"),
    ("Mount Everest", "Himalayan peak"), ("Albert Einstein", "German-born theoretical physicist"),
    ("Leonardo da Vinci", "Italian Renaissance painter"), ("Barack Obama", "44th President of the United States"),
    ("Coca-Cola", "American soft drink"), ("World War II", "Global war from 1939 to 1945"),
]


@pytest.mark.parametrize("entity, text", WRONG)
def test_wrong_descriptions_score_zero(entity, text):
    assert not states_a_fact(first_clause(text), ENTITY_FACTS[entity])


@pytest.mark.parametrize("entity, text", RIGHT)
def test_right_descriptions_score(entity, text):
    assert states_a_fact(first_clause(text), ENTITY_FACTS[entity])


def test_only_the_first_clause_counts_and_words_match_at_word_starts():
    assert first_clause(" American actor, Barack Obama: 44th president") == "American actor"
    assert not states_a_fact(first_clause("American actor, 44th president"), ENTITY_FACTS["Barack Obama"])
    assert not states_a_fact("Scandinavian band", ["nav"])              # inside a word: no match
    assert states_a_fact("the Himalayas", ["himalaya"])                 # a word's start: match
    assert not states_a_fact("painter", ["italian + painter"])          # every part is needed
    with pytest.raises(TypeError, match="list"):
        states_a_fact("x", "himalaya")


@pytest.mark.integration
def test_interpretation_prompt_finds_its_placeholder():
    import interpbook as ib
    m = ib.load_model()
    text, pos = interpretation_prompt(m)
    ids = m.tokenize(text)["input_ids"][0]
    assert m.tokenizer.decode([int(ids[pos])]).strip() == "X" and pos < -1
    with pytest.raises(ValueError, match="exactly once"):
        interpretation_prompt(m, instruction="no placeholder")
