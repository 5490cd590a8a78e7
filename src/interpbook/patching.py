"""Activation patching: metrics and a batched sweep over layers and positions or heads.

Activation patching (causal tracing, interchange intervention) runs the model on a
*corrupted* prompt and copies one activation from a *clean* run into it; how far the output
moves back towards the clean answer measures how much that activation carries the
difference (Meng et al. 2022; Wang et al. 2023; Heimersheim & Nanda 2024 on good practice).

A sweep patches every ``(layer, position)`` or ``(layer, head)`` in turn. One forward pass
per patch is slow, so :func:`sweep` packs many patched runs into one forward: it repeats the
corrupted batch, and each copy is patched at a different place (an edit with ``rows=``).
The result equals the one-forward-per-patch loop (tested to 1e-5)::

    metric = lambda logits: patching.logit_diff(logits, answers, wrong).mean()
    effect = patching.sweep(model, clean, corrupt, "resid_pre", metric)   # [layer, pos]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .anatomy import HEAD_SITES, LAYERLESS_SITES, check_site
from .lm import Model, Prompts
from .tracing import patch

__all__ = ["logit_diff", "normalized_effect", "patch_targets", "sweep", "sweep_naive"]

Metric = Callable[[torch.Tensor], torch.Tensor]


def logit_diff(logits: torch.Tensor, answer_ids, wrong_ids) -> torch.Tensor:
    """Per row, the logit of the right answer minus that of the wrong one ``[batch]``.

    ``logits`` is ``[batch, vocab]`` (the last position) or ``[batch, pos, vocab]`` (its last
    position is used); ``answer_ids`` and ``wrong_ids`` hold one token id per row (or one
    for all rows)."""
    if logits.dim() == 3:
        logits = logits[:, -1]
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab] or [batch, pos, vocab]; got shape {tuple(logits.shape)}.")
    n = logits.shape[0]

    def column(ids, what):
        t = torch.as_tensor(ids, dtype=torch.long, device=logits.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"{what} has {t.numel()} ids for {n} rows: give one per row (or one for all).")
        if int(t.min()) < 0 or int(t.max()) >= logits.shape[-1]:
            raise ValueError(f"{what} holds ids outside the vocabulary (0..{logits.shape[-1] - 1}).")
        return logits.gather(-1, t[:, None])[:, 0]

    return column(answer_ids, "answer_ids") - column(wrong_ids, "wrong_ids")


def normalized_effect(patched, clean, corrupt) -> torch.Tensor:
    """``(patched - corrupt) / (clean - corrupt)``: 0 means the patch did nothing, 1 that it
    restored the clean behaviour. Raises when clean and corrupt score the same (the
    prompt pair does not separate the behaviour, so nothing can be normalised)."""
    patched, clean, corrupt = (torch.as_tensor(x, dtype=torch.float32) for x in (patched, clean, corrupt))
    gap = clean - corrupt
    if bool((gap.abs() < 1e-8).any()):
        raise ValueError(f"The clean and corrupted metrics are equal ({clean.tolist()} vs {corrupt.tolist()}): "
                         "choose prompts whose metric differs before normalising.")
    return (patched - corrupt) / gap


def _encode_pair(model: Model, clean: Prompts, corrupt: Prompts) -> tuple[dict, dict]:
    """Tokenise both; patching position by position needs the same shape and padding."""
    a, b = model.tokenize(clean), model.tokenize(corrupt)
    if a["input_ids"].shape != b["input_ids"].shape:
        raise ValueError(
            f"Clean and corrupted inputs must have the same shape to patch position by position; got "
            f"{tuple(a['input_ids'].shape)} and {tuple(b['input_ids'].shape)}. Use prompt pairs with the same "
            "number of tokens (check with model.to_str_tokens).")
    if not torch.equal(a["attention_mask"], b["attention_mask"]):
        rows = (a["attention_mask"] != b["attention_mask"]).any(-1).nonzero()[:, 0].tolist()
        raise ValueError(
            f"Clean and corrupted inputs are padded differently (rows {rows}): the same position holds different "
            "tokens in the two. Pair prompts of equal token length within each row.")
    return a, b


def _score(metric: Metric, logits: torch.Tensor) -> float:
    value = torch.as_tensor(metric(logits), dtype=torch.float32)
    return float(value.mean())


def patch_targets(model: Model, site: str, over: str, n_pos: int, layers: Sequence[int]) -> list[tuple[int, int]]:
    """The ``(layer, position)`` or ``(layer, head)`` pairs a sweep patches, in row-major order."""
    if over not in ("pos", "head"):
        raise ValueError(f"over must be 'pos' or 'head', not {over!r}.")
    if over == "head":
        if site not in HEAD_SITES or site == "attn_pattern":
            raise ValueError(f"over='head' needs a per-head site (attn_z, q, k, v); got {site!r}.")
        n = model.anatomy.n_kv_heads if site in ("k", "v") else model.n_heads
    else:
        n = n_pos
    return [(layer, i) for layer in layers for i in range(n)]


def _check_request(model: Model, site: str, layers) -> list[int]:
    if not isinstance(site, str) or site in LAYERLESS_SITES:
        raise ValueError(f"site is a per-layer site name such as 'resid_pre' or 'attn_z'; got {site!r}.")
    check_site(model.anatomy, site, 0)
    if site == "attn_pattern":
        raise ValueError("Attention patterns are recorded, not patched; patch 'attn_z' (head outputs) instead.")
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    for layer in layers:
        check_site(model.anatomy, site, layer)
    return [layer % model.n_layers for layer in layers]


def _clean_slice(clean_value: torch.Tensor, over: str, i: int) -> tuple[torch.Tensor, dict]:
    """The clean activation at one position or head, and the edit's keyword for it."""
    if over == "pos":
        return clean_value[:, i], {"pos": i}
    return clean_value[:, :, i], {"head": i}


def sweep(model: Model, clean: Prompts, corrupt: Prompts, site: str, metric: Metric, *,
          over: str = "pos", layers: Sequence[int] | None = None, batch_size: int = 64,
          progress: bool = False) -> torch.Tensor:
    """Patch the clean ``site`` activation into the corrupted run at every ``(layer, pos)``
    (``over="pos"``) or ``(layer, head)`` (``over="head"``) and score each patched run with
    ``metric``: ``[n_layers, n_pos]`` or ``[n_layers, n_heads]``.

    ``metric(logits)`` gets the last-position logits ``[batch, vocab]`` of one patched copy
    of the corrupted batch and returns a number or one per row (averaged). Clean and
    corrupted inputs must have the same shape and attention mask. ``batch_size`` bounds the
    rows of one forward pass: ``batch_size // batch`` patched copies go in each.

    Over positions, a patch at position ``p`` leaves positions before ``p`` as in the
    corrupted run, so the patched copies reuse the corrupted run's key/value cache for that
    prefix and compute only the positions from ``p`` on (about half the arithmetic)."""
    layers = _check_request(model, site, layers)
    enc_clean, enc_corrupt = _encode_pair(model, clean, corrupt)
    n_rows, n_pos = enc_corrupt["input_ids"].shape
    targets = patch_targets(model, site, over, n_pos, layers)
    with torch.no_grad():
        clean_run = model.run(enc_clean, cache=[(site, layer) for layer in layers])
    prefix = _corrupted_prefix(model, enc_corrupt) if over == "pos" else None
    # packed forwards: (first position computed, [(target index, layer, pos or head)])
    copies = max(1, batch_size // n_rows)
    if prefix is None:
        indexed = [(t, layer, i) for t, (layer, i) in enumerate(targets)]
        chunks = [(0, indexed[s:s + copies]) for s in range(0, len(indexed), copies)]
    else:
        chunks = []
        for p in range(n_pos):
            at_p = [(t, layer, i) for t, (layer, i) in enumerate(targets) if i == p]
            chunks += [(p, at_p[s:s + copies]) for s in range(0, len(at_p), copies)]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=f"patching {site}")
    scores = torch.empty(len(targets))
    for start, chunk in chunks:
        edits = []
        for c, (_, layer, i) in enumerate(chunk):
            value, where = _clean_slice(clean_run.cache[site, layer], over, i)
            if prefix is not None:
                where = {"pos": i - start}
            edits.append(patch((site, layer), value, rows=slice(c * n_rows, (c + 1) * n_rows), **where))
        past = None if prefix is None or start == 0 else _repeated_prefix(prefix, start, len(chunk))
        logits = _forward_last(model, {k: v.repeat(len(chunk), 1) for k, v in enc_corrupt.items()}, edits,
                               past=past, start=start)
        for (t, _, _), part in zip(chunk, logits.split(n_rows)):
            scores[t] = _score(metric, part)
    return scores.view(len(layers), -1)


def _corrupted_prefix(model: Model, enc: dict) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Every layer's keys and values ``[batch, kv_heads, pos, d_head]`` in the corrupted run,
    or None when the model does not keep a plain key/value cache (then every patched copy
    is computed from position 0)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    inputs = model.forward_inputs(enc)
    with torch.no_grad():
        try:
            out = model.hf(**inputs, use_cache=True, past_key_values=DynamicCache(), logits_to_keep=1)
        except (TypeError, ValueError):
            return None
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    n = inputs["input_ids"].shape[1]
    if (not isinstance(cache, DynamicCache) or not layers or len(layers) != model.n_layers
            or any(type(layer) is not DynamicLayer or layer.keys.shape[-2] != n for layer in layers)):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def _repeated_prefix(prefix, length: int, copies: int):
    """A fresh cache holding the first ``length`` positions of ``prefix``, repeated for
    ``copies`` copies of the batch (copy-major, like ``Tensor.repeat``)."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache([(k[:, :, :length].repeat(copies, 1, 1, 1), v[:, :, :length].repeat(copies, 1, 1, 1))
                         for k, v in prefix])


def sweep_naive(model: Model, clean: Prompts, corrupt: Prompts, site: str, metric: Metric, *,
                over: str = "pos", layers: Sequence[int] | None = None) -> torch.Tensor:
    """The same sweep as :func:`sweep`, one forward pass per patch: the reference it is
    tested against, and the baseline in ``bench/patching.py``."""
    layers = _check_request(model, site, layers)
    enc_clean, enc_corrupt = _encode_pair(model, clean, corrupt)
    targets = patch_targets(model, site, over, enc_corrupt["input_ids"].shape[1], layers)
    with torch.no_grad():
        clean_run = model.run(enc_clean, cache=[(site, layer) for layer in layers])
    scores = []
    for layer, i in targets:
        value, where = _clean_slice(clean_run.cache[site, layer], over, i)
        scores.append(_score(metric, _forward_last(model, enc_corrupt, [patch((site, layer), value, **where)])))
    return torch.tensor(scores).view(len(layers), -1)


def _forward_last(model: Model, enc: dict, edits: list, *, past=None, start: int = 0) -> torch.Tensor:
    """Last-position logits ``[batch, vocab]`` of one edited forward pass (the unembedding
    is applied to the last position only). With ``past``, a key/value cache of the first
    ``start`` positions, only the positions from ``start`` on are computed."""
    inputs = model.forward_inputs(enc)
    mask = inputs["attention_mask"]
    if past is not None:
        inputs = {"input_ids": inputs["input_ids"][:, start:], "attention_mask": mask,
                  "position_ids": inputs["position_ids"][:, start:], "past_key_values": past}
    with torch.no_grad(), model.trace(edits=edits, attention_mask=mask):
        logits = model.hf(**inputs, use_cache=past is not None, logits_to_keep=1).logits
    return logits[:, -1]
