"""Offline facts and the known-facts filter (interpbook.factual.facts)."""

import pytest
import torch

from interpbook.factual import facts as F


class SpaceTokenizer:
    """Words (with their leading space) are tokens; ids from a fixed table; offsets given."""

    def __init__(self, bos: bool = False):
        self.vocab: dict[str, int] = {}
        self.bos = bos

    def _split(self, text):
        out, start = [], 0
        for i, ch in enumerate(text + " "):
            if ch == " " and i > start:
                out.append((start, i))
                start = i
        return out

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        spans = self._split(text)
        ids = [self.vocab.setdefault(text[a:b], len(self.vocab) + 2) for a, b in spans]
        if self.bos and add_special_tokens:
            ids, spans = [1] + ids, [(0, 0)] + spans
        enc = {"input_ids": ids}
        if return_offsets_mapping:
            enc["offset_mapping"] = spans
        return enc


@pytest.mark.parametrize("relation", F.FACT_RELATIONS)
def test_relations_build_offline_with_provenance(relation):
    facts = F.load_facts(relation)
    assert len(facts) >= 50
    assert len({f.subject for f in facts}) == len(facts), "one fact per subject"
    for f in facts[:20]:
        assert f.relation == relation and f.source and "==" in f.source and f.licence
        assert not f.prompt.startswith(f.subject), "the subject must never be the first token"
        assert f.subject in f.prompt and all(f.subject in p for p in f.paraphrase_prompts)
        assert any(p.startswith("Q:") for p in f.paraphrases), "a question-form paraphrase"


def test_known_values_and_loader_errors():
    assert {(f.subject, f.target) for f in F.country_capital()} >= {("France", "Paris")}
    assert dict((f.subject, f.target) for f in F.country_continent())["Japan"] == "Asia"
    assert dict((f.subject, f.target) for f in F.us_city_state())["Chicago"] == "Illinois"
    symbols = dict((f.subject, f.target) for f in F.element_symbol())
    assert len(symbols) == 118 and symbols["Iron"] == "Fe" and symbols["Oganesson"] == "Og"
    assert len(F.load_facts()) == sum(len(F.load_facts(r)) for r in F.FACT_RELATIONS)
    with pytest.raises(KeyError, match="element_symbols.*available.*element_symbol"):
        F.load_facts("element_symbols")


def test_fact_rejects_bad_templates():
    with pytest.raises(ValueError, match="subject first"):
        F.Fact("France", "r", "{} is in", "Europe")
    with pytest.raises(ValueError, match="exactly one"):
        F.Fact("France", "r", "Fact: X is in", "Europe")
    with pytest.raises(ValueError, match="subject and a target"):
        F.Fact("France", "r", "Fact: {} is in", "")


@pytest.mark.parametrize("bos", [False, True])
def test_subject_positions_follow_the_tokenizer(bos):
    tok = SpaceTokenizer(bos=bos)
    fact = F.Fact("New Zealand", "country_capital", "Fact: The capital of {} is", "Wellington")
    pos = F.subject_positions(tok, fact)
    shift = int(bos)
    assert pos == [4 + shift, 5 + shift]
    assert 0 not in pos
    with pytest.raises(ValueError, match="does not occur"):
        F.subject_positions(tok, fact, "Fact: Paris is nice")


def test_neighbours_share_relation_and_object():
    facts = F.city_country()
    osaka = next(f for f in facts if f.subject == "Osaka")
    near = F.neighbours(osaka, facts)
    assert len(near) >= 2 and all(f.target == "Japan" and f.relation == osaka.relation and f.subject != "Osaka"
                                  for f in near)
    assert F.neighbours(osaka, facts, n=1, seed=0) == F.neighbours(osaka, facts, n=1, seed=0)
    assert len(F.neighbours(osaka, facts, n=1)) == 1


class FakeModel:
    """Predicts a fixed next token per prompt: enough to test the filter."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tokenizer, self.answers = tokenizer, answers

    def logits(self, prompts):
        out = torch.zeros(len(prompts), 200)
        for i, p in enumerate(prompts):
            out[i, F.object_token(self.tokenizer, self.answers[p])] = 5.0
            out[i, F.object_token(self.tokenizer, "runnerup")] = 4.0
        return out


def test_known_facts_keeps_top_k_and_reports_the_fraction():
    tok = SpaceTokenizer()
    fs = [F.Fact(s, "r", "Fact: {} is in", o) for s, o in [("A", "x"), ("B", "y"), ("C", "runnerup")]]
    model = FakeModel(tok, {"Fact: A is in": "x", "Fact: B is in": "z", "Fact: C is in": "q"})
    top1 = F.known_facts(model, fs, batch_size=2)
    assert [f.subject for f in top1] == ["A"] and top1.n_tested == 3
    assert top1.fraction == pytest.approx(1 / 3) and len(top1.probs) == 1
    top2 = F.known_facts(model, fs, top_k=2)
    assert [f.subject for f in top2] == ["A", "C"]
    with pytest.raises(ValueError, match="top_k"):
        F.known_facts(model, fs, top_k=0)
    with pytest.raises(ValueError, match="at least one"):
        F.known_facts(model, [])


@pytest.mark.integration
def test_known_facts_on_the_real_model(real_model):
    fs = [f for f in F.country_capital() if f.subject in ("France", "Japan", "Germany", "Italy")]
    known = F.known_facts(real_model, fs, top_k=5)
    assert 0 < known.fraction <= 1
    for f in known:
        pos = F.subject_positions(real_model.tokenizer, f)
        assert 0 not in pos
