"""Activation patching: metrics and a batched sweep over layers and positions or heads.

Activation patching (causal tracing, interchange intervention) runs the model on a
*corrupted* prompt and copies one activation from a *clean* run into it; how far the output
moves back towards the clean answer measures how much that activation carries the
difference (Meng et al. 2022; Wang et al. 2023; Heimersheim & Nanda 2024 on good practice).

A sweep patches every ``(layer, position)`` or ``(layer, head)`` in turn. One forward pass
per patch is slow, so :func:`sweep` packs many patched runs into one forward (it repeats the
corrupted batch, and each copy is patched at a different place: an edit with ``rows=``), and
each copy computes only what its patch can change: the layers from the patched one on, the
positions from the first one the patch changes on (the rest is the corrupted run's, cached
once). The result equals the one-forward-per-patch loop (tested to 1e-5)::

    metric = lambda logits: patching.logit_diff(logits, answers, wrong).mean()
    effect = patching.sweep(model, clean, corrupt, "resid_pre", metric)   # [layer, pos]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .anatomy import HEAD_SITES, LAYERLESS_SITES, check_site
from .lm import Model, Prompts
from .tracing import patch

__all__ = ["LogitDiff", "logit_diff", "normalized_effect", "patch_targets", "sweep", "sweep_naive"]

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


class LogitDiff:
    """The logit-difference metric (:func:`logit_diff`) as an object that names the
    vocabulary columns it reads, so :func:`sweep` unembeds only those: two dot products
    per row instead of one per vocabulary entry (on Gemma 3 the 262k-row unembedding
    costs more than its 18 layers on a short prompt).

    ``LogitDiff(answers, wrong)(logits)`` is ``logit_diff(logits, answers, wrong)``."""

    def __init__(self, answer_ids, wrong_ids):
        self.answer_ids = torch.as_tensor(answer_ids, dtype=torch.long).reshape(-1)
        self.wrong_ids = torch.as_tensor(wrong_ids, dtype=torch.long).reshape(-1)
        self.columns = torch.unique(torch.cat([self.answer_ids, self.wrong_ids]))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, self.answer_ids, self.wrong_ids)

    def on_columns(self, logits: torch.Tensor) -> torch.Tensor:
        """The same from the logits of ``self.columns`` only (``[batch, len(columns)]``)."""
        def where(ids):
            return torch.searchsorted(self.columns, ids)
        return logit_diff(logits, where(self.answer_ids), where(self.wrong_ids))


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


def _score(metric: Metric, logits: torch.Tensor, columns: torch.Tensor | None = None) -> float:
    value = metric.on_columns(logits) if columns is not None else metric(logits)
    return float(torch.as_tensor(value, dtype=torch.float32).mean())


def _metric_columns(model: Model, metric: Metric) -> torch.Tensor | None:
    """The vocabulary columns a :class:`LogitDiff` reads (None: the metric needs them all,
    or the model's output embedding cannot be swapped)."""
    if not isinstance(metric, LogitDiff):
        return None
    columns = metric.columns
    if int(columns.min()) < 0 or int(columns.max()) >= model.d_vocab:
        raise ValueError(f"The metric's token ids must lie in 0..{model.d_vocab - 1} ({model.name}'s vocabulary); "
                         f"got {columns.tolist()}.")
    head = model.hf.get_output_embeddings()
    return columns if isinstance(head, nn.Linear) else None


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

    A patched copy equals the corrupted run wherever the patch has not reached yet, so each
    copy computes only what it changes (same numbers as one forward per patch, to 1e-5):

    * layers below the patched one are not run: the copy starts from the corrupted run's
      residual stream entering that layer;
    * positions before the first one where the patched value differs from the corrupted
      one are not run either: the copy reuses the corrupted run's key/value cache for them
      (a clean/corrupted pair that shares its first tokens shares their activations);
    * a patch that writes exactly the corrupted value (e.g. at a shared token) gets the
      corrupted score without a forward pass."""
    layers = _check_request(model, site, layers)
    enc_clean, enc_corrupt = _encode_pair(model, clean, corrupt)
    n_rows = enc_corrupt["input_ids"].shape[0]
    targets = patch_targets(model, site, over, enc_corrupt["input_ids"].shape[1], layers)
    with torch.no_grad():
        clean_run = model.run(enc_clean, cache=[(site, layer) for layer in layers], stop_early=True)
    base = _corrupted_run(model, enc_corrupt, site, layers)
    base_score = _score(metric, base.logits)
    columns = _metric_columns(model, metric)
    resumable = _resumes_exactly(model, enc_corrupt, base)
    scores = torch.full((len(targets),), base_score)
    # packed forwards: (first position computed, first layer run, [(target, layer, pos or head)])
    pending = []
    for t, (layer, i) in enumerate(targets):
        start = _first_change(clean_run.cache[site, layer], base.sites[layer], over, i)
        if start is not None:
            pending.append((start if base.prefix is not None else 0, layer, t, i))
    pending.sort()
    copies = max(1, batch_size // n_rows)
    chunks = []
    for start in sorted({s for s, *_ in pending}):
        same = [(t, layer, i) for s, layer, t, i in pending if s == start]
        chunks += [(start, same[k][1] if resumable else 0, same[k:k + copies]) for k in range(0, len(same), copies)]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=f"patching {site}")
    for start, first_layer, chunk in chunks:
        edits = []
        for c, (_, layer, i) in enumerate(chunk):
            value, where = _clean_slice(clean_run.cache[site, layer], over, i, start)
            edits.append(patch((site, layer), value, rows=slice(c * n_rows, (c + 1) * n_rows), **where))
        logits = _forward_packed(model, enc_corrupt, base, edits, len(chunk), start=start, first_layer=first_layer,
                                 columns=columns)
        for (t, _, _), part in zip(chunk, logits.split(n_rows)):
            scores[t] = _score(metric, part, columns)
    return scores.view(len(layers), -1)


class _Corrupted(NamedTuple):
    """What the patched copies start from: the corrupted run's ``resid_pre`` at every layer,
    the swept site at each swept layer, its key/value cache (None when the model keeps no
    plain one) and its last-position logits."""

    resid: list[torch.Tensor]
    sites: dict[int, torch.Tensor]
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None
    logits: torch.Tensor


def _corrupted_run(model: Model, enc: dict, site: str, layers: list[int]) -> _Corrupted:
    """One forward pass of the corrupted batch that records what :class:`_Corrupted` holds."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    inputs = model.forward_inputs(enc)
    record = [("resid_pre", layer) for layer in range(model.n_layers)] + [(site, layer) for layer in layers]
    prefix = None
    with torch.no_grad():
        try:
            with model.trace(cache=record) as tr:
                out = model.hf(**inputs, use_cache=True, past_key_values=DynamicCache(), logits_to_keep=1)
            cache = getattr(out, "past_key_values", None)
            blocks = getattr(cache, "layers", None)
            n = inputs["input_ids"].shape[1]
            if (isinstance(cache, DynamicCache) and blocks and len(blocks) == model.n_layers
                    and all(type(b) is DynamicLayer and b.keys.shape[-2] == n for b in blocks)):
                prefix = [(b.keys, b.values) for b in blocks]
        except (TypeError, ValueError):  # no DynamicCache support: copies are computed from position 0
            with model.trace(cache=record) as tr:
                out = model.hf(**inputs, use_cache=False, logits_to_keep=1)
    return _Corrupted([tr.cache["resid_pre", layer] for layer in range(model.n_layers)],
                      {layer: tr.cache[site, layer] for layer in layers}, prefix, out.logits[:, -1])


def _first_change(clean_value: torch.Tensor, corrupt_value: torch.Tensor, over: str, i: int) -> int | None:
    """The first position where patching position (or head) ``i`` changes the corrupted
    activation, or None when the patch writes exactly the value already there."""
    if over == "pos":
        return None if torch.equal(clean_value[:, i], corrupt_value[:, i]) else i
    differs = (clean_value[:, :, i] != corrupt_value[:, :, i]).flatten(2).any(-1).any(0).nonzero()
    return int(differs[0]) if len(differs) else None


def _clean_slice(clean_value: torch.Tensor, over: str, i: int, start: int = 0) -> tuple[torch.Tensor, dict]:
    """The clean activation at one position or head, and the edit's keyword for it, in a
    pass that computes the positions from ``start`` on."""
    if over == "pos":
        return clean_value[:, i], {"pos": i - start}
    return clean_value[:, start:, i], {"head": i}


class _Resume(nn.Module):
    """Stands in for the decoder layers below the first patched one: hands on the corrupted
    run's residual stream entering that layer (what those layers would compute again)."""

    def __init__(self, resid: torch.Tensor):
        super().__init__()
        self.resid = resid

    def forward(self, hidden_states, *args, **kwargs):
        return self.resid


@contextmanager
def _resuming_at(model: Model, layer: int, resid: torch.Tensor | None):
    """Within the block, the model's forward pass starts at decoder layer ``layer`` with
    ``resid`` as its input (the layers below are swapped out, then put back)."""
    blocks = model.anatomy.layers()
    below = [blocks[i] for i in range(layer)]
    try:
        for i in range(layer):
            blocks[i] = _Resume(resid)
        yield
    finally:
        for i, block in enumerate(below):
            blocks[i] = block


def _repeated_prefix(prefix, length: int, copies: int):
    """A fresh cache holding the first ``length`` positions of ``prefix``, repeated for
    ``copies`` copies of the batch (copy-major, like ``Tensor.repeat``)."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache([(k[:, :, :length].repeat(copies, 1, 1, 1), v[:, :, :length].repeat(copies, 1, 1, 1))
                         for k, v in prefix])


@contextmanager
def _unembedding(model: Model, columns: torch.Tensor | None):
    """Within the block, the model's output embedding computes only the logits of
    ``columns`` (the model's own forward still applies its final norm and soft-capping)."""
    if columns is None:
        yield
        return
    full = model.hf.get_output_embeddings()
    part = nn.Linear(full.in_features, len(columns), bias=full.bias is not None)
    part.weight = nn.Parameter(full.weight[columns], requires_grad=False)
    if full.bias is not None:
        part.bias = nn.Parameter(full.bias[columns], requires_grad=False)
    model.hf.set_output_embeddings(part)
    try:
        yield
    finally:
        model.hf.set_output_embeddings(full)


def _forward_packed(model: Model, enc: dict, base: _Corrupted, edits: list, copies: int, *,
                    start: int = 0, first_layer: int = 0, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Last-position logits ``[copies * batch, vocab]`` of ``copies`` edited copies of the
    corrupted batch, computing positions ``start..`` (the ones before come from ``base``'s
    key/value cache) and layers ``first_layer..`` (the input is ``base``'s residual stream);
    only the logits of ``columns`` when given."""
    inputs = {k: v.repeat(copies, 1) for k, v in model.forward_inputs(enc).items()}
    mask = inputs["attention_mask"]
    if start:
        inputs = {"input_ids": inputs["input_ids"][:, start:], "attention_mask": mask,
                  "position_ids": inputs["position_ids"][:, start:],
                  "past_key_values": _repeated_prefix(base.prefix, start, copies)}
    resid = base.resid[first_layer][:, start:].repeat(copies, 1, 1) if first_layer else None
    with (torch.no_grad(), _resuming_at(model, first_layer, resid), _unembedding(model, columns),
          model.trace(edits=edits, attention_mask=mask)):
        logits = model.hf(**inputs, use_cache=bool(start), logits_to_keep=1).logits
    return logits[:, -1]


def _resumes_exactly(model: Model, enc: dict, base: _Corrupted) -> bool:
    """Whether starting a pass at the last layer from the recorded residual stream gives the
    corrupted logits; if not (an architecture whose decoder layers cannot be swapped out),
    warn and let every copy run all layers (slower, same numbers)."""
    if model.n_layers < 2:
        return False
    try:
        logits = _forward_packed(model, enc, base, [], 1, first_layer=model.n_layers - 1)
        reason = None if torch.allclose(logits, base.logits, atol=1e-4, rtol=1e-4) else "the logits differ"
    except Exception as e:  # noqa: BLE001 - any failure means: do not skip layers
        reason = f"{type(e).__name__}: {e}"
    if reason is None:
        return True
    warnings.warn(f"patching.sweep: {model.name} cannot start a forward pass at a middle layer ({reason}); "
                  "every patched copy runs all layers (slower, same numbers).", stacklevel=3)
    return False


def sweep_naive(model: Model, clean: Prompts, corrupt: Prompts, site: str, metric: Metric, *,
                over: str = "pos", layers: Sequence[int] | None = None) -> torch.Tensor:
    """The same sweep as :func:`sweep`, one forward pass per patch: the reference it is
    tested against, and the baseline in ``bench/patching.py``."""
    layers = _check_request(model, site, layers)
    enc_clean, enc_corrupt = _encode_pair(model, clean, corrupt)
    targets = patch_targets(model, site, over, enc_corrupt["input_ids"].shape[1], layers)
    with torch.no_grad():
        clean_run = model.run(enc_clean, cache=[(site, layer) for layer in layers], stop_early=True)
    scores = []
    for layer, i in targets:
        value, where = _clean_slice(clean_run.cache[site, layer], over, i)
        scores.append(_score(metric, _forward_packed(model, enc_corrupt, None, [patch((site, layer), value, **where)], 1)))
    return torch.tensor(scores).view(len(layers), -1)
