"""Checks for the Week 1 exercises (book chapter ``01-introduction``, page *Exercises*).

Each ``check_*`` computes the reference answer on the reader's own ``model`` (so the
exercises work on any model the book runs on), compares, and either returns a
:class:`~interpbook.exercises.CheckResult` or raises
:class:`~interpbook.exercises.CheckFailed`. When an answer is wrong, the check also tries
the usual slips (a missing causal mask, the rotary embedding left out, an off-by-one
between logits and targets, ...) and names the one that reproduces the reader's answer.
The diagnoses of the attention exercise need a rotary model (the Llama family, Gemma 3);
on other families the check still grades, with the generic message.

The reference answers are private (``_reference_...``): a reader who imports from this
module finds the checks and :func:`rope_base`, not the solutions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import CheckFailed, CheckResult, as_array, check_close

__all__ = [
    "check_continuation_logprobs",
    "rope_base",
    "check_attention_head",
    "check_block_forward",
    "check_logit_lens",
    "check_greedy_generation",
]


# --- helpers ----------------------------------------------------------------------------
def _matches(actual: np.ndarray, expected: torch.Tensor | np.ndarray, rtol: float, atol: float) -> bool:
    want = as_array(expected)
    return actual.shape == want.shape and bool(np.allclose(actual, want, rtol=rtol, atol=atol))


def _answer(exercise: str, value: object, name: str) -> np.ndarray:
    if value is None or value is Ellipsis:
        raise CheckFailed(f"{exercise}: no answer yet for {name} (got {value!r}); replace the `...`")
    return as_array(value, name)


def _squeeze_batch(x: np.ndarray, ndim: int) -> np.ndarray:
    """Accept a leading batch dimension of size 1."""
    return x[0] if x.ndim == ndim + 1 and x.shape[0] == 1 else x


def _diagnose(exercise: str, got: np.ndarray, variants: dict[str, object], rtol: float, atol: float) -> None:
    """Raise CheckFailed naming the first slip whose output equals the reader's answer."""
    for message, value in variants.items():
        if value is not None and _matches(got, value, rtol, atol):
            raise CheckFailed(f"{exercise}: {message}")


# --- Exercise 1: log-probabilities of a continuation ---------------------------------------
def _continuation_ids(model, prompt: str, continuation: str) -> tuple[torch.Tensor, torch.Tensor]:
    prompt_ids = model.tokenize(prompt)["input_ids"][0]
    cont = model.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not cont:
        raise ValueError(f"the continuation {continuation!r} has no tokens")
    return prompt_ids, torch.tensor(cont, device=prompt_ids.device)


def _reference_continuation_logprobs(model, prompt: str, continuation: str) -> torch.Tensor:
    """Reference: ``log p(token | everything before it)`` for each token of ``continuation``.

    The prompt and the continuation are tokenised separately and concatenated (as when a
    model generates the continuation after the prompt). Returns a float tensor ``[n]``,
    one natural-log probability per continuation token.
    """
    prompt_ids, cont_ids = _continuation_ids(model, prompt, continuation)
    ids = torch.cat([prompt_ids, cont_ids])
    with torch.no_grad():
        logits = model.run(ids[None]).logits[0]
    logprobs = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)
    return logprobs.gather(-1, cont_ids[:, None])[:, 0]


def check_continuation_logprobs(model, prompt: str, continuation: str, logprobs: object) -> CheckResult:
    """Exercise 1: per-token log-probabilities of ``continuation`` after ``prompt``."""
    ex = "Exercise 1"
    got = _answer(ex, logprobs, "logprobs")
    prompt_ids, cont_ids = _continuation_ids(model, prompt, continuation)
    ref = _reference_continuation_logprobs(model, prompt, continuation)
    n, n_prompt = len(cont_ids), len(prompt_ids)
    if got.ndim == 0 or got.size == 1:
        if np.isclose(got.reshape(()), float(ref.sum()), rtol=1e-4, atol=1e-4):
            raise CheckFailed(f"{ex}: that is the total log-probability of the continuation (correct!), "
                              f"but the exercise asks for one value per token: a tensor of shape ({n},)")
    got = _squeeze_batch(got, 1)
    if got.ndim == 1 and got.shape[0] == n_prompt + n - 1:
        raise CheckFailed(f"{ex}: you returned {got.shape[0]} values, one for every predicted token of "
                          f"prompt + continuation; keep only the last {n}, those of the continuation tokens")
    if got.ndim == 1 and got.shape[0] == n_prompt + n:
        raise CheckFailed(f"{ex}: you returned {got.shape[0]} values, one per input position; the "
                          f"continuation's {n} tokens are predicted by the logits at positions "
                          f"{n_prompt - 1}..{n_prompt + n - 2}")
    if got.ndim == 2 and got.shape[-1] == model.d_vocab:
        raise CheckFailed(f"{ex}: you returned a full distribution per position {tuple(got.shape)}; "
                          "pick out the log-probability of the token that actually comes next (gather)")
    if got.shape == (n,) and not _matches(got, ref, 1e-4, 1e-4):
        ids = torch.cat([prompt_ids, cont_ids])
        with torch.no_grad():
            logits = model.run(ids[None]).logits[0]
        targets = cont_ids[:, None]
        shifted = logits[n_prompt:].log_softmax(-1)
        _diagnose(ex, got, {
            "these are probabilities, not log-probabilities: take the natural log "
            "(or use log_softmax instead of softmax)": ref.exp(),
            "these are raw logits of the right tokens; turn logits into log-probabilities with "
            "log_softmax over the vocabulary first": logits[n_prompt - 1 : -1].gather(-1, targets)[:, 0],
            "off by one: you read each token's log-prob from the logits at its own position; the "
            "logits at position t predict token t + 1, so token i of the continuation is scored by "
            f"the logits at position {n_prompt - 1} + i": shifted.gather(-1, targets)[:, 0],
            "these are log-probabilities in base 2; use the natural log": ref / np.log(2),
            "the sign is flipped: log-probabilities are negative (<= 0)": -ref,
        }, 1e-4, 1e-4)
    check_close(ex, got, ref, rtol=1e-4, atol=1e-4)
    return CheckResult(ex, f"all {n} log-probs match (total {float(ref.sum()):.3f} nats)")


# --- Exercise 2: one attention head by hand ----------------------------------------------
def rope_base(model, layer: int) -> float:
    """The rotary base ``b`` of ``layer``, for the angles ``theta_k = b ** (-2k / d_head)``.

    Read from the model's configuration: one base per model (Llama family), or one per kind
    of layer (Gemma 3: a small base in the local sliding-window layers, a large one in the
    global layers). Raises ``ValueError`` for a model without rotary embeddings, or whose
    rotary frequencies are rescaled (then the plain formula does not apply).
    """
    cfg = model.hf.config
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{model.n_layers - 1}")
    params = getattr(cfg, "rope_parameters", None) or {}
    kinds = getattr(cfg, "layer_types", None)
    if kinds and kinds[layer] in params:
        params = params[kinds[layer]]
    base = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if base is None:
        raise ValueError(f"{model.name} has no rotary position embedding in its configuration")
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"{model.name} rescales its rotary frequencies (rope_type {params['rope_type']!r}); "
                         "take cos and sin from model.hf.base_model.rotary_emb instead of the plain formula")
    return float(base)


def _rotary(model, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = model.anatomy
    inv_freq = rope_base(model, layer) ** (-torch.arange(0, a.d_head, 2, dtype=torch.float32) / a.d_head)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [pos, d_head]`` (the rotate-half layout of Llama and Gemma)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _has_rotary(model) -> bool:
    try:
        rope_base(model, 0)
    except ValueError:
        return False
    return True


def _head_variants(model, resid_pre: torch.Tensor, layer: int, head: int) -> dict[str, tuple]:
    """Pattern and output of one head computed with each usual slip (rotary models only)."""
    a = model.anatomy
    attn = a.attn(layer)
    n = resid_pre.shape[0]
    cos, sin = _rotary(model, layer, n)
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    has_qk_norm = hasattr(attn, "q_norm")

    def head_out(norm=True, rope=True, scale=True, causal=True, rotate_v=False, qk_norm=True):
        h = a.ln1(layer)(resid_pre) if norm else resid_pre
        q, k, v = (h @ W(layer)[head] + (0 if b(layer) is None else b(layer)[head])
                   for W, b in [(a.W_Q, a.b_Q), (a.W_K, a.b_K), (a.W_V, a.b_V)])
        if has_qk_norm and qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if rope:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if rotate_v:
            v = _rotate(v, cos, sin)
        scores = q @ k.T * (attn.scaling if scale else 1.0)
        if causal:
            scores = scores.masked_fill(mask, float("-inf"))
        pattern = scores.softmax(-1)
        return pattern, pattern @ v

    with torch.no_grad():
        variants = {
            "no_rope": head_out(rope=False), "no_scale": head_out(scale=False),
            "no_mask": head_out(causal=False), "no_norm": head_out(norm=False),
            "rotated_v": head_out(rotate_v=True),
        }
        if has_qk_norm:
            variants["no_qk_norm"] = head_out(qk_norm=False)
    return variants


def check_attention_head(model, prompt: str, layer: int, head: int, pattern: object, z: object = None) -> CheckResult:
    """Exercise 2: the attention pattern ``[query, key]`` (and optionally the output
    ``z [pos, d_head]``) of head ``head`` in layer ``layer`` on ``prompt``, computed by hand."""
    ex = f"Exercise 2 (head {layer}.{head})"
    got = _squeeze_batch(_answer(ex, pattern, "pattern"), 2)
    run = model.run(prompt, cache=[("resid_pre", layer), ("attn_pattern", layer), ("attn_z", layer)])
    ref = run.cache["attn_pattern", layer][0, head]
    ref_z = run.cache["attn_z", layer][0, :, head]
    n = ref.shape[0]
    if got.shape == (model.n_heads, n, n):
        raise CheckFailed(f"{ex}: you returned the patterns of all {model.n_heads} heads {got.shape}; "
                          f"select head {head}")
    if got.shape != (n, n):
        raise CheckFailed(f"{ex}: the pattern should be [query, key] = ({n}, {n}) for this {n}-token "
                          f"prompt, got {tuple(got.shape)}")
    tol = dict(rtol=1e-4, atol=1e-5)
    variants = _head_variants(model, run.cache["resid_pre", layer][0], layer, head) if _has_rotary(model) else {}
    if not _matches(got, ref, **tol):
        rows = got.sum(-1)
        if _matches(got.T, ref, **tol):
            raise CheckFailed(f"{ex}: your pattern is transposed; index it [query, key], so that each "
                              "row is a distribution over the positions the query attends to")
        if np.triu(np.abs(got), 1).max() > 1e-6:
            extra = (" (with the mask it would be right otherwise)" if "no_mask" in variants
                     and _matches(got, variants["no_mask"][0], **tol) else "")
            raise CheckFailed(f"{ex}: position q attends to later positions k > q{extra}; a causal model "
                              "only looks back: set the scores above the diagonal to -inf before the softmax")
        if not np.allclose(rows, 1.0, atol=1e-4):
            raise CheckFailed(f"{ex}: rows of the pattern should sum to 1 (softmax over the key axis, the "
                              f"last one); yours sum to {rows.min():.3g}..{rows.max():.3g}")
        _diagnose(ex, got, {
            "the rotary embedding is missing: rotate q and k by their positions (RoPE) before "
            "the dot product": variants.get("no_rope", (None,))[0],
            "the scores are not scaled: multiply q·k by the attention's scale before the softmax "
            "(1/sqrt(d_head) in the Llama family; model.anatomy.attn(layer).scaling holds it)":
                variants.get("no_scale", (None,))[0],
            "the query and key norms are missing: this model normalises every query and key "
            "(model.anatomy.attn(layer).q_norm and .k_norm) before the rotation":
                variants.get("no_qk_norm", (None,))[0],
            "the block's input norm is missing: apply ln1 (RMSNorm) to resid_pre before projecting "
            "to q, k, v": variants.get("no_norm", (None,))[0],
        }, **tol)
        check_close(ex, got, ref, **tol)
    if z is None:
        return CheckResult(ex, f"the {n}x{n} pattern matches")
    got_z = _squeeze_batch(_answer(ex, z, "z"), 2)
    if got_z.shape != tuple(ref_z.shape):
        raise CheckFailed(f"{ex}: z should be [pos, d_head] = {tuple(ref_z.shape)}, got {tuple(got_z.shape)}")
    _diagnose(ex, got_z, {
        "z rotates v: the rotary embedding applies to queries and keys only, never to values":
            variants.get("rotated_v", (None, None))[1],
    }, rtol=1e-4, atol=1e-4)
    check_close(ex + " output z", got_z, ref_z, rtol=1e-4, atol=1e-4)
    return CheckResult(ex, f"the {n}x{n} pattern and z {tuple(ref_z.shape)} match")


# --- Exercise 3: one block by hand ---------------------------------------------------------
def check_block_forward(model, prompt: str, layer: int, resid_post: object) -> CheckResult:
    """Exercise 3: the residual stream leaving block ``layer`` ``[pos, d_model]``, computed by
    hand from the residual stream entering it."""
    ex = f"Exercise 3 (block {layer})"
    got = _squeeze_batch(_answer(ex, resid_post, "resid_post"), 2)
    sites = ["resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post"]
    run = model.run(prompt, cache=[(s, layer) for s in sites])
    c = {s: run.cache[s, layer][0] for s in sites}
    ref = c["resid_post"]
    # The residual stream of the first token can be huge (an "attention sink"): scale the
    # absolute tolerance with it so float32 round-off is not a failure.
    tol = dict(rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-5)
    if got.shape != tuple(ref.shape):
        raise CheckFailed(f"{ex}: the answer should be [pos, d_model] = {tuple(ref.shape)}, got {tuple(got.shape)}")
    if not _matches(got, ref, **tol):
        a = model.anatomy
        with torch.no_grad():
            post = a.post_mlp_norm(layer)  # Gemma 3 normalises the MLP's output; identity elsewhere
            mlp_of_pre = post(a.mlp_act_from(layer, a.ln2(layer)(c["resid_pre"])) @ a.W_out(layer))
            mlp_no_norm = post(a.mlp_act_from(layer, c["resid_mid"]) @ a.W_out(layer))
        _diagnose(ex, got, {
            "this is resid_mid: you added attention's output but not the MLP's": c["resid_mid"],
            "the residual connections are missing: a block *adds* attention's and the MLP's "
            "outputs to the stream it received (resid_pre + attn_out + mlp_out)": c["attn_out"] + c["mlp_out"],
            "the attention contribution is missing: resid_mid = resid_pre + attention(ln1(resid_pre))":
                c["resid_pre"] + c["mlp_out"],
            "the MLP read resid_pre; it must read resid_mid, the stream after attention's output "
            "was added (the two sublayers are sequential)": c["resid_mid"] + mlp_of_pre,
            "the MLP's input norm is missing: apply ln2 (RMSNorm) to resid_mid before the MLP":
                c["resid_mid"] + mlp_no_norm,
        }, **tol)
        check_close(ex, got, ref, **tol)
    diff = float(np.abs(got - as_array(ref)).max())
    return CheckResult(ex, f"resid_post {tuple(ref.shape)} matches (max |diff| {diff:.1e})")


# --- Exercise 4: the logit lens ------------------------------------------------------------
def _lens_logits(model, prompt: str, *, norm: bool = True, site: str = "resid_post") -> torch.Tensor:
    run = model.run(prompt, cache=site)
    resid = run.cache.stack(site)[:, 0, -1]  # [layer, d_model]
    with torch.no_grad():
        return model.anatomy.unembed(resid) if norm else resid @ model.anatomy.W_U


def _as_token_strings(model, answer: Sequence, ex: str) -> list[str]:
    out = []
    for item in answer:
        if hasattr(item, "item"):
            item = item.item()
        if isinstance(item, (int, np.integer)):
            out.append(model.tokenizer.decode([int(item)]))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise CheckFailed(f"{ex}: give one token per layer, as a string (or an id), got {type(item).__name__}")
    return out


def check_logit_lens(model, prompt: str, top1: object) -> CheckResult:
    """Exercise 4: the logit lens's top-1 token at the last position, for every layer."""
    ex = "Exercise 4"
    if top1 is None or top1 is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {top1!r}); replace the `...`")
    if isinstance(top1, str) or not hasattr(top1, "__len__"):
        raise CheckFailed(f"{ex}: give a list with one token per layer ({model.n_layers} of them), got {top1!r}")
    got = _as_token_strings(model, top1, ex)
    logits = _lens_logits(model, prompt)
    ref = [model.tokenizer.decode([int(i)]) for i in logits.argmax(-1)]
    L = model.n_layers
    if len(got) == L + 1:
        raise CheckFailed(f"{ex}: you gave {L + 1} tokens; read the output of each of the {L} blocks "
                          "(resid_post), not the embeddings as well")
    if len(got) != L:
        raise CheckFailed(f"{ex}: give one token per layer: {L} tokens, got {len(got)}")
    if got == ref:
        return CheckResult(ex, f"all {L} layers match; the last one gives {ref[-1]!r}")
    no_norm = [model.tokenizer.decode([int(i)]) for i in _lens_logits(model, prompt, norm=False).argmax(-1)]
    if got == no_norm:
        raise CheckFailed(f"{ex}: you unembedded the raw residual stream; apply the final norm first "
                          "(the model does: logits = final_norm(resid) @ W_U), e.g. with model.anatomy.unembed")
    pre = [model.tokenizer.decode([int(i)]) for i in _lens_logits(model, prompt, site="resid_pre").argmax(-1)]
    if got == pre:
        raise CheckFailed(f"{ex}: you read resid_pre (the stream entering each block); use resid_post, "
                          "the stream leaving it, so that the last entry is the model's output")
    top2 = logits.topk(2, dim=-1).values
    bad = [i for i, (g, r) in enumerate(zip(got, ref))
           if g != r and float(top2[i, 0] - top2[i, 1]) > 1e-3]  # exact ties may go either way
    if not bad:
        return CheckResult(ex, f"all {L} layers match (up to ties)")
    i = bad[0]
    hint = (f" The last layer must give the model's own prediction {ref[-1]!r}." if i == L - 1 else "")
    raise CheckFailed(f"{ex}: {len(bad)} of {L} layers differ; the first is layer {i}: yours {got[i]!r}, "
                      f"expected {ref[i]!r}.{hint}")


# --- Exercise 5: greedy decoding -----------------------------------------------------------
def _reference_greedy_ids(model, prompt: str, n_new: int) -> list[int]:
    """Reference: the ids of ``n_new`` greedily decoded tokens after ``prompt`` (full
    forward pass per step, no key-value cache)."""
    ids = model.tokenize(prompt)["input_ids"][0]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(model.run(ids[None]).last_logits[0].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([nxt], device=ids.device)])
    return new


def check_greedy_generation(model, prompt: str, n_new: int, text: object) -> CheckResult:
    """Exercise 5: the text of ``n_new`` greedily generated tokens after ``prompt`` (new text only)."""
    ex = "Exercise 5"
    if text is None or text is Ellipsis:
        raise CheckFailed(f"{ex}: no answer yet (got {text!r}); replace the `...`")
    if not isinstance(text, str):
        raise CheckFailed(f"{ex}: return the generated text as a string (decode the new ids with "
                          f"model.tokenizer.decode), got {type(text).__name__}")
    ref_ids = _reference_greedy_ids(model, prompt, n_new)
    ref = model.tokenizer.decode(ref_ids)
    if text == ref:
        return CheckResult(ex, f"your {n_new} greedy tokens match")
    if text == prompt + ref:
        raise CheckFailed(f"{ex}: you returned the prompt too; return only the {n_new} new tokens' text")
    got_ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [model.tokenizer.decode([i]) for i in ref_ids]
    k = next((i for i, (g, r) in enumerate(zip(got_ids, ref_ids)) if g != r), min(len(got_ids), len(ref_ids)))
    if ref.startswith(text) or text.startswith(ref):
        raise CheckFailed(f"{ex}: the tokens agree as far as they go, but yours are {len(got_ids)} tokens and "
                          f"the exercise asks for exactly {n_new} new tokens")
    raise CheckFailed(f"{ex}: your text departs from greedy decoding at new token {k}: expected "
                      f"{pieces[k] if k < len(pieces) else '(end)'!r} after {''.join(pieces[:k])!r}. "
                      "Greedy decoding appends the argmax of the last position's logits, then runs again "
                      "on the longer sequence.")
