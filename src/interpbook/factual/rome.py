"""Rank-One Model Editing (ROME; Meng et al., 2022): rewrite one fact by a rank-one change of
one MLP down-projection.

An MLP layer is read as a linear associative memory: its down-projection ``W`` (shape
``[d_model, d_mlp]``, the ``[out, in]`` layout of ``nn.Linear``) maps a *key* ``k`` (the
down-projection's input, i.e. the neuron activations at the subject's last token) to a
*value* ``W k`` that is added to the residual stream. ROME edits ``(s, r, o)`` into
``(s, r, o*)`` in three steps:

1. :func:`compute_keys`: ``k*``, the mean key at the subject's last token over the prompt
   placed after a few random prefixes of offline text (:func:`context_prefixes`);
2. :func:`compute_values`: ``v*``, the down-projection output at that position that makes
   ``o*`` likely, found by optimising a vector ``delta`` added there (negative
   log-likelihood of ``o*`` over the prefixed prompts, a KL term that keeps the model's
   prediction on an "``s`` is a" prompt, and a weight decay on ``delta``);
3. :func:`rank_one_update`: the smallest change of ``W`` (in the metric of the key second
   moment ``C = E[k k^T]``, :func:`key_second_moments`) with ``W' k* = v*``:
   ``W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*)``.

:func:`edited` applies an update inside a ``with`` block and restores the exact original
weight afterwards. The value is defined where ``W`` writes: the down-projection's output.
In Gemma 3 that output then passes through the post-feed-forward norm before it joins the
residual stream; the optimisation runs through that norm, so ``v*`` is still "what ``W``
must produce".
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .. import artifacts, corpus

__all__ = ["RomeEdit", "EditRequest", "context_prefixes", "subject_last_positions", "compute_keys",
           "compute_values", "key_second_moments", "rank_one_update", "rome_edits", "edited"]


@dataclass
class RomeEdit:
    """One rank-one edit of layer ``layer``: ``W' = W + outer(r, u)`` with ``u = C^-1 k / (C^-1 k . k)``
    and ``r = v - W k - b``, so that the edited down-projection maps ``key`` to ``value``."""

    layer: int
    key: torch.Tensor     #: k*, ``[d_mlp]``
    value: torch.Tensor   #: v*, ``[d_model]``
    u: torch.Tensor       #: ``[d_mlp]``
    r: torch.Tensor       #: ``[d_model]``
    nll: list[float]      #: the value optimisation's loss on the new object, per step

    def delta(self) -> torch.Tensor:
        """The weight change ``[d_model, d_mlp]`` (the ``[out, in]`` layout of ``nn.Linear``)."""
        return torch.outer(self.r, self.u)


def _down_proj(model, layer: int) -> torch.nn.Module:
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"layer must be in 0..{model.n_layers - 1} for {model.name}; got {layer}.")
    return model.anatomy.down_proj(layer)


def _text_ids(model, text: str) -> list[int]:
    """Token ids of ``text`` as the model reads a document (Gemma's BOS included)."""
    return list(model.tokenizer(text)["input_ids"])


def context_prefixes(model, n: int = 4, n_words: int = 6, seed: int = 0) -> list[str]:
    """``""`` and ``n - 1`` short prefixes (the first ``n_words`` words of random passages of
    :func:`interpbook.corpus.pydoc_passages`, ending in ". "), put before a prompt so that
    the key and value hold across contexts, not only after the prompt's own first words.
    (The prompt itself should not start with the subject: without a BOS token the first
    token is an attention sink.)"""
    if n < 1 or n_words < 1:
        raise ValueError(f"n and n_words must be positive; got n={n}, n_words={n_words}.")
    passages = corpus.pydoc_passages()
    picks = random.Random(seed).sample(passages, n - 1)
    return [""] + [" ".join(p.text.split()[:n_words]).rstrip(".,;:") + ". " for p in picks]


def subject_last_positions(model, prompts: Sequence[str], subjects: Sequence[str]) -> list[int]:
    """Index (in each prompt's own tokens) of the last token of its subject.

    The subject must occur in the prompt; the index is the last token of the prompt cut
    right after the subject's last occurrence."""
    out = []
    for prompt, subject in zip(prompts, subjects, strict=True):
        end = prompt.rfind(subject)
        if not subject or end < 0:
            raise ValueError(f"Subject {subject!r} does not occur in prompt {prompt!r}.")
        out.append(len(_text_ids(model, prompt[: end + len(subject)])) - 1)
    return out


def _batch(model, rows: Sequence[str | list[int]]) -> tuple[dict, list[int]]:
    """Left-padded model inputs for texts or token-id lists, and each row's padding length."""
    ids = [_text_ids(model, r) if isinstance(r, str) else list(r) for r in rows]
    T = max(len(i) for i in ids)
    pads = [T - len(i) for i in ids]
    pad_id = model.tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad_id] * p + i for p, i in zip(pads, ids)])
    mask = torch.tensor([[0] * p + [1] * len(i) for p, i in zip(pads, ids)])
    return model.forward_inputs({"input_ids": input_ids, "attention_mask": mask}), pads


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``prompt`` (which contains ``subject``, not first) to continue with
    ``new_object`` (mind the leading space: ``" Rome"``)."""

    prompt: str
    subject: str
    new_object: str

    def __post_init__(self):
        if not self.subject or self.subject not in self.prompt:
            raise ValueError(f"Subject {self.subject!r} does not occur in prompt {self.prompt!r}.")
        if not self.new_object:
            raise ValueError("new_object is empty.")


def _requests(requests) -> list[EditRequest]:
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    if not requests or not all(isinstance(r, EditRequest) for r in requests):
        raise TypeError("requests must be an EditRequest or a non-empty list of them.")
    return requests


@torch.no_grad()
def compute_keys(model, layer: int, requests, prefixes: Sequence[str]) -> torch.Tensor:
    """k* per request ``[n, d_mlp]``: the mean down-projection input at the subject's last
    token over ``prefix + prompt`` for every prefix (all requests in one forward pass)."""
    requests = _requests(requests)
    _down_proj(model, layer)
    texts = [p + r.prompt for r in requests for p in prefixes]
    inputs, pads = _batch(model, texts)
    subjects = [r.subject for r in requests for _ in prefixes]
    pos = [pad + i for pad, i in zip(pads, subject_last_positions(model, texts, subjects))]
    acts = model.run(inputs, cache=("mlp_act", layer), stop_early=True).cache["mlp_act", layer]
    return acts[torch.arange(len(texts)), pos].view(len(requests), len(prefixes), -1).mean(1)


@contextlib.contextmanager
def _frozen(model) -> Iterator[None]:
    """Parameters stop requiring gradients (only ``delta`` is optimised), then are restored."""
    flags = [(p, p.requires_grad) for p in model.hf.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _added_at(module: torch.nn.Module, rows: torch.Tensor, pos: torch.Tensor, delta: Callable[[], torch.Tensor]):
    """Add ``delta()`` (one vector per row) to ``module``'s output at ``(rows, pos)``."""
    def hook(_module, _args, output):
        out = output.clone()
        out[rows, pos] = out[rows, pos] + delta()
        return out
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _next_token_logprobs(model, inputs: dict, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token at ``(rows, pos)`` only: the unembedding of the
    other positions is skipped (a fifth of a small model's forward cost)."""
    hidden = model.hf.base_model(**inputs, use_cache=False).last_hidden_state
    return torch.log_softmax(model.anatomy.logits_from_normed(hidden[rows, pos]).float(), -1)


def compute_values(model, layer: int, requests, prefixes: Sequence[str], *, steps: int = 10, lr: float = 0.5,
                   kl_weight: float = 0.0625, weight_decay: float = 0.5, clamp_norm: float = 4.0,
                   stop_nll: float = 0.1, essence: str = "Fact: {} is a") -> tuple[torch.Tensor, torch.Tensor]:
    """v* per request ``[n, d_model]``: the down-projection output at the subject's last token
    that makes ``new_object`` (any number of tokens) follow the prompt.

    A vector ``delta`` per request is added there and optimised with Adam. One batch per
    step holds ``prefix + prompt + new_object`` (all but its last token) for every prefix
    and request, plus each request's essence prompt ``essence.format(subject)``. A
    request's loss is the mean negative log-likelihood of its object tokens, plus
    ``kl_weight`` times KL(unedited || edited) of the essence prompt's next-token
    distribution (the subject stays what it was), plus ``weight_decay * |delta|^2 / |v|^2``;
    ``delta`` is kept within ``clamp_norm * |v|``. Requests do not interact (separate rows,
    separate vectors), so batching them changes nothing but speed. Returns
    ``v* = down_proj(k*) + delta`` and the object NLL ``[steps_run, n]``; it stops once
    every request's NLL is below ``stop_nll``."""
    requests = _requests(requests)
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}.")
    down = _down_proj(model, layer)
    targets = [model.tokenizer(r.new_object, add_special_tokens=False)["input_ids"] for r in requests]
    rows_ids, subj_texts, subjects, owner = [], [], [], []
    for i, (r, target) in enumerate(zip(requests, targets)):
        for p in prefixes:
            rows_ids.append(_text_ids(model, p + r.prompt) + target[:-1])
            subj_texts.append(p + r.prompt)
        subjects += [r.subject] * len(prefixes)
        owner += [i] * len(prefixes)
    n_rewrite = len(rows_ids)
    ess_texts = [essence.format(r.subject) for r in requests]
    inputs, pads = _batch(model, rows_ids + ess_texts)
    subj_pos = subject_last_positions(model, subj_texts + ess_texts, subjects + [r.subject for r in requests])
    rows = torch.arange(len(pads))
    pos = torch.tensor([pad + i for pad, i in zip(pads, subj_pos)])
    owner = torch.tensor(owner + list(range(len(requests))))
    # every rewriting row ends with its object's tokens (left padding aligns the ends):
    # object token j of a row is predicted at position T - len(object) + j
    T = inputs["input_ids"].shape[1]
    pred_rows = torch.tensor([row for row in range(n_rewrite) for _ in targets[owner[row]]])
    pred_pos = torch.tensor([T - len(targets[owner[row]]) + j for row in range(n_rewrite)
                             for j in range(len(targets[owner[row]]))])
    pred_ids = torch.tensor([t for row in range(n_rewrite) for t in targets[owner[row]]])
    pred_owner = owner[pred_rows]
    ess_rows = torch.arange(n_rewrite, len(pads))
    ess_pos = torch.full((len(requests),), T - 1)
    keys = compute_keys(model, layer, requests, prefixes)
    with torch.no_grad():
        v_init = down(keys)
        base = _next_token_logprobs(model, inputs, ess_rows, ess_pos)
    delta = torch.zeros_like(v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    v_norm = v_init.norm(dim=-1)
    counts = torch.bincount(pred_owner, minlength=len(requests))
    history: list[torch.Tensor] = []
    with _frozen(model), torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            with _added_at(down, rows, pos, lambda: delta[owner]):
                logp = _next_token_logprobs(model, inputs, torch.cat([pred_rows, ess_rows]),
                                            torch.cat([pred_pos, ess_pos]))
            token_nll = -logp[torch.arange(len(pred_ids)), pred_ids]
            nll = torch.zeros(len(requests)).index_add(0, pred_owner, token_nll) / counts
            ess = logp[len(pred_ids):]
            kl = (base.exp() * (base - ess)).sum(-1)
            loss = nll + kl_weight * kl + weight_decay * delta.norm(dim=-1) ** 2 / v_norm ** 2
            history.append(nll.detach())
            if bool((history[-1] < stop_nll).all()):
                break
            loss.sum().backward()
            opt.step()
            with torch.no_grad():
                scale = (clamp_norm * v_norm / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
    return (v_init + delta).detach(), torch.stack(history)


def _collect_second_moments(model, layers: list[int], n_tokens: int, seq_len: int, batch: int) -> dict:
    tok = model.tokenizer
    windows = corpus.pack(lambda t: tok(t, add_special_tokens=False)["input_ids"],
                          (p.text for p in corpus.pydoc_passages()), seq_len=seq_len, max_tokens=n_tokens,
                          separator=tok("\n\n", add_special_tokens=False)["input_ids"],
                          prefix=tok("")["input_ids"])
    sums = {layer: torch.zeros(model.d_mlp, model.d_mlp, dtype=torch.float64) for layer in layers}
    with torch.no_grad():
        for chunk in windows.split(batch):
            cache = model.run(chunk, cache=[("mlp_act", layer) for layer in layers], stop_early=True).cache
            for layer in layers:
                k = cache["mlp_act", layer].reshape(-1, model.d_mlp).double()
                sums[layer] += k.T @ k
    return {layer: (C / windows.numel()).float() for layer, C in sums.items()}


def key_second_moments(model, layers: Sequence[int], *, n_tokens: int = 4096, seq_len: int = 128,
                       batch: int = 8) -> dict[int, torch.Tensor]:
    """``{layer: C}`` with ``C = E[k k^T]`` ``[d_mlp, d_mlp]`` of the down-projection input
    over ``n_tokens`` tokens of :func:`interpbook.corpus.pydoc_passages` (windows of
    ``seq_len`` starting the way the tokenizer starts a document). Each layer's ``C`` is
    cached on disk per model, layer and token count (:func:`interpbook.artifacts.cached`);
    the layers not cached yet are computed together in one pass over the text.

    ROME estimates ``C`` from 100,000 Wikipedia samples; a few thousand tokens of Python's
    documentation is what a CPU build affords, so :func:`rank_one_update` adds a small
    ridge to it."""
    layers = sorted({int(layer) for layer in layers})
    for layer in layers:
        _down_proj(model, layer)
    kind, name = "rome-second-moment", f"{model.name}"
    specs = {layer: {"model": model.name, "layer": layer, "n_tokens": int(n_tokens), "seq_len": int(seq_len),
                     "d_mlp": int(model.d_mlp), "format": 2} for layer in layers}
    missing = [layer for layer in layers if not artifacts.artifact_path(kind, name, specs[layer]).is_file()]
    fresh = _collect_second_moments(model, missing, n_tokens, seq_len, batch) if missing else {}

    def compute(layer: int) -> torch.Tensor:
        return fresh[layer] if layer in fresh else _collect_second_moments(model, [layer], n_tokens, seq_len, batch)[layer]

    return {layer: artifacts.cached(kind, name, specs[layer], lambda layer=layer: compute(layer)) for layer in layers}


def rank_one_update(model, layer: int, key: torch.Tensor, value: torch.Tensor, C: torch.Tensor, *,
                    ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, r)`` with ``W' = W + outer(r, u)`` mapping ``key`` to ``value``:
    ``u = C^-1 k / (C^-1 k . k)``, ``r = value - down_proj(key)``. ``ridge`` (times the mean
    diagonal of ``C``) is added to ``C``'s diagonal so that a few thousand tokens give a
    well-conditioned solve."""
    down = _down_proj(model, layer)
    if key.shape != (model.d_mlp,) or value.shape != (model.d_model,):
        raise ValueError(f"key must be [d_mlp]={model.d_mlp} and value [d_model]={model.d_model}; got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}.")
    if C.shape != (model.d_mlp, model.d_mlp):
        raise ValueError(f"C must be [d_mlp, d_mlp] = {model.d_mlp}x{model.d_mlp}; got {tuple(C.shape)}.")
    Cr = C.double() + ridge * C.diagonal().mean().double() * torch.eye(C.shape[0], dtype=torch.float64)
    Cinv_k = torch.linalg.solve(Cr, key.double())
    u = (Cinv_k / (Cinv_k @ key.double())).to(key.dtype)
    with torch.no_grad():
        r = value - down(key)
    return u, r


def rome_edits(model, layer: int, requests, *, C: torch.Tensor | None = None,
               prefixes: Sequence[str] | None = None, **value_kwargs) -> list[RomeEdit]:
    """One ROME edit of ``layer`` per request (computed together, applied one at a time
    with :func:`edited`): k*, v* and the rank-one factors. ``C`` defaults to
    :func:`key_second_moments`, ``prefixes`` to :func:`context_prefixes`."""
    requests = _requests(requests)
    prefixes = list(prefixes) if prefixes is not None else context_prefixes(model)
    C = key_second_moments(model, [layer])[layer] if C is None else C
    keys = compute_keys(model, layer, requests, prefixes)
    values, nll = compute_values(model, layer, requests, prefixes, **value_kwargs)
    out = []
    for i in range(len(requests)):
        u, r = rank_one_update(model, layer, keys[i], values[i], C)
        out.append(RomeEdit(layer, keys[i], values[i], u, r, nll[:, i].tolist()))
    return out


def _weight(model, layer: int) -> torch.Tensor:
    """The down-projection as ``[d_mlp, d_model]`` (a view of the parameter, any layout)."""
    return model.anatomy.W_out(layer)


@contextlib.contextmanager
def edited(model, *edits: RomeEdit) -> Iterator[None]:
    """Apply ``edits`` to the model's weights during the block; on exit (also after an
    error) the original weights are copied back bit for bit."""
    saved = {}
    try:
        with torch.no_grad():
            for e in edits:
                W = _weight(model, e.layer)
                if e.layer not in saved:
                    saved[e.layer] = W.detach().clone()
                W.add_(torch.outer(e.u, e.r).to(W.dtype))
        yield
    finally:
        with torch.no_grad():
            for layer, W0 in saved.items():
                _weight(model, layer).copy_(W0)
