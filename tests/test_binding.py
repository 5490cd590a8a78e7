"""interpbook.binding: binding datasets, mean interventions, moving cached keys with their
rotary phase, and last-token patching by layer, checked on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from test_circuits import WordTokenizer
from tiny_models import random_ids, tiny_model

from interpbook import binding as B

NAMES = ["Alice", "Bob", "Sarah", "James"]
CITIES = ["Paris", "Tokyo", "Cairo", "Lima"]
ROTARY = ["llama", "qwen2", "gemma3", "neox", "neox_seq"]


def binding_model(family, seed=0):
    m = tiny_model(family, seed)
    text = "Facts: lives in. Where does live? Answer"
    m.tokenizer = WordTokenizer([text] + [" " + w for w in NAMES + CITIES] + NAMES)
    if family == "gemma3":  # keep every key in the cache (the tiny config's window is 4 tokens)
        m.hf.config.sliding_window = 64
    return m


def dataset(m, n=6, **kw):
    return B.binding_dataset(m, n, names=NAMES, cities=CITIES, **kw)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_dataset_prompts_line_up_token_by_token(family):
    m = binding_model(family)
    ds = dataset(m, 8, first_query=1)
    enc = m.tokenize(ds.prompts)
    assert bool(enc["attention_mask"].all())          # equal lengths: no padding
    ids = enc["input_ids"]
    for i, (e, a) in enumerate(zip(ds.entities, ds.attributes)):
        got = [m.tokenizer.decode([int(ids[i, ds.positions[r]])]) for r in B.ROLES]
        assert got == [" " + e[0], " " + a[0], " " + e[1], " " + a[1]]
        assert e[0] != e[1] and a[0] != a[1]
    assert ds.query.tolist() == [1, 0] * 4
    assert torch.equal(ds.answers, ds.attr_ids[torch.arange(8), ds.query])
    assert m.tokenizer.decode([int(ids[0, ds.context_end - 1])]) == "."
    sub = ds.select([0, 2])
    assert sub.prompts == [ds.prompts[0], ds.prompts[2]] and sub.positions == ds.positions


def test_dataset_bad_input():
    m = binding_model("llama")
    with pytest.raises(ValueError, match="positive number"):
        dataset(m, 0)
    with pytest.raises(ValueError, match="first_query"):
        dataset(m, 4, first_query=2)
    with pytest.raises(ValueError, match="at least two"):
        B.binding_dataset(m, 4, names=["Alice"], cities=CITIES)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_zero_mean_intervention_changes_nothing(family):
    m = binding_model(family)
    ds = dataset(m)
    with torch.no_grad():
        run = m.run(ds.prompts, cache="resid_pre")
        resid = run.cache.stack("resid_pre")
        zero = torch.zeros(m.n_layers, m.d_model)
        edited = m.run(ds.prompts, edits=B.binding_edits(m, ds, resid, "E", zero)).last_logits
        shifted = m.run(ds.prompts, edits=B.binding_edits(m, ds, resid, "A", torch.randn(m.n_layers, m.d_model)))
    torch.testing.assert_close(edited, run.last_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shifted.last_logits, run.last_logits, atol=1e-3)
    assert B.switch_rate(m, ds, B.binding_edits(m, ds, resid, "E", zero)) == pytest.approx(
        float((~B.two_way_correct(run.last_logits, ds)).float().mean()))


def test_mean_intervention_bad_input():
    m = binding_model("llama")
    ds = dataset(m)
    resid = torch.zeros(m.n_layers, len(ds), 30, m.d_model)
    with pytest.raises(ValueError, match="'E'"):
        B.binding_edits(m, ds, resid, "X", torch.zeros(m.n_layers, m.d_model))
    with pytest.raises(ValueError, match="n_layers, d_model"):
        B.binding_edits(m, ds, resid, "E", torch.zeros(m.d_model))
    with pytest.raises(ValueError, match="selects none"):
        B.switch_rate(m, ds, [], among=torch.zeros(len(ds), dtype=torch.bool))
    with pytest.raises(ValueError, match="'E'"):
        B.slot_difference(m, ds, "entity")


def test_slot_difference_and_random_control():
    m = binding_model("llama")
    ds = dataset(m)
    d = B.slot_difference(m, ds, "A")
    resid = m.run(ds.prompts, cache="resid_pre").cache.stack("resid_pre")
    want = (resid[:, :, ds.positions["A1"]] - resid[:, :, ds.positions["A0"]]).mean(1)
    torch.testing.assert_close(d, want)
    r = B.random_like(d, seed=3)
    torch.testing.assert_close(r.norm(dim=-1), d.norm(dim=-1))
    assert torch.equal(r, B.random_like(d, seed=3)) and not torch.allclose(r, d)


def test_verdict_rule():
    assert B.mean_intervention_verdict({"E": 0.8, "A": 0.9}, {"E": 0.1, "A": 0.2}) == "reproduces"
    assert B.mean_intervention_verdict({"E": 0.3, "A": 0.9}, {"E": 0.2, "A": 0.2}) == "partially"
    assert B.mean_intervention_verdict({"E": 0.3, "A": 0.4}, {"E": 0.2, "A": 0.3}) == "not at this scale"


# --- moving cached tokens ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ROTARY)
def test_rotating_keys_to_the_same_position_or_there_and_back_is_the_identity(family):
    m = binding_model(family)
    cache, _ = B.context_cache(m, random_ids(2, 9))
    keys = cache.layers[1].keys
    torch.testing.assert_close(B.rotate_keys(m, keys, 1, 0), keys)
    torch.testing.assert_close(B.rotate_keys(m, B.rotate_keys(m, keys, 1, 5), 1, -5), keys, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(B.rotate_keys(m, keys, 1, 3), keys, atol=1e-4)
    there = B.move_cached(m, cache, [2], [6])
    back = B.move_cached(m, there, [6], [2])
    for (k, v), layer in zip([(l.keys, l.values) for l in back.layers], cache.layers):
        torch.testing.assert_close(k[..., 2, :], layer.keys[..., 2, :], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[..., 2, :], layer.values[..., 2, :])
    assert torch.equal(cache.layers[0].keys, B.context_cache(m, random_ids(2, 9))[0].layers[0].keys)  # not mutated


@pytest.mark.parametrize("family", ROTARY)
def test_a_shifted_cache_reproduces_a_prompt_that_really_sits_there(family):
    """Keys re-rotated by +s are the keys of the same tokens computed at positions s.. (no
    absolute positions): a query after them at s+k sees what the full offset run sees."""
    m = binding_model(family)
    ids, k, s = random_ids(2, 10), 6, 7
    cache, _ = B.context_cache(m, ids[:, :k])
    shifted = copy.deepcopy(cache)
    for layer, entry in enumerate(shifted.layers):
        entry.keys = B.rotate_keys(m, entry.keys, layer, s)
    got = B.query_logits(m, shifted, ids[:, k:], start=s + k)
    with torch.no_grad():
        want = m.hf(input_ids=ids, position_ids=torch.arange(s, s + 10)[None].expand(2, -1)).logits[:, -1]
        plain = B.query_logits(m, cache, ids[:, k:])
        wrong = B.query_logits(m, cache, ids[:, k:], start=s + k)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plain, m.hf(input_ids=ids).logits[:, -1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(wrong, want, atol=1e-3)   # unrotated keys at the new positions differ


def test_moving_tokens_bad_input():
    m = binding_model("llama")
    cache, _ = B.context_cache(m, random_ids(2, 5))
    with pytest.raises(IndexError, match="outside the cache"):
        B.move_cached(m, cache, [1], [9])
    with pytest.raises(ValueError, match="same number"):
        B.move_cached(m, cache, [1, 2], [3])
    with pytest.raises(TypeError, match="delta"):
        B.rotate_keys(m, cache.layers[0].keys, 0, 1.5)
    with pytest.raises(ValueError, match="equal"):
        B.context_cache(m, ["Facts: Alice", "Facts: Alice lives in Paris"])
    gpt2 = tiny_model("gpt2")
    gcache, _ = B.context_cache(gpt2, random_ids(2, 5))
    with pytest.raises(ValueError, match="absolute"):
        B.move_cached(gpt2, gcache, [1], [2])


# --- lookbacks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_patching_clean_into_clean_changes_nothing_and_rows_are_layers(family):
    m = binding_model(family)
    base, cf = dataset(m, 4, seed=0), dataset(m, 4, seed=1, first_query=1)
    with torch.no_grad():
        clean = m.run(base.prompts).last_logits
    same = B.patch_last_token_by_layer(m, base.prompts, base.prompts, max_rows=8)
    assert same.shape == (m.n_layers, 4, m.d_vocab)
    torch.testing.assert_close(same, clean.expand_as(same), rtol=1e-4, atol=1e-4)
    got = B.patch_last_token_by_layer(m, base.prompts, cf.prompts, max_rows=5)   # one layer per pass
    cf_cache = m.run(cf.prompts, cache="resid_pre").cache
    for layer in range(m.n_layers):
        from interpbook.tracing import patch
        want = m.run(base.prompts, edits=[patch(("resid_pre", layer), cf_cache["resid_pre", layer][:, -1].clone(),
                                                pos=-1)]).last_logits
        torch.testing.assert_close(got[layer], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one prompt each"):
        B.patch_last_token_by_layer(m, base.prompts, cf.prompts[:2])


@pytest.mark.parametrize("family", ["llama", "gemma3", "neox"])
def test_last_token_patches_on_the_cache_equal_full_passes_with_padding_and_sliding_windows(family):
    """The one-token passes on the base prompts' key/value cache give the logits of full
    patched passes, also for prompts of different lengths (left padding) and for Gemma's
    sliding-window layers with a window shorter than the prompts."""
    m = tiny_model(family)
    text = "Facts: lives in. Where does live? Answer"
    m.tokenizer = WordTokenizer([text] + [" " + w for w in NAMES + CITIES] + NAMES)
    base = ["Facts: " + " ".join(NAMES[:5]) + " Answer", "Where does " + NAMES[1] + " live?"]
    cf = ["Facts: " + CITIES[0] + " lives in " + CITIES[1] + ". Answer", NAMES[2] + " Answer"]
    got = B.patch_last_token_by_layer(m, base, cf, max_rows=4)
    cf_cache = m.run(cf, cache="resid_pre").cache
    for layer in range(m.n_layers):
        from interpbook.tracing import patch
        want = m.run(base, edits=[patch(("resid_pre", layer), cf_cache["resid_pre", layer][:, -1].clone(),
                                        pos=-1)]).last_logits
        torch.testing.assert_close(got[layer], want, rtol=1e-4, atol=1e-4)


def test_lookback_outcomes():
    logits = torch.zeros(2, 4, 10)
    for row, tok in enumerate([1, 2, 3, 9]):
        logits[0, row, tok] = 1.0
    logits[1, :, 2] = 1.0
    base, cf, third = torch.tensor([1] * 4), torch.tensor([2] * 4), torch.tensor([3] * 4)
    codes = B.lookback_outcomes(logits, base, cf, third)
    assert codes[0].tolist() == [0, 1, 2, 3]
    assert codes[1].tolist() == [1, 1, 1, 1]
    assert [B.OUTCOMES[c] for c in codes[0]] == ["base", "counterfactual", "third value", "other"]


# --- the real model ------------------------------------------------------------------------------

def test_real_model_binding_prompts_line_up_and_the_cache_path_agrees(real_model):
    """On the book's model: the default names and cities give aligned prompts; reading the
    question against the context's cache gives the plain forward pass's logits."""
    ds = B.binding_dataset(real_model, 4, seed=0)
    ids = real_model.tokenize(ds.prompts)["input_ids"]
    for role, pos in ds.positions.items():
        slot = int(role[1])
        words = [(e if role[0] == "E" else a)[slot] for e, a in zip(ds.entities, ds.attributes)]
        assert [real_model.tokenizer.decode([int(i)]) for i in ids[:, pos]] == [" " + w for w in words]
    cache, query = B.context_and_query(real_model, ds)
    logits, _ = B.run_last(real_model, ds.prompts)
    torch.testing.assert_close(B.query_logits(real_model, cache, query), logits, rtol=1e-3, atol=1e-3)
