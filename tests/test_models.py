"""The real offline model: loading, its cache, the registry and error messages."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import interpbook as ib
from interpbook import models

pytestmark = pytest.mark.integration
PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture
def model(real_model):
    return real_model


def test_default_model_and_its_shape(model):
    assert model.name == "smollm2-135m"
    assert (model.n_layers, model.d_model, model.n_heads, model.anatomy.n_kv_heads, model.d_mlp) == (30, 576, 9, 3, 1536)
    assert torch.equal(model.anatomy.W_U, model.anatomy.W_E.T)  # tied embeddings


def test_traced_logits_equal_plain_hf_logits(model):
    inputs = model.tokenize(PROMPT)
    with torch.no_grad():
        plain = model.hf(**inputs).logits
    assert torch.equal(model.run(PROMPT, cache=["resid_post", "attn_z", "attn_pattern", "mlp_act"]).logits, plain)


def test_model_knows_where_the_eiffel_tower_is(model):
    probs = model.logits(PROMPT).softmax(-1)[0]
    assert probs.argmax() == model.token_id(" Paris") and probs.max() > 0.5
    assert model.generate(PROMPT, 3).startswith(" Paris")


def test_logit_lens_last_layer_matches_real_model(model):
    lens = ib.logit_lens(model, [PROMPT, "One, two, three, four"])
    torch.testing.assert_close(lens[-1], model.logits([PROMPT, "One, two, three, four"]), atol=1e-4, rtol=1e-4)


def test_single_token_check(model):
    assert model.token_id(" Paris") == model.tokenizer(" Paris")["input_ids"][0]
    with pytest.raises(ValueError, match=r"' Tel Aviv' is 2 tokens \[' Tel', ' Aviv'\], not one"):
        model.token_id(" Tel Aviv")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(models.ModelNotInstalled, match=r"Did you mean 'smollm2-135m'.*Known offline models: smollm2-135m"):
        ib.load_model("smolm2-135m")


def test_absent_hub_model_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(models.ModelNotInstalled, match="not in the local Hugging Face cache"):
        ib.load_model("openai-community/gpt2")
    assert time.perf_counter() - start < 5


def test_environment_variable_chooses_the_model(monkeypatch):
    monkeypatch.setenv("INTERPBOOK_MODEL", "no-such-model")
    with pytest.raises(models.ModelNotInstalled, match="'no-such-model'"):
        ib.load_model()


def test_describe_models_says_what_is_installed():
    text = ib.describe_models()
    assert "smollm2-135m" in text and "gemma-3-270m" in text and "default model: smollm2-135m" in text


def test_device_map_passes_through_to_accelerate():
    m = ib.load_model(device_map="auto")
    assert m.device.type == "cpu" and m.logits("Hello").shape == (1, m.d_vocab)


@pytest.mark.parametrize("variable, value, message", [
    ("INTERPBOOK_DEVICE", "gpu", r"Unknown device INTERPBOOK_DEVICE='gpu' \(environment variable\)"),
    ("INTERPBOOK_DEVICE", "meta", "holds no weights"),
    ("INTERPBOOK_DEVICE_MAP", "everywhere", r"Unknown device map INTERPBOOK_DEVICE_MAP='everywhere'.*auto"),
    ("INTERPBOOK_DTYPE", "float8", r"Unknown dtype INTERPBOOK_DTYPE='float8'.*bfloat16"),
])
def test_bad_device_settings_fail_before_loading(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(models, "_source", lambda name: pytest.fail("loaded a model despite a bad setting"))
    with pytest.raises(ValueError, match=message):
        ib.load_model()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_absent_accelerator_is_named():
    with pytest.raises(ValueError, match="no cuda device"):
        models.resolve_device("cuda")


def test_device_and_device_map_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        ib.load_model(device="cpu", device_map="auto")


@pytest.mark.integration
def test_loaded_weights_do_not_require_gradients(real_model):
    """An inference model: gradient-mode passes keep only what input gradients need."""
    assert not any(p.requires_grad for p in real_model.hf.parameters())


def test_device_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("INTERPBOOK_DEVICE", "cpu")
    monkeypatch.setenv("INTERPBOOK_DTYPE", "bfloat16")
    m = ib.load_model()
    assert m.device == torch.device("cpu") and m.hf.dtype == torch.bfloat16
    assert m.logits(PROMPT).dtype == torch.bfloat16
    from transformers import AutoModelForCausalLM

    seen, load = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: seen.append(kw) or load(*a, **kw))
    monkeypatch.setenv("INTERPBOOK_DEVICE_MAP", "auto")
    monkeypatch.delenv("INTERPBOOK_DTYPE")
    assert ib.load_model().hf.dtype == torch.float32
    ib.load_model(device="cpu")  # a device given in code wins over the environment's map
    assert [kw["device_map"] for kw in seen] == ["auto", None]


def test_incomplete_cache_is_never_trusted(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    weights = target / "model.safetensors"
    weights.write_bytes(b"x" * 100)
    assert not models._cache_is_complete(target, "abc")  # no marker: half-written
    (target / models._MARKER).write_text(json.dumps({"source": "abc", "files": {"model.safetensors": models._fingerprint(weights)}}))
    assert models._cache_is_complete(target, "abc")
    assert not models._cache_is_complete(target, "other")  # converted from another file
    os.utime(weights, ns=(1, 1))  # touched, same content: still trusted (and re-hashed once)
    assert models._cache_is_complete(target, "abc")
    weights.write_bytes(b"y" * 100)  # same size, other content
    assert not models._cache_is_complete(target, "abc")
    weights.write_bytes(b"x" * 50)
    assert not models._cache_is_complete(target, "abc")  # truncated
    (target / models._MARKER).write_text("{not json")
    assert not models._cache_is_complete(target, "abc")


def test_legacy_size_only_marker_is_upgraded(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"x" * 100)
    (target / models._MARKER).write_text(json.dumps({"source": "abc", "files": {"model.safetensors": 100}}))
    assert not models._cache_is_complete(target, "abc")
    models._upgrade_legacy_marker(target, "abc")
    assert models._cache_is_complete(target, "abc")


LOAD = "import interpbook as ib; m = ib.load_model(); print(m.logits('Hello').argmax().item())"


def test_concurrent_first_loads_and_a_corrupted_cache(tmp_path):
    """Two kernels converting at once both succeed (file lock); a truncated cache file is
    detected and rebuilt rather than loaded."""
    env = {**os.environ, "INTERPBOOK_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    weights = tmp_path / "smollm2-135m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1 << 20])
    again = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""  # a conversion prints nothing into a book page
    assert again.stdout.strip() == outs[0]
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "smollm2-135m"]
    assert leftovers == []  # no half-written temp directories
