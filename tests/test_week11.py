"""Week 11 exercise checks on tiny random models: right answers pass, usual slips fail with
a message that names them."""

import contextlib

import pytest
import torch
from test_rome import char_model

from interpbook.exercises import CheckFailed
from interpbook.exercises import week11 as w
from interpbook.tracing import edit, patch

PROMPT, SUBJECT, NEW = "So abc:", "abc", "xy"
PREFIXES = ["", "Hi. "]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return char_model(request.param, bos=request.param == "gemma3")


# --- answers a reader might write --------------------------------------------------------
def last_subject_position(model, prompt, subject):
    end = prompt.rfind(subject) + len(subject)
    return len(model.tokenizer(prompt[:end])["input_ids"]) - 1


def subject_key(model, layer, prompt, subject, prefixes):
    keys = []
    for p in prefixes:
        acts = model.run(p + prompt, cache=("mlp_act", layer)).cache["mlp_act", layer]
        keys.append(acts[0, last_subject_position(model, p + prompt, subject)])
    return torch.stack(keys).mean(0)


@contextlib.contextmanager
def added(model, layer, pos, delta):
    def hook(_m, _a, out):
        out = out.clone()
        out[0, pos] = out[0, pos] + delta
        return out
    h = model.anatomy.down_proj(layer).register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def subject_value(model, layer, prompt, subject, new_object, steps=40, lr=0.5):
    down = model.anatomy.down_proj(layer)
    with torch.no_grad():
        v0 = down(subject_key(model, layer, prompt, subject, [""]))
    pos = last_subject_position(model, prompt, subject)
    new_id = model.tokenizer(new_object, add_special_tokens=False)["input_ids"][0]
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        with added(model, layer, pos, delta), torch.enable_grad():
            loss = -torch.log_softmax(model.hf(**model.forward_inputs(prompt)).logits[0, -1], -1)[new_id]
            loss.backward()
        opt.step()
    return (v0 + delta).detach()


def rank_one(W, k, v, C):
    u = torch.linalg.solve(C, k)
    return W + torch.outer(v - W @ k, u) / (u @ k)


def noise_and_restore(model, prompt, subject_positions, target, noise, layer, position):
    def add_noise(x):
        x = x.clone()
        x[:, subject_positions] += noise
        return x
    with torch.no_grad():
        clean = model.run(prompt, cache=("resid_post", layer)).cache["resid_post", layer]
        noisy = edit("embed", add_noise)
        p0 = model.logits(prompt, edits=[noisy]).softmax(-1)[0, target]
        p1 = model.logits(prompt, edits=[noisy, patch(("resid_post", layer), clean[:, position], pos=position)]
                          ).softmax(-1)[0, target]
    return float(p0), float(p1)


def knockout(model, prompt, target, sources, layers):
    def pre(_m, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        mask[..., -1, sources] = torch.finfo(mask.dtype).min
        return args, {**kwargs, "attention_mask": mask}
    hs = [model.anatomy.attn(layer).register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            return float(model.logits(prompt).softmax(-1)[0, target])
    finally:
        for h in hs:
            h.remove()


# --- tests -------------------------------------------------------------------------------
def test_last_subject_position(model):
    w.check_last_subject_position(last_subject_position, model, PROMPT, SUBJECT)
    if model.tokenizer.bos:
        with pytest.raises(CheckFailed, match="BOS"):
            w.check_last_subject_position(lambda m, p, s: last_subject_position(m, p, s) - 1, model, PROMPT, SUBJECT)
    with pytest.raises(CheckFailed, match="no function"):
        w.check_last_subject_position(..., model, PROMPT, SUBJECT)


def test_subject_key(model):
    w.check_subject_key(subject_key, model, 1, PROMPT, SUBJECT, PREFIXES)
    with pytest.raises(CheckFailed, match="first prefix only"):
        w.check_subject_key(lambda m, l, p, s, pre: subject_key(m, l, p, s, pre[:1]), model, 1, PROMPT, SUBJECT,
                            PREFIXES)
    with pytest.raises(CheckFailed, match="input"):
        w.check_subject_key(lambda *a: torch.zeros(model.d_model), model, 1, PROMPT, SUBJECT, PREFIXES)


def test_subject_value(model):
    v = subject_value(model, 0, PROMPT, SUBJECT, NEW)
    w.check_subject_value(v, model, 0, PROMPT, SUBJECT, NEW)
    with torch.no_grad():
        unedited = model.anatomy.down_proj(0)(subject_key(model, 0, PROMPT, SUBJECT, [""]))
    with pytest.raises(CheckFailed, match="at least 0.5 nats"):
        w.check_subject_value(unedited, model, 0, PROMPT, SUBJECT, NEW)
    with pytest.raises(CheckFailed, match="d_model"):
        w.check_subject_value(torch.zeros(model.d_mlp), model, 0, PROMPT, SUBJECT, NEW)


def test_rank_one():
    g = torch.Generator().manual_seed(0)
    W, k, v = torch.randn(6, 9, generator=g), torch.randn(9, generator=g), torch.randn(6, generator=g)
    K = torch.randn(40, 9, generator=g)
    C = K.T @ K / 40
    w.check_rank_one(rank_one, W, k, v, C)
    with pytest.raises(CheckFailed, match="misses v"):
        w.check_rank_one(lambda W, k, v, C: W + torch.outer(v - W @ k, k), W, k, v, C)
    with pytest.raises(CheckFailed, match="not k itself"):
        w.check_rank_one(lambda W, k, v, C: W + torch.outer(v - W @ k, k) / (k @ k), W, k, v, C)
    with pytest.raises(CheckFailed, match="not added"):
        w.check_rank_one(lambda W, k, v, C: W, W, k, v, C)


def test_noise_and_restore(model):
    pos = last_subject_position(model, PROMPT, SUBJECT)
    subj = list(range(pos - len(SUBJECT) + 1, pos + 1))
    noise = torch.randn(len(subj), model.d_model, generator=torch.Generator().manual_seed(0)) * 3
    args = (model, PROMPT, subj, 5, noise, 1, pos)
    w.check_noise_and_restore(noise_and_restore, *args)

    def forgot_noise(model, prompt, subject_positions, target, noise, layer, position):
        p0, _ = noise_and_restore(model, prompt, subject_positions, target, noise, layer, position)
        with torch.no_grad():
            return p0, float(model.logits(prompt).softmax(-1)[0, target])
    with pytest.raises(CheckFailed, match="noise still added"):
        w.check_noise_and_restore(forgot_noise, *args)


def test_knockout(model):
    pos = last_subject_position(model, PROMPT, SUBJECT)
    sources = list(range(pos - len(SUBJECT) + 1, pos + 1))
    w.check_knockout(knockout, model, PROMPT, 5, sources, [0, 1])

    def unblocked(model, prompt, target, sources, layers):
        with torch.no_grad():
            return float(model.logits(prompt).softmax(-1)[0, target])
    with pytest.raises(CheckFailed, match="unchanged"):
        w.check_knockout(unblocked, model, PROMPT, 5, sources, [0, 1])
