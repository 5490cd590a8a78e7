"""CounterFact-style cases and scores on tiny models with a character tokenizer."""

import math

import pytest
import torch
from test_rome import CharTokenizer, char_model
from tiny_models import VOCAB

from interpbook.factual import counterfact as CF
from interpbook.factual import rome
from interpbook.factual.facts import Fact

T, P = "Fact: {} is in", ("Q: where is {}? A:",)


def fact(subject, target):
    return Fact(subject, "city_country", T, target, P)


POOL = [fact("ab", "X"), fact("cd", "X"), fact("ef", "X"), fact("gh", "Y"), fact("ij", "Y"), fact("kl", "Z")]


class SpacedCharTokenizer(CharTokenizer):
    """Characters, with a space glued to the character after it (" X" is one token), so
    that objects' first tokens differ as they do for a real tokenizer."""

    def _encode(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text[i] == " " and i + 1 < len(text):
                ids.append(3 + (ord(text[i + 1]) + 47) % (VOCAB - 3))
                i += 2
            else:
                ids.append(3 + ord(text[i]) % (VOCAB - 3))
                i += 1
        return ids


@pytest.fixture(scope="module")
def model():
    m = char_model("llama")
    m.tokenizer = SpacedCharTokenizer()
    return m


def test_n_gram_entropy():
    assert CF.n_gram_entropy([1, 1, 1, 1, 1, 1]) == 0.0
    varied = CF.n_gram_entropy(list(range(12)))
    looped = CF.n_gram_entropy([1, 2, 3] * 4)
    assert looped < varied
    # all n-grams distinct: log2 of their counts, weighted 2/3 and 4/3, averaged
    assert varied == pytest.approx((2 / 3 * math.log2(11) + 4 / 3 * math.log2(10)) / 2)
    with pytest.raises(ValueError):
        CF.n_gram_entropy([1, 2], ns=(2,), weights=(1.0, 2.0))


def test_cases_have_neighbours_with_the_true_object_and_a_different_new_object(model):
    cases = CF.counterfact_cases(model, POOL, POOL, 10, n_neighbours=2)
    assert cases and len({c.fact.subject for c in cases}) == len(cases)
    for c in cases:
        assert c.new_object != c.fact.target
        assert c.neighbours and all(g.target == c.fact.target and g.subject != c.fact.subject for g in c.neighbours)
        assert len(c.neighbours) <= 2
        assert c.request.new_object == " " + c.new_object
    assert "kl" not in {c.fact.subject for c in cases}       # no neighbour shares Z
    assert CF.counterfact_cases(model, POOL, POOL, 10, seed=3) == CF.counterfact_cases(model, POOL, POOL, 10, seed=3)
    with pytest.raises(ValueError, match="neighbour"):
        CF.counterfact_cases(model, [POOL[-1]], POOL, 1)


def test_scores_are_fractions_and_edits_are_undone(model):
    cases = CF.counterfact_cases(model, POOL, POOL, 2)
    row = CF.evaluate_case(model, cases[0], gen_tokens=5)
    assert row["efficacy"] in (0.0, 1.0) and (row["efficacy"] == 1.0) == (row["margin"] > 0)
    for k in ("paraphrase", "neighbourhood"):
        assert 0.0 <= row[k] <= 1.0
    assert row["fluency"] >= 0
    C = torch.eye(model.d_mlp)
    edits = {0: rome.rome_edits(model, 0, [c.request for c in cases], C=C, prefixes=[""], steps=2)}
    before = model.anatomy.W_out(0).detach().clone()
    df = CF.evaluate_edits(model, cases, edits, gen_tokens=0)
    assert list(df.layer) == [-1, -1, 0, 0]
    assert torch.equal(model.anatomy.W_out(0), before)
    with pytest.raises(ValueError, match="one edit per case"):
        CF.evaluate_edits(model, cases, {0: edits[0][:1]})
