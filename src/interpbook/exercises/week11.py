"""Checks for the Week 11 exercises (book chapter ``11-factual-knowledge``, page *Exercises*).

Exercise 1 builds a ROME edit step by step: the subject's last position, the key k*, the
value v* and the rank-one update. Exercise 2 corrupts the subject with noise and restores
one hidden state (causal tracing). Exercise 3 blocks the attention edges from the last
position to the subject in a window of layers (attention knockout). Expected values come
from private references here, written from lower-level pieces (hooks on the native
modules, :class:`interpbook.tracing.Trace` edits), never from a public function with the
name the reader writes. Every check works on any model the anatomy supports.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..tracing import edit, patch
from . import CheckFailed, CheckResult, as_array, check_close

__all__ = ["check_last_subject_position", "check_subject_key", "check_subject_value", "check_rank_one",
           "check_noise_and_restore", "check_knockout"]


def _missing(ex: str, answer: object, what: str) -> None:
    if answer is None or answer is Ellipsis:
        raise CheckFailed(f"{ex}: no {what} yet; replace the `...`")


def _reference_position(model, prompt: str, subject: str) -> int:
    end = prompt.rfind(subject) + len(subject)
    return len(model.tokenizer(prompt[:end])["input_ids"]) - 1


def check_last_subject_position(last_subject_position, model, prompt: str, subject: str) -> CheckResult:
    """Exercise 1a: ``last_subject_position(model, prompt, subject)`` is the index, in the
    model's tokens of ``prompt`` (a BOS token counts), of the subject's last token."""
    ex = "Exercise 1a (last subject position)"
    _missing(ex, last_subject_position, "function")
    got, want = last_subject_position(model, prompt, subject), _reference_position(model, prompt, subject)
    n_bos = len(model.tokenizer("")["input_ids"])
    if got == want - n_bos and n_bos:
        raise CheckFailed(f"{ex}: got {got}, expected {want}: {model.name} adds {n_bos} BOS token(s) at the start; "
                          "count them (tokenize with the special tokens).")
    if got != want:
        tokens = [model.tokenizer.decode([i]) for i in model.tokenizer(prompt)["input_ids"]]
        raise CheckFailed(f"{ex}: got {got}, expected {want} (tokens: {tokens}).")
    return CheckResult(ex, f"the subject {subject!r} ends at token {want}")


@torch.no_grad()
def _reference_key(model, layer: int, prompt: str, subject: str, prefixes: Sequence[str]) -> torch.Tensor:
    keys = []
    for p in prefixes:
        acts = model.run(p + prompt, cache=("mlp_act", layer), stop_early=True).cache["mlp_act", layer]
        keys.append(acts[0, _reference_position(model, p + prompt, subject)])
    return torch.stack(keys).mean(0)


def check_subject_key(subject_key, model, layer: int, prompt: str, subject: str, prefixes: Sequence[str]) -> CheckResult:
    """Exercise 1b: ``subject_key(model, layer, prompt, subject, prefixes)`` is k*, the mean
    over prefixes of the down-projection input ``[d_mlp]`` at the subject's last token of
    ``prefix + prompt``."""
    ex = "Exercise 1b (the key k*)"
    _missing(ex, subject_key, "function")
    got = as_array(subject_key(model, layer, prompt, subject, prefixes), "subject_key's result")
    want = _reference_key(model, layer, prompt, subject, prefixes)
    if got.shape == (model.d_model,):
        raise CheckFailed(f"{ex}: got a [d_model] vector; the key is the down-projection's *input* (the neuron "
                          "activations, site 'mlp_act', [d_mlp]), not a residual-stream vector.")
    last = _reference_key(model, layer, prompt, subject, prefixes[:1])
    if len(prefixes) > 1 and got.shape == tuple(last.shape) and abs(got - last.numpy()).max() < 1e-5:
        raise CheckFailed(f"{ex}: this is the key of the first prefix only; average over all prefixes.")
    check_close(ex, got, want.numpy(), rtol=1e-3, atol=1e-4)
    return CheckResult(ex, f"k* matches at layer {layer} over {len(prefixes)} prefixes")


@contextlib.contextmanager
def _value_at(model, layer: int, pos: int, value: torch.Tensor):
    """Replace the down-projection's output at ``pos`` by ``value`` (batch of one)."""
    def hook(_module, _args, output):
        out = output.clone()
        out[0, pos] = value
        return out
    handle = model.anatomy.down_proj(layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _new_object_logprob(model, prompt: str, new_id: int, layer: int | None = None, pos: int = 0,
                        value: torch.Tensor | None = None) -> float:
    ctx = _value_at(model, layer, pos, value) if value is not None else contextlib.nullcontext()
    with ctx:
        return float(torch.log_softmax(model.logits(prompt)[0].float(), -1)[new_id])


def check_subject_value(value, model, layer: int, prompt: str, subject: str, new_object: str) -> CheckResult:
    """Exercise 1c: ``value`` (v*, ``[d_model]``), written as the down-projection's output
    at the subject's last token of ``prompt``, makes the first token of ``new_object`` at
    0.5 nats more likely (in log-probability) than the unedited model does (a real edit
    gains several nats; the bar is low so that it holds on tiny test models too)."""
    ex = "Exercise 1c (the value v*)"
    _missing(ex, value, "value")
    v = torch.as_tensor(as_array(value, "v*"), dtype=torch.float32)
    if v.shape != (model.d_model,):
        raise CheckFailed(f"{ex}: v* is a down-projection output, shape [d_model] = ({model.d_model},); got "
                          f"{tuple(v.shape)}.")
    new_id = model.tokenizer(new_object, add_special_tokens=False)["input_ids"][0]
    pos = _reference_position(model, prompt, subject)
    before = _new_object_logprob(model, prompt, new_id)
    after = _new_object_logprob(model, prompt, new_id, layer, pos, v)
    if after < before + 0.5:
        raise CheckFailed(f"{ex}: with v* at the subject's last token, log p({new_object!r}) goes from {before:.2f} to "
                          f"{after:.2f}; expected a rise of at least 0.5 nats. Is delta added at the subject position "
                          "(not the last one), and does the loss decrease over the steps?")
    return CheckResult(ex, f"v* raises log p({new_object!r}) from {before:.2f} to {after:.2f}")


def check_rank_one(rank_one, W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, C: torch.Tensor) -> CheckResult:
    """Exercise 1d: ``rank_one(W, k, v, C)`` returns ``W'`` (``W``'s ``[out, in]`` layout)
    with ``W' k = v`` and ``W' - W`` proportional to ``(v - W k) (C^-1 k)^T``."""
    ex = "Exercise 1d (the rank-one update)"
    _missing(ex, rank_one, "function")
    W, k, v, C = (t.detach().double() for t in (W, k, v, C))
    got = torch.as_tensor(as_array(rank_one(W.clone(), k.clone(), v.clone(), C.clone()), "W'"))
    if got.shape != W.shape:
        raise CheckFailed(f"{ex}: W' must have W's shape {tuple(W.shape)}; got {tuple(got.shape)}.")
    if torch.equal(got, W):
        raise CheckFailed(f"{ex}: W' equals W: was the update computed but not added?")
    miss = float((got @ k - v).norm() / v.norm())
    if miss > 1e-4:
        raise CheckFailed(f"{ex}: W' k misses v by a relative {miss:.2e}; the change applied to k must be exactly "
                          "v - W k: divide the outer product by (C^-1 k) . k.")
    u = torch.linalg.solve(C, k)
    want = W + torch.outer(v - W @ k, u) / (u @ k)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
        raise CheckFailed(f"{ex}: W' maps k to v but is not ROME's update: the row direction must be C^-1 k "
                          "(torch.linalg.solve(C, k)), not k itself; it disturbs typical keys least.")
    return CheckResult(ex, "W' maps k* to v* with ROME's rank-one change")


def _embed_noise(noise: torch.Tensor, positions: Sequence[int]):
    def add(x):
        x = x.clone()
        x[:, list(positions)] = x[:, list(positions)] + noise.to(x.dtype)
        return x
    return edit("embed", add)


@torch.no_grad()
def _reference_trace(model, prompt: str, subject_positions, target: int, noise, layer: int, position: int):
    clean = model.run(prompt, cache=("resid_post", layer)).cache["resid_post", layer]
    noisy = _embed_noise(noise, subject_positions)
    p_corrupt = model.logits(prompt, edits=[noisy]).softmax(-1)[0, target]
    restore = patch(("resid_post", layer), clean[:, position], pos=position)
    p_restored = model.logits(prompt, edits=[noisy, restore]).softmax(-1)[0, target]
    return float(p_corrupt), float(p_restored)


def check_noise_and_restore(noise_and_restore, model, prompt: str, subject_positions: Sequence[int], target: int,
                            noise: torch.Tensor, layer: int, position: int) -> CheckResult:
    """Exercise 2: ``noise_and_restore(model, prompt, subject_positions, target, noise,
    layer, position)`` returns ``(p_corrupt, p_restored)``: the probability of ``target``
    with ``noise`` added to the embeddings of the subject's tokens, and the same with the
    clean residual stream after ``layer`` at ``position`` restored."""
    ex = "Exercise 2 (noise and restore)"
    _missing(ex, noise_and_restore, "function")
    got = as_array(noise_and_restore(model, prompt, subject_positions, target, noise, layer, position),
                   "noise_and_restore's result")
    want = _reference_trace(model, prompt, subject_positions, target, noise, layer, position)
    if got.shape != (2,):
        raise CheckFailed(f"{ex}: return two numbers (p_corrupt, p_restored); got shape {got.shape}.")
    with torch.no_grad():
        p_clean = float(model.logits(prompt).softmax(-1)[0, target])
    if abs(got[1] - p_clean) < 1e-6 and abs(want[1] - p_clean) > 1e-4:
        raise CheckFailed(f"{ex}: p_restored equals the clean probability {p_clean:.4f}: is the noise still added "
                          "in the restored run?")
    check_close(ex, got, want, rtol=1e-3, atol=1e-5)
    return CheckResult(ex, f"p corrupt {want[0]:.3f}, restored at layer {layer} position {position} {want[1]:.3f}")


@contextlib.contextmanager
def _blocked(model, layers: Sequence[int], sources: Sequence[int]):
    """The last position cannot attend to ``sources`` in ``layers`` (eager attention mask)."""
    def pre(_module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        mask[..., -1, list(sources)] = torch.finfo(mask.dtype).min
        return args, {**kwargs, "attention_mask": mask}
    handles = [model.anatomy.attn(layer).register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_knockout(knockout, model, prompt: str, target: int, sources: Sequence[int], layers: Sequence[int]) -> CheckResult:
    """Exercise 3: ``knockout(model, prompt, target, sources, layers)`` returns the
    probability of ``target`` when the last position may not attend to ``sources`` in any
    of ``layers``."""
    ex = "Exercise 3 (attention knockout)"
    _missing(ex, knockout, "function")
    got = as_array(knockout(model, prompt, target, sources, layers), "knockout's result")
    with torch.no_grad(), _blocked(model, layers, sources):
        want = float(model.logits(prompt).softmax(-1)[0, target])
    with torch.no_grad():
        clean = float(model.logits(prompt).softmax(-1)[0, target])
    if got.shape not in ((), (1,)):
        raise CheckFailed(f"{ex}: return one probability; got shape {got.shape}.")
    if abs(float(got) - clean) < 1e-7 and abs(want - clean) > 1e-5:
        raise CheckFailed(f"{ex}: the probability is unchanged ({clean:.4f}): is the mask edited in every layer of "
                          "the window, and passed back from the hook?")
    check_close(ex, float(got), want, rtol=1e-3, atol=1e-6)
    return CheckResult(ex, f"p {clean:.3f} -> {want:.3f} with the edges into the last position blocked")
