"""The Week 1 exercise checks: right answers pass, the usual wrong answers fail with a
message that names the slip. Runs on the real offline model."""

import pytest
import torch

import interpbook as ib
from interpbook.exercises import CheckFailed, CheckResult
from interpbook.exercises import week01 as w

pytestmark = pytest.mark.integration

PROMPT = "The Eiffel Tower is in the city of"
CONT = " Paris, France"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ib.load_model()


def fails(match, fn, *args):
    with pytest.raises(CheckFailed, match=match):
        fn(*args)


# --- Exercise 1 ---------------------------------------------------------------------------
def _logits_and_ids(model):
    p = model.tokenize(PROMPT)["input_ids"][0]
    c = torch.tensor(model.tokenizer(CONT, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model.run(torch.cat([p, c])[None]).logits[0]
    return logits, len(p), c


def test_continuation_logprobs_right(model):
    logits, n_p, c = _logits_and_ids(model)
    answer = logits[n_p - 1 : -1].log_softmax(-1).gather(-1, c[:, None])[:, 0]
    res = w.check_continuation_logprobs(model, PROMPT, CONT, answer)
    assert isinstance(res, CheckResult) and "nats" in str(res)
    # a list of floats and a batch dimension are fine too
    w.check_continuation_logprobs(model, PROMPT, CONT, answer.tolist())
    w.check_continuation_logprobs(model, PROMPT, CONT, answer[None])


def test_continuation_logprobs_wrong(model):
    logits, n_p, c = _logits_and_ids(model)
    right = logits[n_p - 1 : -1].log_softmax(-1).gather(-1, c[:, None])[:, 0]
    f = w.check_continuation_logprobs
    fails("no answer yet", f, model, PROMPT, CONT, ...)
    fails("probabilities, not log-probabilities", f, model, PROMPT, CONT, right.exp())
    fails("raw logits", f, model, PROMPT, CONT, logits[n_p - 1 : -1].gather(-1, c[:, None])[:, 0])
    fails("off by one", f, model, PROMPT, CONT, logits[n_p:].log_softmax(-1).gather(-1, c[:, None])[:, 0])
    fails("total log-probability", f, model, PROMPT, CONT, right.sum())
    fails("keep only the last", f, model, PROMPT, CONT, torch.zeros(n_p + len(c) - 1))
    fails("largest difference", f, model, PROMPT, CONT, right + 0.1)


# --- Exercise 2 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def LH(model):
    """A layer and head taken from the model's shape, never typed in."""
    return model.n_layers // 4, model.n_heads - 1


def _resid_pre(model, prompt, layer):
    return model.run(prompt, cache=("resid_pre", layer)).cache["resid_pre", layer][0]


def _head(model, prompt, layer, head, *, rope=True, scale=True, mask=True, norm=True, qk_norm=True, x=None):
    a = model.anatomy
    attn = a.attn(layer)
    x = _resid_pre(model, prompt, layer) if x is None else x
    n = x.shape[0]
    theta = w.rope_base(model, layer)
    ang = torch.arange(n)[:, None] * theta ** (-torch.arange(0, a.d_head, 2) / a.d_head)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rot(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    with torch.no_grad():
        h = a.ln1(layer)(x) if norm else x
        q, k, v = h @ a.W_Q(layer)[head], h @ a.W_K(layer)[head], h @ a.W_V(layer)[head]
        if qk_norm and hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        if rope:
            q, k = rot(q), rot(k)
        s = q @ k.T * (attn.scaling if scale else 1)
        if mask:
            s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        p = s.softmax(-1)
        return p, p @ v, rot(v)


def test_rope_base_reads_the_configuration(model):
    bases = {w.rope_base(model, l) for l in range(model.n_layers)}
    assert all(b > 1 for b in bases)
    with pytest.raises(ValueError, match="out of range"):
        w.rope_base(model, model.n_layers)


def test_attention_head_right(model, LH):
    LAYER, HEAD = LH
    p, z, _ = _head(model, PROMPT, LAYER, HEAD)
    assert "pattern and z" in str(w.check_attention_head(model, PROMPT, LAYER, HEAD, p, z))
    w.check_attention_head(model, PROMPT, LAYER, HEAD, p.numpy())
    # the last head of the last KV group, deep in the model
    p, z, _ = _head(model, PROMPT, model.n_layers - 1, model.n_heads - 1)
    w.check_attention_head(model, PROMPT, model.n_layers - 1, model.n_heads - 1, p, z)


def test_attention_head_wrong(model, LH):
    LAYER, HEAD = LH
    f = w.check_attention_head
    p, z, rv = _head(model, PROMPT, LAYER, HEAD)
    fails("no answer yet", f, model, PROMPT, LAYER, HEAD, ...)
    fails("transposed", f, model, PROMPT, LAYER, HEAD, p.T)
    fails(r"later positions.*-inf", f, model, PROMPT, LAYER, HEAD, _head(model, PROMPT, LAYER, HEAD, mask=False)[0])
    fails("rotary embedding is missing", f, model, PROMPT, LAYER, HEAD, _head(model, PROMPT, LAYER, HEAD, rope=False)[0])
    fails("sqrt", f, model, PROMPT, LAYER, HEAD, _head(model, PROMPT, LAYER, HEAD, scale=False)[0])
    fails("ln1", f, model, PROMPT, LAYER, HEAD, _head(model, PROMPT, LAYER, HEAD, norm=False)[0])
    fails("select head", f, model, PROMPT, LAYER, HEAD, torch.stack([p] * model.n_heads))
    fails("sum to 1", f, model, PROMPT, LAYER, HEAD, p * 2)
    fails("largest difference", f, model, PROMPT, LAYER, HEAD, _head(model, PROMPT, LAYER, HEAD - 1)[0])
    if hasattr(model.anatomy.attn(LAYER), "q_norm"):
        fails("query and key norms", f, model, PROMPT, LAYER, HEAD, _head(model, PROMPT, LAYER, HEAD, qk_norm=False)[0])
    fails("values", f, model, PROMPT, LAYER, HEAD, p, p @ rv)
    fails("output z", f, model, PROMPT, LAYER, HEAD, p, z + 0.01)


# --- Exercise 3 ---------------------------------------------------------------------------
def _block(model, prompt, layer, *, residual=True, mlp_reads_pre=False, skip_mlp=False):
    a = model.anatomy
    x = _resid_pre(model, prompt, layer)
    p = [_head(model, prompt, layer, h, x=x)[1] for h in range(model.n_heads)]
    with torch.no_grad():
        attn = a.post_attn_norm(layer)(sum(z @ a.W_O(layer)[h] for h, z in enumerate(p)))
        mid = x + attn
        h2 = a.ln2(layer)(x if mlp_reads_pre else mid)
        act = a.act_fn(layer)(h2 @ a.W_gate(layer)) * (h2 @ a.W_in(layer))
        mlp = a.post_mlp_norm(layer)(act @ a.W_out(layer))
        if skip_mlp:
            return mid
        return mid + mlp if residual else attn + mlp


def test_block_forward_right(model):
    for layer in (0, model.n_layers // 3, model.n_layers - 1):
        w.check_block_forward(model, PROMPT, layer, _block(model, PROMPT, layer))


def test_block_forward_wrong(model):
    BLOCK = model.n_layers // 3
    f = w.check_block_forward
    fails("no answer yet", f, model, PROMPT, BLOCK, None)
    fails("resid_mid", f, model, PROMPT, BLOCK, _block(model, PROMPT, BLOCK, skip_mlp=True))
    fails("residual connections", f, model, PROMPT, BLOCK, _block(model, PROMPT, BLOCK, residual=False))
    fails("MLP read resid_pre", f, model, PROMPT, BLOCK, _block(model, PROMPT, BLOCK, mlp_reads_pre=True))
    fails(r"\[pos, d_model\]", f, model, PROMPT, BLOCK, torch.zeros(3, model.d_model))


# --- Exercise 4 ---------------------------------------------------------------------------
def _lens(model, norm=True, site="resid_post"):
    run = model.run(PROMPT, cache=site)
    r = run.cache.stack(site)[:, 0, -1]
    with torch.no_grad():
        logits = model.anatomy.unembed(r) if norm else r @ model.anatomy.W_U
    return [model.tokenizer.decode([int(i)]) for i in logits.argmax(-1)], logits.argmax(-1)


def test_logit_lens_right(model):
    toks, ids = _lens(model)
    assert toks[-1] == model.tokenizer.decode([int(model.run(PROMPT).last_logits[0].argmax())])
    w.check_logit_lens(model, PROMPT, toks)
    w.check_logit_lens(model, PROMPT, ids)  # token ids work too
    w.check_logit_lens(model, PROMPT, ids.tolist())


def test_logit_lens_wrong(model):
    f = w.check_logit_lens
    toks, _ = _lens(model)
    fails("no answer yet", f, model, PROMPT, ...)
    fails("one token per layer", f, model, PROMPT, toks[:5])
    fails("not the embeddings", f, model, PROMPT, ["x"] + toks)
    fails("list with one token per layer", f, model, PROMPT, " Paris")
    no_norm, _ = _lens(model, norm=False)
    assert no_norm != toks  # otherwise the test below tests nothing
    fails("final norm", f, model, PROMPT, no_norm)
    fails("resid_pre", f, model, PROMPT, _lens(model, site="resid_pre")[0])
    fails("model's own prediction", f, model, PROMPT, toks[:-1] + [" London"])


# --- Exercise 5 ---------------------------------------------------------------------------
def test_greedy_right(model):
    ids = model.tokenize(PROMPT)["input_ids"]
    for _ in range(6):
        nxt = model.run(ids).last_logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    text = model.tokenizer.decode(ids[0, -6:])
    assert text == model.generate(PROMPT, max_new_tokens=6)  # the library agrees
    w.check_greedy_generation(model, PROMPT, 6, text)


def test_greedy_wrong(model):
    f = w.check_greedy_generation
    text = model.generate(PROMPT, max_new_tokens=6)
    fails("no answer yet", f, model, PROMPT, 6, ...)
    fails("returned the prompt too", f, model, PROMPT, 6, PROMPT + text)
    fails("exactly 6 new tokens", f, model, PROMPT, 6, model.generate(PROMPT, max_new_tokens=4))
    fails("departs from greedy decoding at new token 0", f, model, PROMPT, 6, " London is a city")
    fails("as a string", f, model, PROMPT, 6, [1, 2, 3])
