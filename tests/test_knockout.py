"""Attention knockout, subject enrichment and extraction rate (interpbook.factual.knockout)."""

import pytest
import torch

from interpbook.factual import knockout as K
from interpbook.factual.facts import Fact, object_token
from test_causal_tracing import FACT, model  # noqa: F401  (the tiny models with a character tokenizer)


def test_knocking_out_nothing_is_the_identity(model):
    target = object_token(model.tokenizer, FACT.target)
    clean = model.logits(FACT.prompt).softmax(-1)[0, target]
    n = len(FACT.prompt)
    probs = K.knockout_probs(model, FACT.prompt, target, [([], []), (list(range(model.n_layers)), []),
                                                          ([], [1, 2])])
    torch.testing.assert_close(probs, clean.expand(3), rtol=1e-5, atol=1e-7)
    assert n > 3


def test_knockout_changes_only_its_row_and_matches_a_masked_run(model):
    """Knockouts packed as rows of one batch equal the same knockouts run one at a time,
    and cutting every edge into the last position (but the sink's and its own) changes
    the output."""
    target = object_token(model.tokenizer, FACT.target)
    n = len(FACT.prompt)
    everything = (list(range(model.n_layers)), list(range(1, n - 1)))
    late = ([model.n_layers - 1], [2, 3])
    batched = K.knockout_probs(model, FACT.prompt, target, [([], []), everything, late])
    alone = [K.knockout_probs(model, FACT.prompt, target, [b])[0] for b in [([], []), everything, late]]
    torch.testing.assert_close(batched, torch.stack(alone), rtol=1e-5, atol=1e-7)
    assert float(batched[1]) != pytest.approx(float(batched[0]), rel=1e-3)


def test_the_sink_and_the_last_position_are_never_cut():
    assert K.check_sources([3, 1, 3], 6) == [1, 3]
    with pytest.raises(ValueError, match="attention sink"):
        K.check_sources([0, 2], 6)
    with pytest.raises(ValueError, match="last position"):
        K.check_sources([5], 6)
    with pytest.raises(IndexError, match="outside"):
        K.check_sources([9], 6)


def test_scan_shapes_and_relative_change(model):
    scan = K.knockout_scan(model, FACT, window=2)
    assert set(scan) == {"subject", "relation"}
    assert all(v.shape == (model.n_layers,) for v in scan.values())
    assert float(K.relative_change(torch.tensor(0.5), 1.0)) == pytest.approx(-50.0)
    with pytest.raises(ValueError, match="window"):
        K.knockout_scan(model, FACT, window=0)
    with pytest.raises(IndexError, match="layer"):
        with K.knocked_out(model, [([model.n_layers], [1])], 5):
            pass


def test_enrichment_and_extraction(model):
    facts = [FACT, Fact("def", "toy", "xy {} de", "r")]
    # top-k over the whole vocabulary holds every attribute token (the character tokenizer
    # maps " q" and " r" to the same first token, " ")
    own, other = K.subject_enrichment(model, facts, {"abc": {"q"}, "def": {"r"}}, k=model.d_vocab)
    assert torch.allclose(own, torch.tensor(1.0)) and torch.allclose(other, torch.tensor(1.0))
    none, _ = K.subject_enrichment(model, facts, {}, k=5)
    assert torch.all(none == 0)
    rate = K.extraction_rate(model, facts, "mlp_out")
    assert rate.shape == (model.n_layers,) and bool(((rate >= 0) & (rate <= 1)).all())
    events = K.extraction_events(model, facts, "attn_out")
    assert events.shape == (2, model.n_layers) and events.dtype == torch.bool
    # an event is the object as the top token of the update read through the unembedding
    run = model.run([f.prompt for f in facts], cache=("attn_out", 0))
    top = model.anatomy.unembed(run.cache["attn_out", 0][:, -1]).argmax(-1)
    targets = torch.tensor([object_token(model.tokenizer, f.target) for f in facts])
    assert torch.equal(events[:, 0], top == targets)
    with pytest.raises(ValueError, match="site"):
        K.extraction_rate(model, facts, "resid_post")
    with pytest.raises(ValueError, match="two facts"):
        K.subject_enrichment(model, facts[:1], {})
