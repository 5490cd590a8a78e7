"""Causal tracing (interpbook.factual.causal_tracing) on tiny random models."""

import pytest
import torch

from interpbook.factual import causal_tracing as CT
from interpbook.factual.facts import Fact, object_token
from tiny_models import tiny_model

FAMILIES = ["llama", "gemma3", "gpt2", "neox"]


class CharTokenizer:
    """One token per character (ids 3..), with offsets; no BOS."""

    pad_token, eos_token, pad_token_id, padding_side, chat_template = "<pad>", "<pad>", 0, "left", None

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False, return_tensors=None,
                 padding=False):
        if isinstance(text, list):
            rows = [self(t)["input_ids"] for t in text]
            width = max(map(len, rows))
            ids = [[0] * (width - len(r)) + r for r in rows]
            mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
            return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        enc = {"input_ids": [3 + (ord(c) % 90) for c in text]}
        if return_offsets_mapping:
            enc["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return enc

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


FACT = Fact("abc", "toy", "xy {} de", "q")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    m = tiny_model(request.param)
    m.tokenizer = CharTokenizer()
    return m


def test_noise_zero_is_clean(model):
    tr = CT.trace_fact(model, FACT, noise=0.0, n_samples=2, window=2)
    assert tr.corrupted == pytest.approx(tr.clean, rel=1e-5)
    for kind in CT.KINDS:
        torch.testing.assert_close(tr.probs[kind], torch.full_like(tr.probs[kind], tr.clean), rtol=1e-4, atol=1e-7)


def test_restoring_every_corrupted_position_gives_the_clean_run(model):
    """Restoring the hidden state at every position, at any layer, gives the clean
    probability; restoring nothing gives the corrupted one."""
    tr = CT.trace_fact(model, FACT, noise=5.0, n_samples=3, kinds=("hidden",))
    assert abs(tr.total_effect) > 1e-6, "the noise should change the output"
    clean_run = model.run(FACT.prompt, cache="resid_post")
    noise = torch.randn(3, len(tr.subject), model.d_model, generator=torch.Generator().manual_seed(0)) * 5.0
    target = object_token(model.tokenizer, FACT.target)
    everything = [("resid_post", [layer], list(range(len(tr.tokens)))) for layer in range(model.n_layers)]
    probs = CT.restored_probs(model, FACT.prompt, target, tr.subject, noise, [("embed", [], 0)] + everything,
                              clean_run.cache, batch_size=7)
    assert float(probs[0]) == pytest.approx(tr.corrupted, rel=1e-4)
    torch.testing.assert_close(probs[1:], torch.full((model.n_layers,), tr.clean), rtol=1e-4, atol=1e-7)


def test_batching_does_not_change_results(model):
    a = CT.trace_fact(model, FACT, noise=2.0, n_samples=2, window=2, batch_size=4)
    b = CT.trace_fact(model, FACT, noise=2.0, n_samples=2, window=2, batch_size=512)
    for kind in CT.KINDS:
        torch.testing.assert_close(a.probs[kind], b.probs[kind], rtol=1e-4, atol=1e-6)
    # positions before the subject are never corrupted: restoring them changes nothing
    for kind in CT.KINDS:
        assert torch.all(a.probs[kind][:, :a.subject[0]] == a.corrupted)
    # tracing chosen positions gives the same columns and NaN elsewhere
    c = CT.trace_fact(model, FACT, noise=2.0, n_samples=2, window=2, positions=[a.subject[-1], -1])
    cols = [a.subject[-1], len(a.tokens) - 1]
    for kind in CT.KINDS:
        torch.testing.assert_close(c.probs[kind][:, cols], a.probs[kind][:, cols], rtol=1e-4, atol=1e-6)
        assert c.probs[kind][:, a.subject[0]].isnan().all()


def test_windows_groups_and_averages():
    assert CT.window_layers(0, 4, 10) == [0, 1, 2, 3]
    assert CT.window_layers(5, 4, 10) == [3, 4, 5, 6]
    assert CT.window_layers(9, 4, 10) == [7, 8, 9]
    with pytest.raises(ValueError, match="at least 1"):
        CT.window_layers(0, 0, 10)
    tr = CT.FactTrace(FACT, list("xy abc de"), [3, 4, 5], 0.5, 0.1,
                      {"hidden": torch.full((2, 9), 0.1)}, 1)
    assert CT.position_groups(tr) == [-1, -1, -1, 0, 1, 2, 3, 4, 5]
    tr.probs["hidden"][:, 5] = 0.3
    aie = CT.average_indirect_effects([tr, tr], "hidden")
    assert aie.shape == (2, len(CT.POSITION_GROUPS))
    assert torch.allclose(aie[:, 2], torch.tensor(0.2)) and torch.allclose(aie[:, 0], torch.tensor(0.0))


def test_bad_input(model):
    with pytest.raises(ValueError, match="unknown kind"):
        CT.trace_fact(model, FACT, noise=1.0, kinds=("resid",))
    with pytest.raises(ValueError, match="noise must be"):
        CT.trace_fact(model, FACT, noise=-1.0)
    with pytest.raises(ValueError, match="needs facts"):
        CT.noise_scale(model, [])
    assert CT.noise_scale(model, [FACT], factor=0.0) == 0.0


def test_restored_runs_equal_full_passes(model):
    """Restored runs reuse the corrupted prompt's keys and values before the restored
    position; each probability equals a full forward pass with the same noise and
    restoration (Gemma's tiny model has sliding windows of 4, shorter than the prompt)."""
    from interpbook.factual.facts import subject_positions
    from interpbook.tracing import edit

    subject = subject_positions(model.tokenizer, FACT)
    target = object_token(model.tokenizer, FACT.target)
    n = model.forward_inputs(FACT.prompt)["input_ids"].shape[1]
    clean = model.run(FACT.prompt, cache=["resid_post", "mlp_out", "attn_out"]).cache
    noise = torch.randn(2, len(subject), model.d_model, generator=torch.Generator().manual_seed(1)) * 3.0
    restorations = [("embed", [], 0), ("resid_post", [0], subject[0]), ("mlp_out", [0, 1], subject[-1]),
                    ("attn_out", [1], -1), ("resid_post", [1], [subject[-1], n - 1])]
    got = CT.restored_probs(model, FACT.prompt, target, subject, noise, restorations, clean, batch_size=4)

    def add_noise(x):
        out = x.clone()
        out[:, subject] += noise.to(x)
        return out

    def restore(key, pos):
        def fn(x):
            out = x.clone()
            out[:, pos] = clean[key][:, pos]
            return out
        return fn

    for (site, layers, pos), p in zip(restorations, got):
        edits = [edit("embed", add_noise)] + [edit((site, la), restore((site, la), pos)) for la in layers]
        with torch.no_grad():
            logits = model.run([FACT.prompt] * 2, edits=edits, last_only=True).logits[:, -1]
        want = logits.float().softmax(-1)[:, target].mean()
        assert float(p) == pytest.approx(float(want), rel=1e-4, abs=1e-7), (site, layers, pos)
    assert len(set(got.tolist())) > 2, "the restorations should differ"
