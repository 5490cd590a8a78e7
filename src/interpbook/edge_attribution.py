"""Edge attribution patching (EAP) and EAP-IG on the computational graph of a transformer.

Hanna, Pezzelle & Belinkov (2024, "Have Faith in Faithfulness") score every *edge* of the
model's graph and keep the top ones as a circuit. The graph (:class:`EdgeGraph`):

* **senders** write to the residual stream: the embeddings, every attention head's output
  and every MLP's output;
* **receivers** read from it: every head's query, key and value input (separately, one per
  key/value head under grouped-query attention), every MLP's input and the logits;
* an **edge** ``u -> v`` joins a sender to every later receiver.

Because the residual stream is the sum of the senders' outputs, a receiver's input can be
rebuilt edge by edge: *patching the edge* ``u -> v`` adds ``a_u(corrupt) - a_u(clean)`` to
``v``'s input only. Edge attribution patching approximates the effect of every such patch
at once, to first order (Nanda 2023; Syed et al. 2023)::

    score(u -> v) = (a_u(corrupt) - a_u(clean)) . dMetric / d input_v     (summed over positions)

with the gradient at the clean run (EAP) or averaged over inputs interpolated from corrupt
to clean embeddings (EAP-IG, integrated gradients with a few steps). A circuit keeps the
top-n edges; every other edge carries its corrupted value (:func:`circuit_metrics`), and its
faithfulness is ``(m(circuit) - m(corrupt)) / (m(model) - m(corrupt))``
(:func:`interpbook.circuits.faithfulness`).

Everything runs on the native Hugging Face model: hooks record the senders' outputs and
edit the receivers' inputs (each head's q/k/v projection is fed its own copy of the
residual stream through the model's own norm module and projection weights).

With a post-norm after attention (Gemma) a head's output is its share of the normalised sum:
``post_norm`` linearised at the run's own attention output (:func:`interpbook.anatomy.norm_as_linear`),
so the heads' outputs still add up to what attention writes, in every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .anatomy import norm_as_linear
from .lm import Model, Prompts

__all__ = ["EdgeGraph", "edge_attribution", "circuit_metrics", "top_edges", "sender_outputs"]

Metric = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EdgeGraph:
    """The senders, receivers and edges of ``model``'s graph.

    ``senders``: ``"embed"``, ``"a{layer}.{head}"``, ``"m{layer}"`` in forward order.
    ``receivers``: ``"a{layer}.{head}<q>"``, ``"a{layer}.{kv}<k>"``, ``"a{layer}.{kv}<v>"``,
    ``"m{layer}"`` per layer, then ``"logits"``. ``edges [receiver, sender]`` is True where
    the sender comes before the receiver (the heads of a layer feed its MLP unless the
    model computes attention and MLP in parallel). Scores and circuits are
    ``[receiver, sender]`` tensors of the same shape."""

    senders: list[str]
    receivers: list[str]
    edges: torch.Tensor
    n_heads: int
    n_kv_heads: int

    @classmethod
    def of(cls, model: Model) -> "EdgeGraph":
        a = model.anatomy
        H, K, L = a.n_heads, a.n_kv_heads, a.n_layers
        senders = ["embed"]
        receivers, upstream = [], []
        for layer in range(L):
            before = len(senders)
            for kind, n in (("q", H), ("k", K), ("v", K)):
                receivers += [f"a{layer}.{h}<{kind}>" for h in range(n)]
                upstream += [before] * n
            senders += [f"a{layer}.{h}" for h in range(H)]
            receivers.append(f"m{layer}")
            upstream.append(before if a.parallel_residual else len(senders))
            senders.append(f"m{layer}")
        receivers.append("logits")
        upstream.append(len(senders))
        edges = torch.arange(len(senders))[None, :] < torch.tensor(upstream)[:, None]
        return cls(senders, receivers, edges, H, K)

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def layer_receivers(self, layer: int) -> slice:
        """The receivers of ``layer`` (q, k, v heads, then the MLP) as a slice."""
        per = self.n_heads + 2 * self.n_kv_heads + 1
        return slice(layer * per, (layer + 1) * per)

    def layer_senders(self, layer: int) -> slice:
        """The senders of ``layer`` (its heads, then its MLP) as a slice."""
        per = self.n_heads + 1
        return slice(1 + layer * per, 1 + (layer + 1) * per)

    def edge_names(self, mask: torch.Tensor) -> list[str]:
        """``"sender -> receiver"`` for every True entry of ``mask [receiver, sender]``."""
        return [f"{self.senders[s]} -> {self.receivers[r]}" for r, s in mask.nonzero().tolist()]

    def check(self, t: torch.Tensor, what: str) -> None:
        if t.shape[-2:] != self.edges.shape:
            raise ValueError(f"{what} must end in [receivers, senders] = {tuple(self.edges.shape)} "
                             f"(EdgeGraph.of(model)); got shape {tuple(t.shape)}.")


def top_edges(graph: EdgeGraph, scores: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Circuits of the ``sizes`` edges with the largest ``|score|`` ``[len(sizes), receiver,
    sender]`` (bool; Hanna et al. rank by absolute score). Ties are broken by position."""
    graph.check(scores, "scores")
    flat = torch.where(graph.edges, scores.abs(), torch.tensor(-1.0)).flatten()
    order = flat.argsort(descending=True, stable=True)
    out = torch.zeros(len(sizes), flat.numel(), dtype=torch.bool)
    for i, n in enumerate(sizes):
        if not 0 <= int(n) <= graph.n_edges:
            raise ValueError(f"A circuit size must be between 0 and the graph's {graph.n_edges} edges; got {n}.")
        out[i, order[:int(n)]] = True
    return out.view(len(sizes), *graph.edges.shape)


class _EdgeHooks:
    """Hooks that (a) record every sender's output into ``self.out [sender, rows, pos, d]``
    and (b) add ``delta(layer, receivers, x)`` to the receivers' residual inputs.

    ``delta`` gets the slice of receivers and the run's current input ``x [rows, pos, d]``
    and returns ``[rows, pos, n_receivers, d]`` or None (no change)."""

    def __init__(self, model: Model, graph: EdgeGraph, delta, record: bool, embed_fn=None):
        self.model, self.graph, self.delta, self.record, self.embed_fn = model, graph, delta, record, embed_fn
        self.out: torch.Tensor | None = None
        self.sums: dict[int, torch.Tensor] = {}   # number of senders stored -> their running sum
        self.handles: list = []
        self.x: dict[int, torch.Tensor] = {}
        self.attn_delta: tuple | None = None     # (layer, its input, delta of its q, k and v receivers)
        self.own_call = False

    def __enter__(self):
        a, g = self.model.anatomy, self.graph
        try:
            self._pre(a.layers()[0], self._embed)
            for layer in range(a.n_layers):
                self._pre(a.ln1(layer), lambda x, l=layer: self._remember(l, x))
                sl = g.layer_receivers(layer)
                start, H, K = sl.start, g.n_heads, g.n_kv_heads
                for kind, lo, n in (("q", start, H), ("k", start + H, K), ("v", start + H + K, K)):
                    point = a.qkv_point(kind, layer)
                    self.handles.append(point.module.register_forward_hook(
                        lambda m, args, out, p=point, k=kind, l=layer, r=slice(lo, lo + n): self._qkv(p, k, l, r, out)))
                self._pre(a.o_proj(layer), lambda z, l=layer: self._heads(l, z))
                self._pre(a.ln2(layer), lambda x, r=slice(sl.stop - 1, sl.stop): self._add(r, x))
                point = a.mlp_out_point(layer)
                self.handles.append(point.module.register_forward_hook(
                    lambda m, args, out, l=layer: self._mlp(l, out)))
            n = len(g.receivers)
            self._pre(a.final_norm(), lambda x: self._add(slice(n - 1, n), x))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, module, fn):
        def hook(mod, args, kwargs):
            raw = args[0] if args else kwargs["hidden_states"]
            new = fn(raw)
            if new is None or new is raw:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _store(self, senders: slice, value: torch.Tensor) -> None:
        if not self.record:
            return
        if self.out is None:
            b, p, _, d = value.shape
            self.out = value.new_zeros(len(self.graph.senders), b, p, d)
        self.out[senders] = value.movedim(2, 0)
        last = self.sums.get(senders.start, 0)
        self.sums[senders.stop] = last + value.sum(2)

    def _embed(self, x):
        if self.embed_fn is not None:
            x = self.embed_fn(x)
        self._store(slice(0, 1), x[:, :, None])
        return x

    def _remember(self, layer, x):
        if not self.own_call:  # not the per-head copies that _qkv itself normalises
            self.x[layer] = x
        return None

    def _add(self, receivers: slice, x):
        d = self.delta(receivers, x)
        return None if d is None else x + d[:, :, 0]

    def _layer_attn_delta(self, layer):
        """``delta`` of all of ``layer``'s q, k and v receivers, computed at the first of its
        three projections: one pass over the stored senders instead of three."""
        x = self.x[layer]
        if self.attn_delta is None or self.attn_delta[0] != layer or self.attn_delta[1] is not x:
            sl = self.graph.layer_receivers(layer)
            self.attn_delta = (layer, x, self.delta(slice(sl.start, sl.stop - 1), x))
        return self.attn_delta[2]

    def _qkv(self, point, kind, layer, receivers, out):
        a = self.model.anatomy
        d = self._layer_attn_delta(layer)
        if d is None:
            return None
        first = self.graph.layer_receivers(layer).start
        d = d[:, :, receivers.start - first:receivers.stop - first]
        self.own_call = True
        try:
            normed = a.ln1(layer)(self.x[layer][:, :, None] + d)               # [rows, pos, n, d]
        finally:
            self.own_call = False
        W, b = {"q": (a.W_Q, a.b_Q), "k": (a.W_K, a.b_K), "v": (a.W_V, a.b_V)}[kind]
        W, b = W(layer), b(layer)
        if kind != "q":  # the views repeat K/V for every query head; keep one per KV head
            group = a.n_heads // a.n_kv_heads
            W, b = W[::group], None if b is None else b[::group]
        new = torch.einsum("bpnd,nde->bpne", normed, W.to(normed.dtype))
        if b is not None:
            new = new + b
        raw = out[point.index or 0] if isinstance(out, tuple) else out
        written = point.write(raw, new)
        if isinstance(out, tuple):
            return (*out[:point.index or 0], written, *out[(point.index or 0) + 1:])
        return written

    def _heads(self, layer, z_flat):
        if self.record:
            a = self.model.anatomy
            z = a.hook_point("attn_z", layer).read(z_flat)                    # [rows, pos, head, d_head]
            parts = torch.einsum("bphe,hed->bphd", z, a.W_O(layer))
            total = parts.sum(2) + (0 if a.b_O(layer) is None else a.b_O(layer))
            post = a.post_attn_norm(layer)
            if not isinstance(post, torch.nn.Identity):
                parts = norm_as_linear(post, parts.movedim(2, 0), total).movedim(0, 2)
            sl = self.graph.layer_senders(layer)
            self._store(slice(sl.start, sl.stop - 1), parts)
        return None

    def _mlp(self, layer, out):
        raw = out[0] if isinstance(out, tuple) else out
        sl = self.graph.layer_senders(layer)
        self._store(slice(sl.stop - 1, sl.stop), raw[:, :, None])
        return None


def _inputs(model: Model, prompts: Prompts, copies: int = 1) -> dict:
    enc = model.forward_inputs(prompts)
    return {k: v.repeat(copies, 1) for k, v in enc.items()}


def sender_outputs(model: Model, prompts: Prompts, graph: EdgeGraph | None = None) -> torch.Tensor:
    """Every sender's output on ``prompts`` ``[sender, batch, pos, d_model]``: what it adds
    to the residual stream (the embeddings for ``"embed"``)."""
    graph = graph or EdgeGraph.of(model)
    hooks = _EdgeHooks(model, graph, lambda r, x: None, record=True)
    with torch.no_grad(), hooks:
        model.forward_last(model.forward_inputs(prompts))
    return hooks.out


def _check_pair(model: Model, clean: Prompts, corrupt: Prompts) -> tuple[dict, dict]:
    a, b = model.forward_inputs(clean), model.forward_inputs(corrupt)
    if a["input_ids"].shape != b["input_ids"].shape or not torch.equal(a["attention_mask"], b["attention_mask"]):
        raise ValueError("Clean and corrupted prompts must tokenise to the same shape and padding (edges are "
                         f"patched position by position); got {tuple(a['input_ids'].shape)} and "
                         f"{tuple(b['input_ids'].shape)}.")
    return a, b


def edge_attribution(model: Model, clean: Prompts, corrupt: Prompts, metric: Metric, *,
                     method: str = "eap", steps: int = 5, graph: EdgeGraph | None = None) -> torch.Tensor:
    """Attribution score of every edge ``[receiver, sender]`` (0 where there is no edge):
    the first-order estimate of how much ``metric`` (a scalar from the last-position logits
    ``[batch, vocab]``) changes when that one edge carries its value from the corrupted run.

    ``method="eap"``: the gradient at the clean run (one forward and backward pass).
    ``method="eap-ig"``: the gradient averaged over ``steps`` runs whose embeddings go from
    corrupt to clean (``corrupt + k/steps (clean - corrupt)``, k = 1..steps), as in Hanna et
    al.'s EAP-IG: each step costs one more forward and backward pass."""
    if method not in ("eap", "eap-ig"):
        raise ValueError(f"method must be 'eap' or 'eap-ig'; got {method!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}.")
    graph = graph or EdgeGraph.of(model)
    enc_clean, enc_corrupt = _check_pair(model, clean, corrupt)
    with torch.no_grad():
        a_clean = sender_outputs(model, enc_clean, graph)
        diff = sender_outputs(model, enc_corrupt, graph)
        e_clean, e_corrupt = a_clean[0].clone(), diff[0].clone()                # the embeddings, for EAP-IG
        diff = diff.sub_(a_clean).flatten(1)                                     # [sender, rows*pos*d], in place
    del a_clean
    alphas = [1.0] if method == "eap" else [k / steps for k in range(1, steps + 1)]
    scores = torch.zeros(len(graph.receivers), len(graph.senders))
    leaves: list[torch.Tensor] = []

    def delta(receivers, x):
        """A zero leaf per receiver input; its gradient is turned into scores (gradient . diff,
        averaged over the steps) as soon as backward reaches it, and then freed, so that only
        one layer's gradients are held at a time."""
        leaf = x.new_zeros(*x.shape[:2], receivers.stop - receivers.start, x.shape[-1], requires_grad=True)
        up = int(graph.edges[receivers.start].sum())

        def score(t):
            scores[receivers, :up] += (t.grad.movedim(2, 0).flatten(1) @ diff[:up].T).float() / len(alphas)
            t.grad = None
        leaf.register_post_accumulate_grad_hook(score)
        leaves.append(leaf)
        return leaf

    for alpha in alphas:
        leaves.clear()
        embed = None if alpha == 1.0 else (lambda x, t=alpha: e_corrupt + t * (e_clean - e_corrupt))
        with torch.enable_grad(), _EdgeHooks(model, graph, delta, record=False, embed_fn=embed):
            value = metric(model.forward_last(enc_clean))
            torch.autograd.backward(value, inputs=leaves)   # no gradient left on the weights
    return torch.where(graph.edges, scores, torch.zeros(()))


def circuit_metrics(model: Model, clean: Prompts, corrupt: Prompts, circuits: torch.Tensor, metric: Metric, *,
                    graph: EdgeGraph | None = None, batch_size: int = 32) -> torch.Tensor:
    """``metric`` of each circuit ``[n_circuits]``: the clean run in which every edge *not*
    in the circuit (``circuits [n_circuits, receiver, sender]``, bool) carries the sender's
    corrupted output instead of its current one. The circuits' own edges carry whatever
    their senders compute in this run. All edges: the clean model; no edge: the corrupted
    run. Several circuits share a forward pass (copies of the batch, at most
    ``batch_size`` rows)."""
    graph = graph or EdgeGraph.of(model)
    circuits = torch.as_tensor(circuits)
    if circuits.dim() == 2:
        circuits = circuits[None]
    graph.check(circuits, "circuits")
    if circuits.dtype != torch.bool:
        raise TypeError(f"circuits must be a bool mask; got {circuits.dtype}.")
    enc_clean, enc_corrupt = _check_pair(model, clean, corrupt)
    n = enc_clean["input_ids"].shape[0]
    with torch.no_grad():
        a_corrupt = sender_outputs(model, enc_corrupt, graph)
    copies = max(1, batch_size // n)
    out = []
    for start in range(0, len(circuits), copies):
        keep = circuits[start:start + copies] & graph.edges                            # [c, recv, send]
        c = keep.shape[0]

        def delta(receivers, x, keep=keep, c=c):
            """sum over cut edges of (corrupt - current) sender outputs, computed from the
            smaller of the kept and the cut edges (all upstream senders sum to the residual),
            as matrix products on the stored outputs."""
            up = int(graph.edges[receivers.start].sum())
            kept = keep[:, receivers, :up]
            cut = ~kept
            if not bool(cut.any()):
                return None
            use_kept = int(kept.any((0, 1)).sum()) < int(cut.any((0, 1)).sum())
            mask = kept if use_kept else cut
            shape = (n, *x.shape[1:])
            cur = hooks.out[:up].view(up, c, -1)                                         # [up, c, n*pos*d]
            corrupt = a_corrupt[:up].view(up, -1)                                        # [up, n*pos*d]
            cols = mask.any((0, 1)).nonzero()[:, 0]
            if 3 * len(cols) < up:  # gathering the few senders needed reads less than all of them
                cur, corrupt, mask = cur[cols], corrupt[cols], mask[:, :, cols]
            m = mask.to(corrupt.dtype)                                                   # [c, recv, senders]
            d = (m.flatten(0, 1) @ corrupt).view(c, -1, corrupt.shape[1])                # [c, recv, n*pos*d]
            for i in range(c):
                d[i] -= m[i] @ cur[:, i]          # a strided view: no copy of the senders
            d = d.view(c, -1, *shape)
            if use_kept:
                total = a_corrupt[:up].sum(0)[None] - hooks.sums[up].view(c, *shape)
                d = total[:, None] - d
            return d.permute(0, 2, 3, 1, 4).reshape(c * n, x.shape[1], -1, x.shape[2])

        hooks = _EdgeHooks(model, graph, delta, record=True)
        with torch.no_grad(), hooks:
            logits = model.forward_last(_inputs(model, enc_clean, c))
        out += [float(metric(part)) for part in logits.split(n)]
    return torch.tensor(out)
