"""interpbook.circuits: IOI data, path patching and mean-ablation circuit evaluation, checked
against invariants on tiny random models of every family (and cheaply on the real model)."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import CONFIGS, VOCAB, tiny_model

from interpbook import circuits as C
from interpbook.tracing import patch

NAMES = ["Mary", "John", "Alice", "Bob", "Sarah", "James", "Maximilian"]   # the last splits in two
PLACES = ["store", "park"]
OBJECTS = ["drink", "ring"]
TEMPLATES = ("Then, {s} and {io} went to the {place}. {s} gave a {object} to",
             "When {s} and {io} got a {object} at the {place}, {s} gave it to")


class WordTokenizer:
    """Words (with their leading space) and punctuation map to ids 3..; a word it was not
    built with splits into two tokens. Enough of a tokenizer for ioi_dataset."""

    pad_token, eos_token, pad_token_id, padding_side, chat_template, bos_token_id = "<pad>", "<pad>", 0, "left", None, None

    def __init__(self, words):
        self.vocab = {}
        for w in words:
            for piece in self._pieces(w):
                self.vocab.setdefault(piece, 3 + len(self.vocab))
        self.vocab.setdefault("<a>", 3 + len(self.vocab))
        self.vocab.setdefault("<b>", 3 + len(self.vocab))
        assert len(self.vocab) + 3 <= VOCAB
        self.inverse = {i: p for p, i in self.vocab.items()}

    @staticmethod
    def _pieces(text):
        return re.findall(r" ?\w+| ?[^\w\s]", text)

    def _encode(self, text):
        ids = []
        for piece in self._pieces(text):
            ids += [self.vocab[piece]] if piece in self.vocab else [self.vocab["<a>"], self.vocab["<b>"]]
        return ids

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True):
        if isinstance(texts, str):
            return {"input_ids": self._encode(texts)}
        rows = [self._encode(t) for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(n) >= n - torch.tensor([len(r) for r in rows])[:, None]).long()}

    def decode(self, ids):
        return "".join(self.inverse.get(int(i), "?") for i in ids)


def words():
    text = " ".join(t.replace("{", "").replace("}", "") for t in TEMPLATES)
    return [text] + [" " + w for w in NAMES[:-1] + PLACES + OBJECTS]


def ioi_model(family, seed=0):
    m = tiny_model(family, seed)
    m.tokenizer = WordTokenizer(words())
    return m


def dataset(m, n=8, **kw):
    return C.ioi_dataset(m, n, templates=TEMPLATES, names=NAMES, places=PLACES, objects=OBJECTS, **kw)


def all_heads(m):
    return [(l, h) for l in range(m.n_layers) for h in range(m.n_heads)]


FAMILIES = list(CONFIGS)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_dataset_pairs_have_equal_lengths_and_the_right_ids(family):
    m = ioi_model(family)
    ds = dataset(m, 12)
    assert C.single_token_names(m, NAMES) == NAMES[:-1]
    assert ds.names == NAMES[:-1]
    clean, corrupt = m.tokenize(ds.prompts)["input_ids"], m.tokenize(ds.corrupt)["input_ids"]
    assert clean.shape == corrupt.shape
    assert torch.equal(m.tokenize(ds.prompts)["attention_mask"], m.tokenize(ds.corrupt)["attention_mask"])
    rows = torch.arange(len(ds))
    assert torch.equal(clean[rows, ds.pos("io")], ds.answers)
    assert torch.equal(clean[rows, ds.pos("s1")], ds.wrong)
    assert torch.equal(clean[rows, ds.pos("s2")], ds.wrong)
    assert (ds.answers != ds.wrong).all()
    # the ABC prompt puts three other names where the clean one has IO, S, S
    for role in ("io", "s1", "s2"):
        assert (corrupt[rows, ds.pos(role)] != clean[rows, ds.pos(role)]).all()
    assert (corrupt[rows, ds.pos("s1")] != corrupt[rows, ds.pos("s2")]).all()
    assert set(ds.order) == {"BABA", "ABBA"}
    assert ds.template.tolist() == sorted(ds.template.tolist())
    assert ds.prompts == dataset(m, 12).prompts            # seeded
    sub = ds.select([1, 5])
    assert sub.prompts == [ds.prompts[1], ds.prompts[5]] and torch.equal(sub.answers, ds.answers[[1, 5]])


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_ablating_nothing_changes_nothing_and_all_heads_are_faithful(family):
    m = ioi_model(family)
    ds = dataset(m)
    means = C.template_means(m, ds)
    plain = m.run(ds.prompts).logits
    assert C.ablate_except(m, all_heads(m), means) == []
    torch.testing.assert_close(m.run(ds.prompts, edits=C.ablate_except(m, all_heads(m), means)).logits, plain)
    full, empty, one = C.circuit_logit_diffs(m, ds, [all_heads(m), [], [(0, 1)]], means, batch_size=len(ds)).tolist()
    assert full == pytest.approx(float(ds.metric(plain[:, -1])), abs=1e-5)
    assert C.faithfulness(full, float(ds.metric(plain[:, -1]))) == pytest.approx(1.0, abs=1e-5)
    # packing circuits into one forward equals scoring them one by one
    alone = C.circuit_logit_diffs(m, ds, [[(0, 1)]], means)
    assert one == pytest.approx(float(alone[0]), abs=1e-5)
    # ablating every head writes the template means
    edits = C.ablate_except(m, [], means)
    run = m.run(ds.prompts, edits=edits, cache="attn_z")
    torch.testing.assert_close(run.cache["attn_z", 0], means[0])
    assert empty != pytest.approx(full, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_path_patching_with_nothing_to_carry_changes_nothing(family):
    m = ioi_model(family)
    ds = dataset(m)
    last = m.n_layers - 1
    receivers = [(last, 0), (last, 2)]
    # senders at or after the receivers' layer cannot reach them
    late = C.path_patch(m, ds, [(last, 1), (last, 3)], receivers)
    torch.testing.assert_close(late, torch.zeros(2), atol=1e-5, rtol=0)
    # with the corrupted prompts equal to the clean ones, no path carries a difference
    same = ds.select(slice(None))
    same.corrupt = list(same.prompts)
    torch.testing.assert_close(C.path_patch(m, same, [(0, 0), (1, 3)], receivers, site="v", pos=None),
                               torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(C.direct_effects(m, same), torch.zeros(m.n_layers, m.n_heads), atol=1e-5, rtol=0)
    assert C.path_patch(m, ds, [], receivers).numel() == 0
    # packing senders into one forward equals one sender per forward
    senders = [(0, 0), (0, 3), (1, 1)]
    torch.testing.assert_close(C.path_patch(m, ds, senders, receivers, batch_size=len(ds)),
                               C.path_patch(m, ds, senders, receivers), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_effect_of_a_last_layer_head_matches_a_patched_forward(family):
    """For a head of the last layer the direct path is everything but the last MLP: patch
    the head's ABC output at the last position and freeze that MLP to its clean output."""
    m = ioi_model(family)
    ds = dataset(m)
    last = m.n_layers - 1
    clean = m.run(ds.prompts, cache=[("mlp_out", last)])
    abc = m.run(ds.corrupt, cache=[("attn_z", last)])
    base = float(ds.metric(clean.last_logits))
    effects = C.direct_effects(m, ds)
    for head in range(m.n_heads):
        edits = [patch(("attn_z", last), abc.cache["attn_z", last][:, -1, head], pos=-1, head=head),
                 patch(("mlp_out", last), clean.cache["mlp_out", last])]
        patched = float(ds.metric(m.run(ds.prompts, edits=edits).last_logits))
        assert float(effects[last, head]) == pytest.approx((patched - base) / base, abs=1e-4)


def test_copy_scores_are_fractions():
    m = ioi_model("llama")
    ids = torch.arange(3, 20)
    s = C.copy_scores(m, [(0, 0), (2, 3)], ids, k=5)
    assert s.shape == (2,) and bool(((s >= 0) & (s <= 1)).all())
    assert float(C.copy_scores(m, [(1, 1)], ids, k=VOCAB)[0]) == 1.0
    att = C.attention_to(m, dataset(m), "io")
    assert att.shape == (m.n_layers, m.n_heads) and bool(((att >= 0) & (att <= 1)).all())


def test_bad_input_is_refused_with_a_clear_message():
    m = ioi_model("llama")
    ds = dataset(m)
    with pytest.raises(ValueError, match="n_prompts"):
        dataset(m, 1)
    with pytest.raises(ValueError, match="two '\\{s\\}' slots"):
        C.ioi_dataset(m, 4, templates=["{io} gave a drink to"], names=NAMES)
    with pytest.raises(ValueError, match="at least 5"):
        C.ioi_dataset(m, 4, templates=TEMPLATES, names=["Mary", "John", "Maximilian"], places=PLACES, objects=OBJECTS)
    with pytest.raises(TypeError, match="list of non-empty strings"):
        C.single_token_names(m, "Mary")
    with pytest.raises(ValueError, match="site must be"):
        C.path_patch(m, ds, [(0, 0)], [(1, 0)], site="attn_z")
    with pytest.raises(IndexError, match="out of range"):
        C.path_patch(m, ds, [(0, 0)], [(m.n_layers, 0)])
    with pytest.raises(TypeError, match="layer, head"):
        C.circuit_logit_diffs(m, ds, [[3]], C.template_means(m, ds))
    with pytest.raises(ValueError, match="same dataset"):
        C.circuit_logit_diffs(m, ds, [[]], C.template_means(m, ds.select([0, 1])))
    with pytest.raises(ValueError, match="role"):
        ds.pos("object")
    with pytest.raises(ValueError, match="no behaviour"):
        C.faithfulness(1.0, 2.0, 2.0)
