"""Attention heads: what their patterns do, and what their weights say (book chapter 4).

Three groups of small functions, each working on any model the anatomy supports
(Llama/SmolLM2/Qwen2/Mistral, Gemma 3, GPT-2, GPT-NeoX):

* **Pattern scores** read cached attention patterns: :func:`previous_token_score`,
  :func:`induction_score` and :func:`duplicate_token_score` on repeated random tokens
  (:func:`repeated_tokens`, :func:`attention_scores`), as in Olsson et al. (2022).
* **Weights in vocabulary space** (MAPS, Elhelo & Geva; Dar et al.): a head's OV circuit
  maps a *source* token to logits over the vocabulary (:func:`ov_logits`), its QK circuit
  scores query tokens against key tokens (:func:`qk_scores`). Both work on token subsets,
  so no ``vocab x vocab`` matrix is ever built. :func:`relation_scores` is MAPS's static
  score of how strongly every head implements a relation (source -> target token pairs),
  :func:`dynamic_relation_scores` the same read off the heads' outputs in context.
* **Composition** (Elhage et al. 2021; Merullo et al., *Talking Heads*): the ``d_model x
  d_model`` matrices :func:`W_OV` and :func:`W_QK` with the input norm's gain folded in,
  the Frobenius :func:`composition_score`, and the SVD of a sender's OV circuit into rank-1
  *communication channels* (:func:`ov_components`) whose composition with a receiver is
  :func:`component_composition`; :func:`remove_components` is the edit that deletes chosen
  channels from a head's output during a forward pass.

Conventions: a row vector times a matrix is the model's computation (``x @ W_OV``), as in
:mod:`interpbook.anatomy`; grouped-query K/V weights are already expanded per query head.
Rotary position embeddings are ignored by the weight-only QK quantities (they see the
position-free part of the bilinear form). Weights of the offline default model went
through 4-bit quantisation: scores read off weights carry that noise.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from .anatomy import norm_gain as _norm_gain
from .tracing import edit

__all__ = [
    "bos_prefix", "repeated_tokens", "previous_token_score", "induction_score", "duplicate_token_score",
    "attention_scores", "token_losses",
    "norm_gain", "source_inputs", "ov_logits", "qk_scores", "topk_hit_rate", "relation_scores",
    "head_output_logits", "dynamic_relation_scores",
    "W_OV", "W_QK", "composition_score", "composition_scores", "ov_components",
    "component_composition", "remove_components", "ablate_heads", "top_heads",
]


# --- attention-pattern scores --------------------------------------------------------------
def bos_prefix(model) -> list[int]:
    """``[bos_id]`` when the model's tokenizer starts every text with a BOS token (Gemma),
    else ``[]`` (SmolLM2): the prefix a hand-built sequence of ids needs to look like text."""
    tok = model.tokenizer
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return []
    ids = tok("a")["input_ids"]
    return [int(bos)] if ids and ids[0] == bos else []


def repeated_tokens(model, n_seq: int = 8, seq_len: int = 50, *, seed: int = 0,
                    low: int | None = None) -> torch.Tensor:
    """``n_seq`` sequences of ``seq_len`` random token ids, each repeated once, after the
    model's BOS token if it uses one (:func:`bos_prefix`): ``[n_seq, len(prefix) + 2 * seq_len]``.
    The repeat starts at position ``ids.shape[1] - seq_len``. Ids are drawn uniformly from
    ``[low, vocab)``; ``low`` skips special and byte tokens (default ``min(1000, vocab // 10)``).
    Seeded."""
    low = min(1000, model.d_vocab // 10) if low is None else low
    if not 0 <= low < model.d_vocab:
        raise ValueError(f"low must lie in [0, {model.d_vocab}) (the vocabulary), got {low}")
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(low, model.d_vocab, (n_seq, seq_len), generator=g)
    prefix = torch.tensor(bos_prefix(model), dtype=torch.long).expand(n_seq, -1)
    return torch.cat([prefix, first, first], dim=1).to(model.device)


def _diagonal_mean(pattern: torch.Tensor, offset: int, start: int) -> torch.Tensor:
    """Mean of ``pattern[..., q, q - offset]`` over batch and queries ``q >= start``.

    ``pattern`` is ``[batch, head, q, k]``; returns ``[head]``."""
    n = pattern.shape[-1]
    q = torch.arange(max(start, offset), n, device=pattern.device)
    return pattern[:, :, q, q - offset].mean(dim=(0, 2))


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """Average attention from each position to the one just before it ``[head]``.

    A previous-token head scores close to 1. ``pattern`` is ``[batch, head, q, k]``."""
    return _diagonal_mean(pattern, 1, 1)


def _check_period(period: int, start: int | None, n: int) -> int:
    start = period if start is None else start
    if not 0 < period <= start < n:
        raise ValueError(f"need 0 < period <= start < sequence length; got period={period}, "
                         f"start={start}, length {n}")
    return start


def induction_score(pattern: torch.Tensor, period: int, *, start: int | None = None) -> torch.Tensor:
    """Average attention, on a sequence that repeats with ``period``, from each position of
    the repeat to the token *after* its earlier occurrence (``q - period + 1``) ``[head]``.

    ``start`` is the first position of the repeat (default ``period``; one more after a BOS
    token). This is Olsson et al.'s prefix-matching score; an induction head scores close
    to 1."""
    start = _check_period(period, start, pattern.shape[-1])
    return _diagonal_mean(pattern, period - 1, start)


def duplicate_token_score(pattern: torch.Tensor, period: int, *, start: int | None = None) -> torch.Tensor:
    """Average attention from each position of the repeat (from ``start``, default
    ``period``) to its earlier occurrence (``q - period``) ``[head]``: duplicate-token heads
    score high."""
    start = _check_period(period, start, pattern.shape[-1])
    return _diagonal_mean(pattern, period, start)


def attention_scores(model, ids: torch.Tensor, period: int, *,
                     layers: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """Previous-token, induction and duplicate-token scores of every head ``[layer, head]``
    on ``ids`` (a batch of sequences whose last ``2 * period`` tokens repeat with ``period``,
    after an optional prefix such as BOS, e.g. from :func:`repeated_tokens`), plus the
    per-token losses ``[batch, pos - 1]`` of the run."""
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    start = ids.shape[-1] - period
    if start < period:
        raise ValueError(f"ids of length {ids.shape[-1]} cannot hold two copies of period {period}")
    run = model.run(ids, cache=[("attn_pattern", l) for l in layers])
    pats = [run.cache["attn_pattern", l].float() for l in layers]
    return {
        "previous_token": torch.stack([previous_token_score(p) for p in pats]),
        "induction": torch.stack([induction_score(p, period, start=start) for p in pats]),
        "duplicate": torch.stack([duplicate_token_score(p, period, start=start) for p in pats]),
        "loss": token_losses(run.logits, run.input_ids),
    }


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every position ``[batch, pos - 1]`` (natural log)."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, ids[:, 1:, None])[..., 0]


# --- weights in vocabulary space (MAPS) -----------------------------------------------------
def norm_gain(norm: nn.Module, d_model: int) -> torch.Tensor:
    """The per-dimension gain of a normalisation module ``[d_model]``, the diagonal that
    norm folding multiplies into the next weight matrix; the same as
    :meth:`interpbook.anatomy.Anatomy.norm_gain` (LayerNorm ``weight``, Llama RMSNorm ``g``,
    Gemma RMSNorm ``1 + g``)."""
    return _norm_gain(norm, d_model)


def source_inputs(model, src_ids: torch.Tensor | Sequence[int], *, first_mlp: bool = True) -> torch.Tensor:
    """Residual-stream vectors standing for source tokens ``[n, d_model]``.

    The token embeddings (times the model's embedding scale); with ``first_mlp`` also the
    first block's MLP output is added, as MAPS does for heads after layer 0 because the first
    MLP acts as part of the embedding in many models (Elhelo & Geva; the MAPS code uses the
    MLP output alone, we keep the residual: ``e + MLP_0(norm(e))``)."""
    a = model.anatomy
    ids = torch.as_tensor(src_ids, dtype=torch.long, device=model.device)
    with torch.no_grad():
        x = a.W_E[ids] * a.embed_scale
        if first_mlp:
            h = a.mlp_act_from(0, a.ln2(0)(x)) @ a.W_out(0)
            if a.b_out(0) is not None:
                h = h + a.b_out(0)
            x = x + a.post_mlp_norm(0)(h)
    return x


def _W_O_heads(model, layer: int, fold_norms: bool) -> torch.Tensor:
    """``W_O [head, d_head, d_model]``, times the post-attention norm's gain when folding
    (Gemma normalises the attention output before it joins the residual; ones elsewhere).
    The norm's RMS scaling is left out: the final norm rescales every row anyway."""
    a = model.anatomy
    W_O = a.W_O(layer).detach()
    return W_O * a.norm_gain(a.post_attn_norm(layer)) if fold_norms else W_O


def _vocab_weights(model, universe: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unembedding columns for ``universe`` (None: all) ``[d_model, n]`` and the bias."""
    a = model.anatomy
    W_U, b_U = a.W_U, a.b_U
    if universe is not None:
        W_U = W_U[:, universe]
        b_U = None if b_U is None else b_U[universe]
    return W_U, b_U


def head_output_logits(model, out: torch.Tensor, *, universe: torch.Tensor | None = None,
                       fold_norms: bool = True) -> torch.Tensor:
    """Logits of head outputs ``out [..., d_model]`` read directly by the unembedding
    (restricted to the token ids ``universe`` when given): ``[..., n_tokens]``.

    With ``fold_norms`` the final norm is applied to each output vector first (its gain is
    what folding multiplies into ``W_U``; the RMS scaling rescales a row and never changes
    its ranking)."""
    a = model.anatomy
    W_U, b_U = _vocab_weights(model, universe)
    with torch.no_grad():
        x = a.final_norm()(out) if fold_norms else out
        logits = x @ W_U
        if b_U is not None:
            logits = logits + b_U
    return logits


def ov_logits(model, layer: int, head: int, src_ids, *, universe: torch.Tensor | None = None,
              first_mlp: bool = True, fold_norms: bool = True) -> torch.Tensor:
    """A head's OV circuit in vocabulary space, on a subset of source tokens:
    row ``i`` holds the logits the head would write if it attended fully to token
    ``src_ids[i]`` ``[n_src, n_tokens]``.

    ``E[src] -> norm_in -> W_V[head] W_O[head] -> norm_final -> W_U`` restricted to the
    columns ``universe`` (all tokens when None). The ``vocab x vocab`` matrix ``E W_OV W_U``
    is never built: only the rows asked for. ``fold_norms`` applies the head's input norm,
    the post-attention norm's gain (Gemma) and the final norm (see :func:`head_output_logits`)."""
    a = model.anatomy
    x = source_inputs(model, src_ids, first_mlp=first_mlp and layer > 0)
    with torch.no_grad():
        xin = a.ln1(layer)(x) if fold_norms else x
        v = xin @ a.W_V(layer)[head]
        if a.b_V(layer) is not None:
            v = v + a.b_V(layer)[head]
        out = v @ _W_O_heads(model, layer, fold_norms)[head]
    return head_output_logits(model, out, universe=universe, fold_norms=fold_norms)


def qk_scores(model, layer: int, head: int, query_ids, key_ids, *, first_mlp: bool = False,
              fold_norms: bool = True) -> torch.Tensor:
    """A head's QK circuit on token subsets: the attention score (before scaling and
    softmax) of each query token for each key token ``[n_query, n_key]``, position-free
    (rotary embeddings left out)."""
    a = model.anatomy
    xq = source_inputs(model, query_ids, first_mlp=first_mlp and layer > 0)
    xk = source_inputs(model, key_ids, first_mlp=first_mlp and layer > 0)
    with torch.no_grad():
        if fold_norms:
            xq, xk = a.ln1(layer)(xq), a.ln1(layer)(xk)
        q = xq @ a.W_Q(layer)[head]
        k = xk @ a.W_K(layer)[head]
        if a.b_Q(layer) is not None:
            q, k = q + a.b_Q(layer)[head], k + a.b_K(layer)[head]
    return q @ k.T


def topk_hit_rate(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of rows whose target column is among the row's ``k`` largest entries.

    ``logits [..., n_rows, n_cols]``, ``targets [n_rows]`` (column indices); returns
    ``[...]``. This is MAPS's relation score when rows are source tokens."""
    targets = targets.to(logits.device)
    tgt = logits.gather(-1, targets.expand(*logits.shape[:-1])[..., None])
    # rank = number of entries strictly larger than the target's (ties count in its favour)
    rank = (logits > tgt).sum(-1)
    return (rank < k).float().mean(-1)


def _columns(tgt_ids: torch.Tensor, universe: torch.Tensor | None) -> torch.Tensor:
    if universe is None:
        return tgt_ids
    where = {int(t): i for i, t in enumerate(universe.tolist())}
    missing = [int(t) for t in tgt_ids.tolist() if int(t) not in where]
    if missing:
        raise ValueError(f"target ids {missing[:5]} are not in the universe; include every target")
    return torch.tensor([where[int(t)] for t in tgt_ids.tolist()], dtype=torch.long)


def relation_scores(model, src_ids, tgt_ids, *, k: int = 10, universe: torch.Tensor | None = None,
                    first_mlp: bool = True, fold_norms: bool = True,
                    layers: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """MAPS static relation scores of every head ``[layer, head]``.

    For a relation given as source/target token pairs, a head's score is the fraction of
    sources whose target is among the top-``k`` tokens of the head's OV map of that source
    (:func:`ov_logits`); the *suppression* score does the same with the negated map (heads
    that push the target down). ``universe`` restricts the ranking to a token subset (it
    must contain every target), which makes the computation proportionally cheaper."""
    a = model.anatomy
    src = torch.as_tensor(src_ids, dtype=torch.long, device=model.device)
    tgt = torch.as_tensor(tgt_ids, dtype=torch.long)
    cols = _columns(tgt, universe)
    universe = None if universe is None else torch.as_tensor(universe, dtype=torch.long, device=model.device)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    x0 = source_inputs(model, src, first_mlp=False)
    x1 = source_inputs(model, src, first_mlp=first_mlp) if first_mlp else x0
    pos, neg = [], []
    with torch.no_grad():
        for layer in layers:
            x = x0 if layer == 0 else x1
            xin = a.ln1(layer)(x) if fold_norms else x
            v = torch.einsum("nd,hde->hne", xin, a.W_V(layer))
            if a.b_V(layer) is not None:
                v = v + a.b_V(layer)[:, None]
            out = torch.einsum("hne,hed->hnd", v, _W_O_heads(model, layer, fold_norms))
            logits = head_output_logits(model, out, universe=universe, fold_norms=fold_norms)
            pos.append(topk_hit_rate(logits, cols, k))
            neg.append(topk_hit_rate(-logits, cols, k))
    return {"relation": torch.stack(pos), "suppression": torch.stack(neg)}


def _last_index(row: torch.Tensor, token: int) -> int:
    hits = (row == token).nonzero()
    if len(hits) == 0:
        raise ValueError(f"source token {token} does not occur in its prompt")
    return int(hits[-1])


def dynamic_relation_scores(model, prompts, src_ids, tgt_ids, *, k: int = 10,
                            universe: torch.Tensor | None = None, fold_norms: bool = True,
                            batch_size: int = 32) -> dict[str, torch.Tensor]:
    """MAPS's in-context (dynamic) relation scores ``[layer, head]`` at the last position
    of each prompt.

    ``with_context``: the head's actual output ``z W_O`` at the last position, read through
    the unembedding; the score is the fraction of prompts whose target is in its top ``k``.
    ``without_context``: the output the head would produce attending only to the source
    token (the value vector at the source's last occurrence, ``v_src W_O``), as MAPS
    measures by fixing the attention pattern. ``predictions`` holds the model's own top-1
    next token for each prompt (to measure task accuracy from the same run). Prompts are
    run in batches."""
    a = model.anatomy
    tgt = torch.as_tensor(tgt_ids, dtype=torch.long)
    cols = _columns(tgt, universe)
    universe = None if universe is None else torch.as_tensor(universe, dtype=torch.long, device=model.device)
    src = [int(s) for s in torch.as_tensor(src_ids).tolist()]
    group = model.n_heads // a.n_kv_heads
    L, H = model.n_layers, model.n_heads
    w_ctx, wo_ctx, preds = [], [], []
    prompts = prompts if isinstance(prompts, torch.Tensor) else list(prompts)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        # stop after the last block: only the last position's logits are needed, never [b, pos, vocab]
        run = model.run(chunk, cache=["attn_z", "v", ("resid_post", L - 1)], stop_early=True)
        pos = torch.tensor([_last_index(run.input_ids[i], src[start + i]) for i in range(len(chunk))])
        rows = torch.arange(len(chunk))
        with torch.no_grad():
            preds.append(a.unembed(run.cache["resid_post", L - 1][:, -1]).argmax(-1).cpu())
        out_w, out_wo = [], []
        with torch.no_grad():
            for layer in range(L):
                W_O = _W_O_heads(model, layer, fold_norms)
                z = run.cache["attn_z", layer][:, -1]                        # [b, head, d_head]
                out_w.append(torch.einsum("bhe,hed->bhd", z, W_O))
                v = run.cache["v", layer][rows, pos]                         # [b, kv, d_head]
                v = v.repeat_interleave(group, dim=1)
                out_wo.append(torch.einsum("bhe,hed->bhd", v, W_O))
            # [layer, head, b, n_tokens]
            lw = head_output_logits(model, torch.stack(out_w).transpose(1, 2), universe=universe, fold_norms=fold_norms)
            lwo = head_output_logits(model, torch.stack(out_wo).transpose(1, 2), universe=universe, fold_norms=fold_norms)
        c = cols[start:start + len(chunk)]
        w_ctx.append(_hits(lw, c, k))
        wo_ctx.append(_hits(lwo, c, k))
    n = torch.tensor([min(batch_size, len(prompts) - s) for s in range(0, len(prompts), batch_size)], dtype=torch.float)
    weight = (n / n.sum())[:, None, None]
    return {"with_context": (torch.stack(w_ctx) * weight).sum(0),
            "without_context": (torch.stack(wo_ctx) * weight).sum(0),
            "predictions": torch.cat(preds)}


def _hits(logits: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
    return topk_hit_rate(logits, cols, k)


# --- composition and communication channels (Talking Heads) -------------------------------
def _folded(model, layer: int, head: int, which: str, fold_norm: bool) -> torch.Tensor:
    """One head's weight with the norm gains folded in: ``W_Q``, ``W_K``, ``W_V``
    ``[d_model, d_head]`` get the input norm's gain on their rows; ``W_O`` ``[d_head,
    d_model]`` gets the post-attention norm's gain on its columns (Gemma; ones elsewhere)."""
    a = model.anatomy
    W = getattr(a, which)(layer)[head].detach()
    if not fold_norm:
        return W
    if which == "W_O":
        return W * a.norm_gain(a.post_attn_norm(layer))[None, :]
    return a.norm_gain(a.ln1(layer))[:, None] * W


def W_OV(model, layer: int, head: int, *, fold_norm: bool = True) -> torch.Tensor:
    """The head's OV matrix ``[d_model, d_model]`` (``x @ W_OV`` is what it writes for a
    residual ``x`` it attends to), with the norm gains folded in:
    ``diag(g_in) W_V W_O diag(g_post)`` (``g_post``: Gemma's post-attention norm, else 1)."""
    return _folded(model, layer, head, "W_V", fold_norm) @ _folded(model, layer, head, "W_O", fold_norm)


def W_QK(model, layer: int, head: int, *, fold_norm: bool = True) -> torch.Tensor:
    """The head's QK matrix ``[d_model, d_model]``: ``x_q @ W_QK @ x_k.T`` is the
    (position-free) attention score, with the input norm's gain folded in on both sides."""
    return _folded(model, layer, head, "W_Q", fold_norm) @ _folded(model, layer, head, "W_K", fold_norm).T


def composition_score(A: torch.Tensor, B: torch.Tensor) -> float:
    """Elhage et al.'s composition score ``||A B||_F / (||A||_F ||B||_F)``: how much of
    ``B``'s output ``A`` reads, between 0 and 1."""
    return float(torch.linalg.matrix_norm(A @ B) / (torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B)))


class _LowRank:
    """A ``d x d`` matrix kept as ``left @ right`` (``[d, r] @ [r, d]``), with the triangular
    factors of ``left`` and ``right.T`` so that Frobenius norms of products cost ``r x r``."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, t_left=None, t_right=None):
        self.left, self.right = left, right
        self.t_left = torch.linalg.qr(left).R if t_left is None else t_left        # left = U_l t_left
        self.t_right = torch.linalg.qr(right.T).R if t_right is None else t_right  # right.T = U_r t_right

    def norm(self) -> torch.Tensor:
        return torch.linalg.matrix_norm(self.t_left @ self.t_right.T)

    def times(self, other: "_LowRank") -> torch.Tensor:
        """``||self @ other||_F`` without forming ``d x d`` matrices."""
        return torch.linalg.matrix_norm(self.t_left @ (self.right @ other.left) @ other.t_right.T)

    @property
    def T(self) -> "_LowRank":
        return _LowRank(self.right.T, self.left.T, self.t_right, self.t_left)


def _ov_factors(model, layer, head, fold_norm) -> _LowRank:
    return _LowRank(_folded(model, layer, head, "W_V", fold_norm), _folded(model, layer, head, "W_O", fold_norm))


def _qk_factors(model, layer, head, fold_norm) -> _LowRank:
    return _LowRank(_folded(model, layer, head, "W_Q", fold_norm), _folded(model, layer, head, "W_K", fold_norm).T)


def composition_scores(model, senders: Sequence[tuple[int, int]], receivers: Sequence[tuple[int, int]],
                       *, kind: str = "k", fold_norm: bool = True) -> torch.Tensor:
    """Composition scores ``[n_senders, n_receivers]`` between sender heads' OV circuits and
    receiver heads' QK (``kind="q"`` or ``"k"``) or OV (``"v"``) circuits:
    K: ``||W_QK W_OV^T||``, Q: ``||W_OV W_QK||``, V: ``||W_OV^s W_OV^r||``, each divided by
    both Frobenius norms (:func:`composition_score`). Heads are ``(layer, head)`` pairs; a
    receiver must sit in a later layer than its sender to compose (other pairs are scored
    anyway; read them as a baseline). Computed on the rank-``d_head`` factors, so no
    ``d_model x d_model`` matrix is formed."""
    if kind not in ("q", "k", "v"):
        raise ValueError(f"kind must be 'q', 'k' or 'v', got {kind!r}")
    with torch.no_grad():
        ovs = [_ov_factors(model, l, h, fold_norm) for l, h in senders]
        recv = [(_ov_factors if kind == "v" else _qk_factors)(model, l, h, fold_norm) for l, h in receivers]
        ov_norms = [ov.norm() for ov in ovs]
        r_norms = [r.norm() for r in recv]
        if kind == "k":
            ovs = [ov.T for ov in ovs]
        out = torch.zeros(len(senders), len(receivers))
        for i, ov in enumerate(ovs):
            for j, r in enumerate(recv):
                # k: ||W_QK W_OV^T|| ; q: ||W_OV W_QK|| ; v: ||W_OV^s W_OV^r||
                num = r.times(ov) if kind == "k" else ov.times(r)
                out[i, j] = num / (ov_norms[i] * r_norms[j])
    return out


def ov_components(model, layer: int, head: int, *, fold_norm: bool = True) -> dict[str, torch.Tensor]:
    """The SVD of a head's OV circuit as rank-1 channels, ``W_OV = sum_i s_i a_i^T b_i``.

    Returns ``S [r]`` (singular values, largest first, ``r = d_head``), ``read [r, d_model]``
    (input directions ``a_i``), ``write [r, d_model]`` (orthonormal output directions
    ``b_i``, what the channel writes into the residual stream) and ``z [r, d_head]``:
    directions in the head's own output space with ``z_i @ W_O = b_i``, for editing the
    head's activation ``attn_z`` (:func:`remove_components`); with ``fold_norm`` the
    post-attention norm's gain is part of ``W_O`` (Gemma)."""
    W_V = _folded(model, layer, head, "W_V", fold_norm)
    W_O = _folded(model, layer, head, "W_O", fold_norm)
    U, S, Vh = torch.linalg.svd(W_V @ W_O)
    r = min(W_V.shape)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    z = (U.T @ W_V) / S[:, None]
    return {"S": S, "read": U.T, "write": Vh, "z": z}


def component_composition(model, sender: tuple[int, int], receiver: tuple[int, int], *,
                          kind: str = "k", fold_norm: bool = True) -> torch.Tensor:
    """Composition score of each rank-1 channel of the sender's OV circuit with the
    receiver ``[r]``: the composition score (:func:`composition_score`) of the matrix
    ``s_i a_i^T b_i`` with the receiver's QK (or OV for ``kind="v"``) circuit, which reduces
    to the fraction of the receiver's matrix norm that reads the direction ``b_i``."""
    comp = ov_components(model, *sender, fold_norm=fold_norm)
    b = comp["write"]                                             # [r, d]
    if kind == "v":
        M = W_OV(model, *receiver, fold_norm=fold_norm)
        reads = b @ M                                             # b_i W_OV^r
    else:
        M = W_QK(model, *receiver, fold_norm=fold_norm)
        reads = b @ M if kind == "q" else b @ M.T                 # q: b_i W_QK ; k: W_QK b_i^T
    return torch.linalg.vector_norm(reads, dim=-1) / torch.linalg.matrix_norm(M)


def remove_components(model, layer: int, head: int, components: Sequence[int] | torch.Tensor, *,
                      fold_norm: bool = True, rows: Sequence[int] | None = None):
    """An edit (for ``model.run(..., edits=[...])``) deleting the chosen rank-1 channels from
    a head's output: the head's output ``o = z W_O`` loses its projection on each channel's
    write direction ``b_i`` (``o - (o . b_i) b_i``); everything else it writes stays.
    ``rows`` limits the edit to those prompts of the batch (to run several conditions in
    one batched pass)."""
    comp = ov_components(model, layer, head, fold_norm=fold_norm)
    idx = torch.as_tensor(list(components) if not isinstance(components, torch.Tensor) else components,
                          dtype=torch.long)
    if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < len(comp["S"])):
        raise IndexError(f"channel indices must lie in [0, {len(comp['S'])}), got {idx.tolist()}")
    W_O = _folded(model, layer, head, "W_O", fold_norm)
    read_out = W_O @ comp["write"][idx].T                         # [d_head, m]: z -> (z W_O) . b_i
    back = comp["z"][idx]                                         # [m, d_head]

    sel = slice(None) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)

    def fn(z: torch.Tensor) -> torch.Tensor:
        out = z.clone()
        zh = z[sel, :, head, :]
        out[sel, :, head, :] = zh - (zh @ read_out) @ back
        return out

    return edit(("attn_z", layer), fn)


def top_heads(scores: torch.Tensor, n: int = 5) -> list[tuple[int, int]]:
    """The ``n`` highest-scoring ``(layer, head)`` pairs of a ``[layer, head]`` score map."""
    flat = scores.flatten().topk(n).indices
    H = scores.shape[1]
    return [(int(i) // H, int(i) % H) for i in flat]


def ablate_heads(heads: Sequence[tuple[int, int]], *, pos: int | None = -1,
                 rows: Sequence[int] | None = None) -> list:
    """Edits zero-ablating the outputs (``attn_z``) of the ``(layer, head)`` pairs at
    position ``pos`` (None: every position), only in the batch ``rows`` when given, so that
    several ablation conditions can share one batched forward pass."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    sel = slice(None) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    p = slice(None) if pos is None else pos

    def make(hs):
        hidx = torch.tensor(hs, dtype=torch.long)

        def fn(z: torch.Tensor) -> torch.Tensor:
            out = z.clone()
            block = out[sel, p]                          # [rows, (pos,) head, d_head] copy
            block[..., hidx, :] = 0.0
            out[sel, p] = block
            return out
        return fn

    return [edit(("attn_z", layer), make(hs)) for layer, hs in by_layer.items()]
