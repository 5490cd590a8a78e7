"""ROME on tiny random models of several families: keys, values, the rank-one update, the
exact restore, the cached key second moment."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from interpbook.factual import rome

FAMILIES = ["llama", "gemma3", "gpt2", "neox"]


class CharTokenizer:
    """One token per character (ids 3..VOCAB-1); 0 pads; optional BOS (id 1) like Gemma."""

    pad_token, eos_token, pad_token_id, padding_side, chat_template = "<pad>", "<pad>", 0, "left", None

    def __init__(self, bos: bool = False):
        self.bos = bos

    def _encode(self, text, add_special_tokens=True):
        return ([1] if self.bos and add_special_tokens else []) + [3 + ord(c) % (VOCAB - 3) for c in text]

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True):
        if isinstance(texts, str):
            return {"input_ids": self._encode(texts, add_special_tokens)}
        rows = [self._encode(t, add_special_tokens) for t in texts]
        n = max(map(len, rows))
        return {"input_ids": torch.tensor([[0] * (n - len(r)) + r for r in rows]),
                "attention_mask": torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i) - 3 + 32) if int(i) >= 3 else "" for i in ids)


def char_model(family, bos=False):
    m = tiny_model(family)
    m.tokenizer = CharTokenizer(bos)
    return m


# the subject ends close to the prediction: the tiny Gemma's sliding window is 4 tokens
REQ = rome.EditRequest("So abc:", "abc", "xy")
PREFIXES = ["", "Some words. "]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return char_model(request.param, bos=request.param == "gemma3")


def test_subject_last_position_counts_bos():
    plain, bos = char_model("llama"), char_model("llama", bos=True)
    assert rome.subject_last_positions(plain, ["Fact: abc is"], ["abc"]) == [8]
    assert rome.subject_last_positions(bos, ["Fact: abc is"], ["abc"]) == [9]


def test_keys_are_down_proj_inputs_at_the_subject(model):
    layer = 1
    keys = rome.compute_keys(model, layer, [REQ, rome.EditRequest("Q: where is bb? A:", "bb", "z")], PREFIXES)
    seen = []
    handle = model.anatomy.down_proj(layer).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        for prefix in PREFIXES:
            text = prefix + REQ.prompt
            with torch.no_grad():
                model.hf(**model.forward_inputs(text))
    finally:
        handle.remove()
    pos = [rome.subject_last_positions(model, [p + REQ.prompt], ["abc"])[0] for p in PREFIXES]
    want = torch.stack([s[0, i] for s, i in zip(seen, pos)]).mean(0)
    torch.testing.assert_close(keys[0], want, rtol=1e-4, atol=1e-5)
    # batching with another request changes nothing
    torch.testing.assert_close(rome.compute_keys(model, layer, REQ, PREFIXES)[0], keys[0], rtol=1e-4, atol=1e-5)


def test_value_optimisation_lowers_the_new_objects_nll(model):
    values, nll = rome.compute_values(model, 1, [REQ, rome.EditRequest("Or dd!", "dd", "q")], PREFIXES,
                                      steps=6, stop_nll=0.0, weight_decay=0.0, clamp_norm=100.0, lr=0.2)
    assert values.shape == (2, model.d_model)
    assert nll.shape == (6, 2)
    assert (nll[-1] < nll[0]).all()


def test_requests_do_not_interact(model):
    other = rome.EditRequest("Or dd!", "dd", "q")
    alone, _ = rome.compute_values(model, 1, REQ, PREFIXES, steps=3, stop_nll=0.0)
    together, _ = rome.compute_values(model, 1, [REQ, other], PREFIXES, steps=3, stop_nll=0.0)
    torch.testing.assert_close(together[0], alone[0], rtol=1e-3, atol=1e-4)


def _random_C(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(500, model.d_mlp, generator=g)
    return K.T @ K / len(K)


def test_edit_maps_key_to_value_with_a_rank_one_change_and_restores_exactly(model):
    layer = 1  # an edit in the last layer cannot reach the prediction: no attention after it
    (e,) = rome.rome_edits(model, layer, REQ, C=_random_C(model), prefixes=PREFIXES, steps=3)
    down = model.anatomy.down_proj(layer)
    before = model.anatomy.W_out(layer).detach().clone()
    state = {k: v.clone() for k, v in model.hf.state_dict().items()}
    with rome.edited(model, e):
        after = model.anatomy.W_out(layer).detach().clone()
        with torch.no_grad():
            torch.testing.assert_close(down(e.key), e.value, rtol=1e-4, atol=1e-4)
    change = after - before
    assert torch.linalg.matrix_rank(change.double(), atol=1e-3 * change.abs().max()) == 1
    torch.testing.assert_close(change.T, e.delta(), rtol=1e-5, atol=1e-6)
    for k, v in model.hf.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_edited_restores_after_an_error():
    m = char_model("llama")
    (e,) = rome.rome_edits(m, 0, REQ, C=_random_C(m), prefixes=PREFIXES, steps=1)
    before = m.anatomy.W_out(0).detach().clone()
    with pytest.raises(RuntimeError, match="boom"), rome.edited(m, e):
        raise RuntimeError("boom")
    assert torch.equal(m.anatomy.W_out(0), before)


def test_rank_one_update_is_the_minimum_norm_solution_in_the_C_metric():
    m = char_model("llama")
    C = _random_C(m)
    k, v = torch.randn(m.d_mlp), torch.randn(m.d_model)
    u, r = rome.rank_one_update(m, 0, k, v, C, ridge=0.0)
    torch.testing.assert_close(u @ k, torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    # u is proportional to C^-1 k: C u is parallel to k
    Cu = C @ u
    torch.testing.assert_close(Cu / Cu.norm(), k / k.norm(), rtol=1e-3, atol=1e-4)


def test_second_moments_are_cached_and_match_a_direct_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPBOOK_CACHE", str(tmp_path))
    m = char_model("llama")
    got = rome.key_second_moments(m, [0, 2], n_tokens=256, seq_len=32)
    assert set(got) == {0, 2}
    C = got[2]
    torch.testing.assert_close(C, C.T)
    assert torch.linalg.eigvalsh(C.double()).min() > -1e-6
    assert list(tmp_path.rglob("*.pt")), "nothing cached"
    again = rome.key_second_moments(m, [2, 0], n_tokens=256, seq_len=32)
    assert torch.equal(again[2], C)


def test_bad_input():
    m = char_model("llama")
    with pytest.raises(ValueError, match="does not occur"):
        rome.EditRequest("Fact: abc is", "zz", "x")
    with pytest.raises(ValueError, match="layer must be in"):
        rome.compute_keys(m, m.n_layers, REQ, PREFIXES)
    with pytest.raises(ValueError, match="key must be"):
        rome.rank_one_update(m, 0, torch.zeros(3), torch.zeros(m.d_model), torch.eye(m.d_mlp))
    with pytest.raises(TypeError, match="EditRequest"):
        rome.compute_keys(m, 0, ["Fact: abc"], PREFIXES)
