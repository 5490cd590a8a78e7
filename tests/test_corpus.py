"""The offline text corpus: cleaned pydoc prose, packing into windows, concept sentences."""

import pytest
import torch

from interpbook import corpus

SAMPLE = '''The "if" statement
******************

The "if" statement is used for conditional execution and it selects exactly
one of the suites by evaluating the expressions one by one.

   if_stmt ::= "if" assignment_expression ":" suite
               ["else" ":" suite]

Short line.

If all expressions are false, the suite of the "else" clause, if present,
is executed and nothing else happens at all here.
'''


def test_clean_topic():
    paras = corpus.clean_topic(SAMPLE)
    assert paras == [
        'The "if" statement is used for conditional execution and it selects exactly one of the '
        'suites by evaluating the expressions one by one.',
        'If all expressions are false, the suite of the "else" clause, if present, is executed and '
        'nothing else happens at all here.',
    ]


def test_pydoc_passages():
    ps = corpus.pydoc_passages()
    assert len(ps) > 300
    assert all("\n" not in p.text and "::=" not in p.text and not p.text.startswith(" ") for p in ps)
    assert all(len(p.text.split()) >= 12 for p in ps)
    assert ps == corpus.pydoc_passages()  # deterministic
    assert {p.topic for p in corpus.pydoc_passages(topics=["if"])} == {"if"}
    assert "PSF" in corpus.PYDOC_LICENSE


def test_pack():
    enc = lambda t: [len(w) for w in t.split()]  # noqa: E731
    W = corpus.pack(enc, ["a bb ccc", "dddd e"], seq_len=3, separator=[0])
    assert torch.equal(W, torch.tensor([[1, 2, 3], [0, 4, 1]]))
    assert corpus.pack(enc, ["a bb ccc dddd e ff"] * 10, seq_len=4, max_tokens=9).shape == (2, 4)
    with pytest.raises(ValueError):
        corpus.pack(enc, ["a"], seq_len=4)
    with pytest.raises(ValueError):
        corpus.pack(enc, ["a"], seq_len=1)
    # a prefix (BOS) starts every window; the text continues across windows
    W = corpus.pack(enc, ["a bb ccc dddd e ff"], seq_len=3, prefix=[9])
    assert torch.equal(W, torch.tensor([[9, 1, 2], [9, 3, 4], [9, 1, 2]]))
    assert corpus.pack(enc, ["a bb ccc dddd e ff"] * 10, seq_len=4, max_tokens=9, prefix=[9]).shape == (2, 4)
    with pytest.raises(ValueError, match="prefix"):
        corpus.pack(enc, ["a bb ccc"], seq_len=3, prefix=[9, 9])


class WordTokenizer:
    """Whitespace tokenizer: a word (with its leading space) is one token."""

    def __init__(self):
        self.vocab = {}

    def _ids(self, text):
        import re
        return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in re.findall(r"\s?\S+", text)]

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True):
        if isinstance(texts, str):
            return {"input_ids": self._ids(texts)}
        rows = [self._ids(t) for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def test_concept_sentences_and_batch():
    items = corpus.concept_sentences(seed=0)
    assert items == corpus.concept_sentences(seed=0) and items != corpus.concept_sentences(seed=1)
    assert len(items) == sum(len(corpus.TEMPLATES[c]) * len(ws) for c, ws in corpus.CONCEPTS.items())
    assert all(w in s and w in corpus.CONCEPTS[c] for c, w, s in items)
    tok = WordTokenizer()
    sub = [("day", "Monday", "We met on Monday morning."), ("colour", "red", "A red car.")]
    batch, labels = corpus.concept_batch(tok, sub)
    assert labels == [[None, None, None, "day", None], [None, "colour", None]]
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"][1].tolist() == [0, 0, 1, 1, 1]


class BOSWordTokenizer(WordTokenizer):
    """Like WordTokenizer, but a plain call starts every text with a BOS id (as Gemma's does)."""

    pad_token_id = 0

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True):
        out = super().__call__(texts, return_tensors, padding, add_special_tokens)
        if isinstance(texts, str) and add_special_tokens:
            out["input_ids"] = [99] + out["input_ids"]
        return out


def test_concept_batch_starts_like_the_tokenizer():
    tok = BOSWordTokenizer()
    batch, labels = corpus.concept_batch(tok, [("day", "Monday", "On Monday."), ("colour", "red", "A red car.")])
    assert labels == [[None, None, "day"], [None, None, "colour", None]]
    assert batch["input_ids"][0].tolist()[-3] == 99 and batch["input_ids"][1, 0].item() == 99
    assert batch["attention_mask"][0].tolist() == [0, 1, 1, 1]
