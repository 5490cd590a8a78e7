"""Activation patching: metrics, and the batched sweep against the one-forward-per-patch loop."""

import pytest
import torch
from tiny_models import CONFIGS, random_ids, tiny_model

from interpbook import patching


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return tiny_model(request.param)


def _metric(logits):
    return patching.logit_diff(logits, [5, 6], [8, 9])


SWEEPS = [("resid_pre", "pos"), ("attn_z", "head"), ("mlp_out", "pos"), ("k", "head"), ("attn_z", "pos")]


def _shared_prefix_pair():
    """A clean/corrupted pair that shares its first three tokens and differs at one or two
    later positions per row (like an IOI pair that swaps one name)."""
    clean = random_ids(seed=1)
    corrupt = clean.clone()
    corrupt[0, 3], corrupt[0, 5], corrupt[1, 4] = 7, 11, 9
    return clean, corrupt


PAIRS = {"all tokens differ": lambda: (random_ids(seed=1), random_ids(seed=2)), "shared prefix": _shared_prefix_pair}


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("site,over", SWEEPS)
def test_batched_sweep_equals_the_naive_loop(model, site, over, pair):
    clean, corrupt = PAIRS[pair]()
    # batch_size 5 with 2 rows: 2 copies per forward, and a last chunk with one copy
    fast = patching.sweep(model, clean, corrupt, site, _metric, over=over, batch_size=5)
    slow = patching.sweep_naive(model, clean, corrupt, site, _metric, over=over)
    n = model.anatomy.n_kv_heads if site == "k" else model.n_heads
    assert fast.shape == (model.n_layers, 7 if over == "pos" else n)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("site,over", [("resid_pre", "pos"), ("attn_z", "head")])
def test_a_logit_diff_metric_unembeds_only_its_columns(model, site, over, monkeypatch):
    """patching.LogitDiff scores like the plain function, and the sweep's patched passes
    compute two logits per row (the answer and wrong ids) instead of the vocabulary."""
    clean, corrupt = _shared_prefix_pair()
    metric = patching.LogitDiff([5, 6], [8, 9])
    logits = torch.randn(2, model.d_vocab)
    torch.testing.assert_close(metric(logits), _metric(logits))
    torch.testing.assert_close(metric.on_columns(logits[:, metric.columns]), _metric(logits))
    widths, forward = [], patching._forward_packed

    def spy(*args, **kw):
        out = forward(*args, **kw)
        widths.append(out.shape[-1])
        return out

    monkeypatch.setattr(patching, "_forward_packed", spy)
    fast = patching.sweep(model, clean, corrupt, site, metric, over=over, batch_size=4)
    assert widths[-1] == 4 and model.hf.get_output_embeddings().out_features == model.d_vocab  # swapped back
    torch.testing.assert_close(fast, patching.sweep_naive(model, clean, corrupt, site, _metric, over=over),
                               atol=1e-5, rtol=1e-5)


def test_a_logit_diff_metric_outside_the_vocabulary_is_refused(model):
    clean, corrupt = _shared_prefix_pair()
    with pytest.raises(ValueError, match="vocabulary"):
        patching.sweep(model, clean, corrupt, "resid_pre", patching.LogitDiff([5], [model.d_vocab]))


@pytest.mark.parametrize("site,over", [("resid_pre", "pos"), ("attn_z", "head")])
def test_sweep_over_a_subset_of_layers(model, site, over):
    clean, corrupt = _shared_prefix_pair()
    layers = [-1, 1]
    fast = patching.sweep(model, clean, corrupt, site, _metric, over=over, layers=layers, batch_size=8)
    torch.testing.assert_close(fast, patching.sweep_naive(model, clean, corrupt, site, _metric, over=over,
                                                          layers=layers), atol=1e-5, rtol=1e-5)


def _packed_passes(monkeypatch):
    """Record (first position, first layer, copies) of every patched forward pass of a sweep
    (not the unedited pass that checks that the model can start at its last layer)."""
    passes, forward = [], patching._forward_packed

    def spy(model, enc, base, edits, copies, *, start=0, first_layer=0, **kw):
        if edits:
            passes.append((start, first_layer, copies))
        return forward(model, enc, base, edits, copies, start=start, first_layer=first_layer, **kw)

    monkeypatch.setattr(patching, "_forward_packed", spy)
    return passes


def test_copies_compute_only_what_the_patch_changes(model, monkeypatch):
    """On a pair that shares its first three tokens: a head patch starts at position 3 and
    at its layer; a position patch starts at its position and layer; resid_pre patches at
    layer 0 of a shared token write the corrupted value, so they need no pass at all."""
    clean, corrupt = _shared_prefix_pair()
    passes = _packed_passes(monkeypatch)
    patching.sweep(model, clean, corrupt, "attn_z", _metric, over="head", batch_size=2 * model.n_heads)
    assert passes == [(3, layer, model.n_heads) for layer in range(model.n_layers)]
    passes.clear()
    patching.sweep(model, clean, corrupt, "resid_pre", _metric, layers=[0], batch_size=2)
    assert passes == [(3, 0, 1), (4, 0, 1), (5, 0, 1)]  # the positions where a token differs
    passes.clear()
    patching.sweep(model, clean, corrupt, "resid_pre", _metric, layers=[1, 2], batch_size=4)
    assert passes == [(p, 1, 2) for p in range(3, 7)]


def test_sweep_without_a_key_value_cache_or_layer_skipping(model, monkeypatch):
    """A model without a plain key/value cache computes copies from position 0; one whose
    decoder layers cannot be swapped out is warned about and runs every layer. Both still
    equal the naive loop."""
    clean, corrupt = _shared_prefix_pair()
    slow = patching.sweep_naive(model, clean, corrupt, "resid_pre", _metric)
    record = patching._corrupted_run
    monkeypatch.setattr(patching, "_corrupted_run", lambda *args: record(*args)._replace(prefix=None))
    passes = _packed_passes(monkeypatch)
    torch.testing.assert_close(patching.sweep(model, clean, corrupt, "resid_pre", _metric, batch_size=4), slow,
                               atol=1e-5, rtol=1e-5)
    assert {start for start, _, _ in passes} == {0} and max(layer for _, layer, _ in passes) > 0
    passes.clear()
    # a stand-in that hands on the wrong residual stream (positions reversed)
    monkeypatch.setattr(patching._Resume, "forward", lambda self, hidden_states, *a, **k: self.resid.flip(1))
    with pytest.warns(UserWarning, match="cannot start a forward pass at a middle layer .the logits differ"):
        fast = patching.sweep(model, clean, corrupt, "resid_pre", _metric, batch_size=4)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert {layer for _, layer, _ in passes} == {0}


def test_the_corrupted_run_keeps_every_layers_keys_and_values(model):
    """Every family keeps a plain key/value cache (so copies can skip the shared positions),
    and the swapped-out layers are put back after a sweep."""
    corrupt = random_ids(seed=2)
    base = patching._corrupted_run(model, model.tokenize(corrupt), "resid_pre", [0])
    assert base.prefix is not None and len(base.prefix) == model.n_layers
    keys, values = base.prefix[0]
    assert keys.shape[0] == 2 and keys.shape[-2] == 7 and values.shape == keys.shape
    blocks = list(model.anatomy.layers())
    patching.sweep(model, random_ids(seed=1), corrupt, "resid_pre", _metric, layers=[-1])
    assert list(model.anatomy.layers()) == blocks


def test_sweep_end_points(model):
    """At the last layer's output, patching the last position gives the clean score and
    patching any earlier position changes nothing (only the final norm and unembedding follow)."""
    clean, corrupt = random_ids(seed=1), random_ids(seed=2)
    clean_score = float(_metric(model.run(clean).last_logits).mean())
    corrupt_score = float(_metric(model.run(corrupt).last_logits).mean())
    effect = patching.sweep(model, clean, corrupt, "resid_post", _metric, layers=[-1])
    assert effect.shape == (1, 7)
    assert float(effect[0, -1]) == pytest.approx(clean_score, abs=1e-4)
    assert effect[0, :-1].tolist() == pytest.approx([corrupt_score] * 6, abs=1e-4)


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("site,over", [("resid_pre", "pos"), ("attn_z", "head")])
def test_sweep_with_padding_shared_by_both_runs(model, site, over, pair):
    """Padded batches are fine when clean and corrupt share the attention mask (the reused
    prefix of a padded row starts with padding)."""
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    ids_clean, ids_corrupt = PAIRS[pair]()
    clean = {"input_ids": ids_clean, "attention_mask": mask}
    corrupt = {"input_ids": ids_corrupt, "attention_mask": mask}
    fast = patching.sweep(model, clean, corrupt, site, _metric, over=over, batch_size=4)
    torch.testing.assert_close(fast, patching.sweep_naive(model, clean, corrupt, site, _metric, over=over),
                               atol=1e-5, rtol=1e-5)


def test_mismatched_inputs_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="same shape"):
        patching.sweep(model, random_ids(pos=7), random_ids(pos=6), "resid_pre", _metric)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 0] = 0
    with pytest.raises(ValueError, match=r"padded differently \(rows \[1\]\)"):
        patching.sweep(model, random_ids(), {"input_ids": random_ids(), "attention_mask": mask}, "resid_pre", _metric)
    with pytest.raises(ValueError, match="per-head site"):
        patching.sweep(model, random_ids(), random_ids(), "resid_pre", _metric, over="head")
    with pytest.raises(ValueError, match="'pos' or 'head'"):
        patching.sweep(model, random_ids(), random_ids(), "resid_pre", _metric, over="layer")
    with pytest.raises(ValueError, match="recorded, not patched"):
        patching.sweep(model, random_ids(), random_ids(), "attn_pattern", _metric)


def test_logit_diff_and_normalized_effect():
    logits = torch.tensor([[0.0, 1.0, 3.0], [2.0, 0.5, 0.0]])
    torch.testing.assert_close(patching.logit_diff(logits, [2, 0], [1, 1]), torch.tensor([2.0, 1.5]))
    torch.testing.assert_close(patching.logit_diff(logits[:, None], 2, 0), torch.tensor([3.0, -2.0]))
    with pytest.raises(ValueError, match="3 ids for 2 rows"):
        patching.logit_diff(logits, [0, 1, 2], 0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        patching.logit_diff(logits, 3, 0)
    torch.testing.assert_close(patching.normalized_effect(torch.tensor([1.0, 3.0]), 3.0, 1.0), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="are equal"):
        patching.normalized_effect(1.0, 2.0, 2.0)


# --- the real model ----------------------------------------------------------------------------
IOI = [("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
       ("When Tom and James went to the park, James gave a ball to", " Tom", " James")]


@pytest.mark.integration
def test_batched_sweep_on_the_real_model(real_model):
    """IOI-style pairs (the corrupted prompt repeats the other name): the batched sweep
    equals the naive loop, and the clean/corrupt logit differences have opposite signs."""
    m = real_model
    clean = [p for p, _, _ in IOI]
    corrupt = [p.replace(f",{b} gave", f",{a} gave") for p, a, b in IOI]
    answers = [m.token_id(a) for _, a, _ in IOI]
    wrong = [m.token_id(b) for _, _, b in IOI]
    assert m.tokenize(clean)["input_ids"].shape == m.tokenize(corrupt)["input_ids"].shape

    def metric(logits):
        return patching.logit_diff(logits, answers, wrong)

    assert float(metric(m.run(clean).last_logits).mean()) > 0 > float(metric(m.run(corrupt).last_logits).mean())
    layers = [0, round(0.7 * m.n_layers), m.n_layers - 1]
    for site, over in [("resid_pre", "pos"), ("attn_z", "head")]:
        fast = patching.sweep(m, clean, corrupt, site, metric, over=over, layers=layers, batch_size=32)
        slow = patching.sweep_naive(m, clean, corrupt, site, metric, over=over, layers=layers)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
