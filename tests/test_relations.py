"""Offline relation datasets (interpbook.relations)."""

import pytest
import torch

from interpbook import relations as R


class WordTokenizer:
    """One token per word; a word containing 'x' is two tokens."""

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for w in text.split():
            ids += [hash(w) % 1000, 1] if "x" in w.lower() else [hash(w) % 1000]
        return {"input_ids": ids}


@pytest.mark.parametrize("name", list(R.RELATIONS))
def test_relations_build_offline_with_provenance(name):
    rel = R.load_relation(name)
    assert len(rel) >= 30
    assert all(isinstance(s, str) and isinstance(t, str) and s and t for s, t in rel.pairs)
    assert "==" in rel.source and rel.licence
    assert name in rel.provenance() and "licence" in rel.provenance()
    assert "<X>" in rel.template
    prompt = rel.prompt("Atlantis")
    assert prompt.endswith(rel.template.replace("<X>", "Atlantis"))
    assert prompt.count("\n") == len(rel.fewshot)


def test_known_facts():
    assert ("France", "Paris") in R.country_capital().pairs
    assert ("Germany", "German") in R.country_language().pairs
    assert dict(R.city_country().pairs)["Tokyo"] == "Japan"
    names = R.name_copying()
    assert all(s == t for s, t in names.pairs) and ("Mary", "Mary") in names.pairs


def test_single_token_filter():
    rel = R.Relation("toy", (("Paris", "France"), ("Mexico", "Mexico City"), ("Oslo", "Norway"), ("Rome", "Italy")),
                     "<X> is in", source="test==0", licence="none", fewshot=(("Rome", "Italy"),))
    pairs, src, tgt = rel.single_token(WordTokenizer())
    assert pairs == [("Paris", "France"), ("Oslo", "Norway")]
    assert src.dtype == torch.long and src.shape == tgt.shape == (2,)


def test_unknown_relation():
    with pytest.raises(KeyError, match="available"):
        R.load_relation("capital_country")
