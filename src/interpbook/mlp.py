"""MLP layers as key-value memories, read in the vocabulary (book chapter ``05-mlp-layers``).

An MLP layer computes ``mlp_out = sum_i m_i v_i``: neuron ``i`` has an activation
``m_i`` (the *memory coefficient*; for a gated MLP ``act(x W_gate) * (x W_in)``, the
canonical ``mlp_act`` site) and a *value* ``v_i``, row ``i`` of ``W_out``. Geva et al.
(2021) read the input side of a neuron (its *key*) through the contexts that make it
fire most, and the output side through the value projected onto the vocabulary; Geva et
al. (2022) read one forward pass's MLP update as a sum of such *sub-updates* ``m_i v_i``
that promote concepts in the vocabulary.

Everything here uses the anatomy API, so it works on every supported family. The
vocabulary reading folds the final norm's gain into the unembedding
(:func:`folded_unembedding`), which ranks tokens as the model reads a direction; a
contribution in real logit units also needs the final norm's scale at the position
(:func:`token_contributions`, :func:`interpbook.lenses.direct_logit_attribution`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .anatomy import norm_as_linear
from .lenses import direct_logit_attribution, top_tokens
from .lm import Model, Prompts
from .tracing import edit

__all__ = [
    "folded_unembedding", "value_logits", "value_top_tokens", "TopActivations", "Context",
    "top_activations", "mlp_activations", "agreement_rate", "Agreement", "key_value_agreement",
    "last_token_share", "token_mask", "visible", "SubUpdate", "sub_updates", "top_sub_updates", "token_contributions",
]


# --- reading values in the vocabulary -------------------------------------------------------
def folded_unembedding(model: Model) -> torch.Tensor:
    """``W_U`` with the final norm's gain folded in: ``diag(g) W_U`` ``[d_model, vocab]``
    (:meth:`interpbook.anatomy.Anatomy.folded_W_U`).

    A vector ``v`` in the residual stream reaches the logits as ``centred(v) * s (g W_U)``,
    where the norm's scale ``s`` is shared by the whole residual at that position: ``v @
    folded_unembedding`` ranks tokens as the model would read ``v``; for real logit units
    use :func:`interpbook.lenses.direct_logit_attribution`."""
    return model.anatomy.folded_W_U()


def value_logits(model: Model, layer: int, neurons: Sequence[int] | torch.Tensor | None = None, *,
                 fold_norm: bool = True, unembedding: torch.Tensor | None = None) -> torch.Tensor:
    """Each value vector (row of ``W_out``) projected to the vocabulary: ``[n, vocab]``.

    ``neurons`` selects rows (default: all ``d_mlp``). With ``fold_norm`` (default) the
    value is read as the model reads it: through the gain of the norm after the MLP
    (Gemma's post-feed-forward norm; none in Llama or GPT-2) and the final norm's gain
    folded into ``W_U``; ``fold_norm=False`` gives the paper's plain ``v W_U``. Pass a
    precomputed ``unembedding`` (e.g. :func:`folded_unembedding`) to reuse it across layers.
    """
    a = model.anatomy
    with torch.no_grad():
        W_out = a.W_out(layer)
        if neurons is not None:
            W_out = W_out[torch.as_tensor(neurons, dtype=torch.long, device=W_out.device)]
        if not fold_norm:
            return W_out @ a.W_U
        post_gain = a.norm_gain(a.post_mlp_norm(layer)).to(W_out.device, W_out.dtype)
        U = unembedding if unembedding is not None else folded_unembedding(model)
        return (W_out * post_gain) @ U


def value_top_tokens(model: Model, layer: int, neuron: int, k: int = 10, *, sign: float = 1.0) -> list[str]:
    """The ``k`` tokens a value vector promotes most (``sign=-1``: when its neuron is negative)."""
    return top_tokens(model, sign * value_logits(model, layer, [neuron])[0], k)[0]


def visible(token: str) -> str:
    """A token for display, with its leading spaces shown as ``␣`` (``' Paris'`` -> ``'␣Paris'``)
    and line breaks and tabs as ``↵`` and ``⇥`` (a newline token would print as a blank)."""
    stripped = token.lstrip(" ")
    return "␣" * (len(token) - len(stripped)) + stripped.replace("\n", "↵").replace("\t", "⇥")


# --- keys: top-activating contexts over a corpus ---------------------------------------------
@dataclass(frozen=True)
class Context:
    """One top-activating context of a neuron: the text up to and including the trigger
    token, that token, the token that follows it in the corpus, and the activation."""

    prefix: str
    token: str
    next_token: str
    activation: float


@dataclass
class TopActivations:
    """The ``k`` largest activations of every neuron of some layers over a corpus of token
    windows: ``values``/``index`` are ``[n_layers, d_mlp, k]`` (descending), ``index``
    a flat position into ``windows`` (``window * seq_len + pos``)."""

    layers: list[int]
    values: torch.Tensor
    index: torch.Tensor
    windows: torch.Tensor

    def _l(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not collected; have {self.layers}")
        return self.layers.index(layer)

    def trigger_tokens(self, layer: int) -> torch.Tensor:
        """Token id at each top-activating position ``[d_mlp, k]``."""
        return self.windows.reshape(-1)[self.index[self._l(layer)]]

    def next_tokens(self, layer: int) -> torch.Tensor:
        """Token id that follows each top-activating position in the corpus ``[d_mlp, k]``."""
        return self.windows.reshape(-1)[self.index[self._l(layer)] + 1]

    def contexts(self, tokenizer, layer: int, neuron: int, n: int = 5, width: int = 12) -> list[Context]:
        """The ``n`` top-activating contexts of ``neuron``, each as up to ``width`` tokens."""
        L, seq = self._l(layer), self.windows.shape[1]
        out = []
        for j in range(min(n, self.values.shape[-1])):
            flat = int(self.index[L, neuron, j])
            w, p = divmod(flat, seq)
            ids = self.windows[w, max(0, p - width + 1): p + 1].tolist()
            nxt = int(self.windows[w, p + 1]) if p + 1 < seq else None
            out.append(Context(tokenizer.decode(ids), tokenizer.decode(ids[-1:]),
                               "" if nxt is None else tokenizer.decode([nxt]),
                               float(self.values[L, neuron, j])))
        return out


def _batches(windows: torch.Tensor, batch_size: int, progress: bool, desc: str):
    starts = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=desc, leave=False)
    for s in starts:
        yield s, windows[s: s + batch_size]


def top_activations(model: Model, windows: torch.Tensor, layers: Sequence[int], k: int = 10, *,
                    batch_size: int = 32, skip_first: int = 4, by: str = "value",
                    progress: bool = False) -> TopActivations:
    """Stream ``windows`` ``[n, seq_len]`` through the model and keep, for every neuron
    of ``layers``, its ``k`` largest ``mlp_act`` values and where they occurred.

    ``by="abs"`` ranks by magnitude and keeps the sign: in a gated MLP
    ``act(gate) * up`` is large and negative as often as large and positive, and a
    negative coefficient writes ``-v_i``.

    Only the positions ``skip_first <= pos < seq_len - 1`` compete: the last has no next
    token in the window, and the first few have almost no context (and in many models
    carry outlier activations at the very first position). The forward pass stops after
    the last requested layer; nothing but the running top-k is kept.
    """
    layers = sorted(set(int(l) for l in layers))
    if by not in ("value", "abs"):
        raise ValueError(f"by must be 'value' or 'abs', got {by!r}")
    n, seq = windows.shape
    if not 0 <= skip_first < seq - 1:
        raise ValueError(f"skip_first={skip_first} leaves no positions in windows of {seq} tokens")
    d = model.d_mlp
    vals = torch.full((len(layers), d, k), float("-inf") if by == "value" else 0.0)
    idx = torch.zeros((len(layers), d, k), dtype=torch.long)
    valid = torch.zeros(seq, dtype=torch.bool)
    valid[skip_first: seq - 1] = True

    def merge(i: int, flat: torch.Tensor):
        """An edit that leaves layer ``layers[i]``'s activations as they are and merges
        them into its running top-k, so that no layer's activations outlive its hook."""
        def fn(x: torch.Tensor) -> torch.Tensor:
            act = x.detach().float().cpu()[:, valid].reshape(-1, d).T  # [d, b*valid]
            best = (act.abs() if by == "abs" else act).topk(min(k, act.shape[1]), dim=1).indices
            cand_v = torch.cat([vals[i], act.gather(1, best)], 1)
            cand_i = torch.cat([idx[i], flat[best]], 1)
            top = (cand_v.abs() if by == "abs" else cand_v).topk(k, dim=1).indices
            vals[i], idx[i] = cand_v.gather(1, top), cand_i.gather(1, top)
            return x
        return fn

    for start, batch in _batches(windows, batch_size, progress, "top activations"):
        flat = (start + torch.arange(batch.shape[0]))[:, None] * seq + torch.arange(seq)[None]  # [b, seq]
        flat = flat[:, valid].reshape(-1)
        model.run(batch, edits=[edit(("mlp_act", l), merge(i, flat)) for i, l in enumerate(layers)],
                  stop_early=True)
    return TopActivations(layers, vals, idx, windows)


def mlp_activations(model: Model, windows: torch.Tensor | dict, layer: int, *, batch_size: int = 32,
                    skip_first: int = 0, progress: bool = False) -> torch.Tensor:
    """``mlp_act`` of one layer for every token of ``windows``: ``[n_tokens, d_mlp]``, in
    row-major order of the kept positions.

    ``windows`` is a ``[n, seq_len]`` tensor of ids or a tokenised batch
    ``{"input_ids", "attention_mask"}`` (padding dropped). The first ``skip_first`` real
    tokens of each row are dropped too (see :func:`token_mask`).
    """
    ids, keep = token_mask(windows, skip_first)
    mask = windows["attention_mask"] if isinstance(windows, dict) else torch.ones_like(ids)
    out = []
    for start, batch in _batches(ids, batch_size, progress, f"mlp_act L{layer}"):
        m = mask[start: start + batch.shape[0]]
        run = model.run({"input_ids": batch, "attention_mask": m}, cache=[("mlp_act", layer)],
                        stop_early=True)
        out.append(run.cache["mlp_act", layer].float().cpu()[keep[start: start + batch.shape[0]]])
    return torch.cat(out)


def token_mask(windows: torch.Tensor | dict, skip_first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, keep)``: which positions :func:`mlp_activations` returns (real tokens
    from the ``skip_first``-th of their row on)."""
    if isinstance(windows, dict):
        ids, mask = windows["input_ids"].cpu(), windows["attention_mask"].cpu().bool()
    else:
        ids, mask = windows.cpu(), torch.ones_like(windows, dtype=torch.bool).cpu()
    pos = mask.long().cumsum(1) - 1
    return ids, mask & (pos >= skip_first)


# --- keys meet values ---------------------------------------------------------------------
def agreement_rate(value_top1: torch.Tensor, next_tokens: torch.Tensor) -> float:
    """Fraction of neurons whose value's top-1 token equals the token that follows their
    top-activating context (Geva et al., 2021, §4: the *agreement rate*)."""
    value_top1, next_tokens = torch.as_tensor(value_top1), torch.as_tensor(next_tokens)
    if value_top1.shape != next_tokens.shape:
        raise ValueError(f"shapes differ: {tuple(value_top1.shape)} vs {tuple(next_tokens.shape)}")
    return float((value_top1 == next_tokens).float().mean())


@dataclass(frozen=True)
class Agreement:
    """Key-value agreement of one layer (see :func:`key_value_agreement`)."""

    layer: int
    rate: float            # value's top-1 == next token of the top-1 trigger
    shuffled: float        # the same with next tokens of other neurons of the layer
    rate_any: float        # value's top-1 among the next tokens of all k triggers
    shuffled_any: float
    median_rank: float     # median rank of the top-1 trigger's next token in the value's logits
    n_neurons: int


def key_value_agreement(model: Model, top: TopActivations, layer: int, *,
                        neurons: Sequence[int] | torch.Tensor | None = None, seed: int = 0,
                        unembedding: torch.Tensor | None = None, chunk: int = 256) -> Agreement:
    """Compare each neuron's value (read in the vocabulary, and negated when its top
    activation is negative) with the tokens that follow its top-activating contexts; a
    random permutation of neurons gives the chance level (it keeps the layer's token
    statistics: frequent next tokens, frequent value tokens).

    The value logits are computed ``chunk`` neurons at a time: a whole layer's
    ``[d_mlp, vocab]`` is gigabytes for a large vocabulary.
    """
    nxt = top.next_tokens(layer)
    if neurons is None:
        neurons = torch.arange(nxt.shape[0])
    neurons = torch.as_tensor(neurons, dtype=torch.long)
    nxt = nxt[neurons]
    sign = top.values[top._l(layer), neurons, 0].sign().clamp(min=0) * 2 - 1  # orient by the top firing
    U = unembedding if unembedding is not None else folded_unembedding(model)
    top1, rank = [], []
    for s in range(0, len(neurons), chunk):
        logits = value_logits(model, layer, neurons[s: s + chunk], unembedding=U)
        logits = logits * sign[s: s + chunk, None].to(logits.device)
        target = logits.gather(1, nxt[s: s + chunk, :1].to(logits.device))
        top1.append(logits.argmax(-1).cpu())
        rank.append((logits > target).sum(1).float().cpu())
    top1, rank = torch.cat(top1), torch.cat(rank)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(neurons), generator=g)
    return Agreement(
        layer=layer,
        rate=agreement_rate(top1, nxt[:, 0]),
        shuffled=agreement_rate(top1, nxt[perm, 0]),
        rate_any=float((nxt == top1[:, None]).any(1).float().mean()),
        shuffled_any=float((nxt[perm] == top1[:, None]).any(1).float().mean()),
        median_rank=float(rank.median()),
        n_neurons=len(neurons),
    )


def last_token_share(top: TopActivations, layer: int) -> torch.Tensor:
    """Per neuron, the share of its top-k contexts that end in its most common trigger
    token ``[d_mlp]``: near 1 for a neuron that fires on one token whatever the context
    (a *shallow* pattern), low for one that fires on a theme across different tokens."""
    trig = top.trigger_tokens(layer)
    mode = trig.mode(dim=1).values
    return (trig == mode[:, None]).float().mean(1)


# --- sub-updates of one forward pass (Geva et al., 2022) ------------------------------------
@dataclass(frozen=True)
class SubUpdate:
    """One neuron's term ``m_i v_i`` of an MLP update: coefficient, norm ``|m_i| |v_i|``
    and the tokens it promotes (top of ``m_i v_i`` in the vocabulary)."""

    neuron: int
    coefficient: float
    weight: float
    tokens: tuple[str, ...]


def sub_updates(model: Model, prompts: Prompts, layer: int, *, pos: int = -1) -> torch.Tensor:
    """The coefficients ``m`` (``mlp_act``) of ``layer`` at ``pos``: ``[batch, d_mlp]``.
    ``m @ W_out`` is the MLP update (before Gemma's post-MLP norm, if any)."""
    run = model.run(prompts, cache=[("mlp_act", layer)], stop_early=True)
    return run.cache["mlp_act", layer][:, pos].float()


def top_sub_updates(model: Model, prompt: str, layer: int, k: int = 10, *, n_tokens: int = 8,
                    pos: int = -1) -> list[SubUpdate]:
    """The ``k`` dominant sub-updates (largest ``|m_i| |v_i|``, ``v_i`` through the gain of a
    post-MLP norm if the model has one) of ``layer`` on ``prompt``."""
    a = model.anatomy
    m = sub_updates(model, prompt, layer, pos=pos)[0]
    W_out = a.W_out(layer).detach().float() * a.norm_gain(a.post_mlp_norm(layer)).float()
    weight = m.abs() * W_out.norm(dim=1)
    best = weight.topk(k).indices
    logits = value_logits(model, layer, best) * m[best, None].sign()
    return [SubUpdate(n, float(m[n]), float(weight[n]), tuple(toks))
            for n, toks in zip(best.tolist(), top_tokens(model, logits, n_tokens))]


def token_contributions(model: Model, prompts: Prompts, layer: int, tokens: Sequence[int], *,
                        pos: int = -1) -> torch.Tensor:
    """Each sub-update's direct effect on some tokens' logits, in real logit units:
    ``[batch, d_mlp, n_tokens]``.

    The sub-update ``m_i v_i`` goes through the post-MLP norm (Gemma) and the final norm,
    both frozen at their scale in this forward pass
    (:func:`interpbook.lenses.direct_logit_attribution`); summing over neurons gives the
    MLP output's direct logit attribution (less the share of the output bias, if any)."""
    a = model.anatomy
    last = model.n_layers - 1
    run = model.run(prompts, cache=[("mlp_act", layer), ("resid_post", last)])
    m = run.cache["mlp_act", layer][:, pos].float()
    W_out = a.W_out(layer).detach().float()
    with torch.no_grad():
        sub = m[:, :, None] * W_out  # [batch, d_mlp, d_model]
        update = m @ W_out + (0 if a.b_out(layer) is None else a.b_out(layer).float())
        sub = norm_as_linear(a.post_mlp_norm(layer), sub, update[:, None])
        return direct_logit_attribution(model, sub, run.cache["resid_post", last][:, pos, None], tokens)
