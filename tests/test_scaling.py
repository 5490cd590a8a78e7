"""Scaling up: interpbook under an accelerate device map with offloaded layers, the same
experiments in nnsight and TransformerLens (interpbook.peers), and the appendix's exercise
check, on tiny random models (no download, the network blocked)."""

import copy
import socket
import sys

import pytest
import torch
from accelerate import dispatch_model
from test_causal_tracing import FACT, CharTokenizer
from tiny_models import VOCAB, random_ids, tiny_model

from interpbook import lenses, patching, peers
from interpbook.exercises import CheckFailed
from interpbook.exercises.scaling import check_nnsight_causal_tracing
from interpbook.factual import causal_tracing as CT
from interpbook.lm import Model
from interpbook.models import offload_device_map

FAMILIES = ["llama", "gemma3", "gpt2", "neox"]
ANSWER, WRONG = [5, 6], [7, 8]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may reach the network (peers load nothing; wandb is never started)."""
    def refuse(*args, **kwargs):
        raise OSError("the network is blocked in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    wandb = sys.modules.get("wandb")
    assert wandb is None or getattr(wandb, "run", None) is None, "something started a wandb run"


def offloaded(model: Model, tmp_path, layers, **where) -> Model:
    """A copy of ``model`` dispatched by accelerate: ``layers`` on disk, the rest on the CPU."""
    hf = dispatch_model(copy.deepcopy(model.hf), offload_device_map(model, layers, **where), main_device="cpu",
                        offload_dir=str(tmp_path))
    return Model(hf, model.tokenizer, name=model.name)


@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_layers_give_the_same_numbers(family, tmp_path):
    plain = tiny_model(family)
    layers = list(range(1, plain.n_layers))
    big = offloaded(plain, tmp_path, layers)
    block = big.anatomy.layers()[layers[0]]
    assert hasattr(block, "_hf_hook") and next(block.parameters()).device.type == "meta"  # really offloaded
    ids, corrupt = random_ids(seed=1), random_ids(seed=2)
    a, b = (m.run(ids, cache=["resid_post", "attn_z", "mlp_out"]) for m in (plain, big))
    assert torch.equal(a.logits, b.logits) and all(torch.equal(a.cache[k], b.cache[k]) for k in a.cache)
    torch.testing.assert_close(lenses.logit_lens(big, ids), lenses.logit_lens(plain, ids), rtol=0, atol=1e-6)
    for site, over in [("resid_pre", "pos"), ("attn_z", "head")]:
        sweeps = [patching.sweep(m, ids, corrupt, site, patching.LogitDiff(ANSWER, WRONG), over=over)
                  for m in (plain, big)]
        torch.testing.assert_close(sweeps[1], sweeps[0], rtol=0, atol=1e-5)
    plain.tokenizer = big.tokenizer = CharTokenizer()
    traces = [CT.trace_fact(m, FACT, noise=2.0, n_samples=2, window=2) for m in (plain, big)]
    for kind in CT.KINDS:
        torch.testing.assert_close(traces[1].probs[kind], traces[0].probs[kind], rtol=0, atol=1e-6, equal_nan=True)


def test_an_offloaded_embedding_still_gets_the_inputs(tmp_path):
    plain = tiny_model("qwen2")  # untied: the embedding can go to disk while the unembedding stays
    big = offloaded(plain, tmp_path, [1], embedding="disk")
    assert big.anatomy.W_E.device.type == "meta" and big.device == torch.device("cpu")
    ids = random_ids()
    assert torch.equal(big.logits(ids), plain.logits(ids))


def test_offload_map_names_every_module_once():
    model = tiny_model("gpt2")
    device_map = offload_device_map(model, [0, 2])
    assert device_map["transformer.h.0"] == device_map["transformer.h.2"] == "disk"
    assert device_map["transformer.h.1"] == device_map["lm_head"] == device_map["transformer.wte"] == "cpu"
    assert "transformer" not in device_map and "transformer.h" not in device_map
    with pytest.raises(ValueError, match=r"in 0\.\.2; got \[3\]"):
        offload_device_map(model, [3])


# --- peers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A real (fast) tokenizer over the tiny vocabulary, saved to disk: TransformerLens
    accepts no other kind and reloads it from its folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="t0", eos_token="t0").save_pretrained(folder)
    return folder, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_nnsight_and_transformer_lens_sweeps_equal_interpbooks(family, hf_tokenizer):
    model = tiny_model(family)
    folder, model.tokenizer = hf_tokenizer
    model.hf.config.name_or_path = str(folder)
    clean, corrupt = random_ids(seed=1), random_ids(seed=2)
    metric = lambda logits: patching.logit_diff(logits, ANSWER, WRONG).mean()  # noqa: E731
    lm, bridge = peers.nnsight_model(model), peers.transformer_bridge(model)
    for site, over, layers in [("resid_pre", "pos", [1, 2]), ("attn_z", "head", [0, 2])]:
        ours = patching.sweep(model, clean, corrupt, site, patching.LogitDiff(ANSWER, WRONG), over=over,
                              layers=layers)
        assert ours.abs().max() > 0.01  # the patches change the score: equality below is not trivial
        nn = peers.nnsight_patch_sweep(lm, model, clean, corrupt, metric, site, over, layers)
        tl = peers.transformer_lens_patch_sweep(bridge, clean, corrupt, metric, site, over, layers)
        torch.testing.assert_close(nn, ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(tl, ours, rtol=0, atol=1e-5)
    # causal tracing's restored runs in TransformerLens equal interpbook's
    ids = clean[:1]
    subject, target, layers, pos = [1, 2], 9, [0, 2], 2
    noise = torch.randn(3, len(subject), model.d_model, generator=torch.Generator().manual_seed(0))
    cache = model.run(ids, cache="resid_post").cache
    inputs = {"input_ids": ids}
    want = CT.restored_probs(model, inputs, target, subject, noise, [("resid_post", [la], pos) for la in layers], cache)
    got = peers.transformer_lens_restored_probs(bridge, ids, subject, target, noise, layers, pos)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(want, want[:1].expand_as(want))  # the layer restored matters


def test_unbridgeable_model_is_reported_not_raised(monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    def refuse(*args, **kwargs):
        raise ValueError("Could not determine supported architecture from config.")
    monkeypatch.setattr(TransformerBridge, "boot_transformers", refuse)
    with pytest.raises(peers.PeerUnavailable, match=r"TransformerLens .* cannot bridge LlamaForCausalLM: Could not"):
        peers.transformer_bridge(tiny_model("llama"))


def test_peer_sweeps_name_what_they_patch():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="patch"):
        peers.nnsight_patch_sweep(None, model, random_ids(), random_ids(), None, "mlp_out", "pos", [0])
    with pytest.raises(ValueError, match=r"in 0\.\.2"):
        peers.nnsight_patch_sweep(None, model, random_ids(), random_ids(), None, "resid_pre", "pos", [5])


# --- the exercise ------------------------------------------------------------------------
def nnsight_restored_probs(lm, embed, blocks, input_ids, subject, target, draws, layers, pos, restore=True):
    """A reader's answer: noise on the subject's embeddings, one block's clean output put back."""
    rows = input_ids.repeat(draws.shape[0], 1)
    clean, probs = [], []
    with torch.no_grad():
        with lm.trace(input_ids):
            for layer in layers:
                out = blocks[layer].output
                clean.append((out[0] if isinstance(out, tuple) else out)[0, pos].save())
        with lm.trace() as tracer:
            for i, layer in enumerate(layers):
                with tracer.invoke(rows):
                    embed.output[:, subject] += draws
                    out = blocks[layer].output
                    if restore:
                        (out[0] if isinstance(out, tuple) else out)[:, pos] = clean[i]
                    probs.append(lm.output.logits[:, -1].softmax(-1)[:, target].mean().save())
    return torch.stack([torch.as_tensor(p) for p in probs])


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_exercise_check(family):
    model = tiny_model(family)
    model.tokenizer = CharTokenizer()
    args = dict(noise=3.0, layers=[0, 2])
    assert "same restored probabilities" in str(check_nnsight_causal_tracing(nnsight_restored_probs, model, FACT,
                                                                            **args))
    forgot = lambda *a: nnsight_restored_probs(*a, restore=False)  # noqa: E731
    with pytest.raises(CheckFailed, match="largest difference"):
        check_nnsight_causal_tracing(forgot, model, FACT, **args)
    with pytest.raises(CheckFailed, match="no function yet"):
        check_nnsight_causal_tracing(..., model, FACT, **args)
