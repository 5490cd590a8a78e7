"""Dissecting factual recall (Geva et al. 2023): attention knockout, subject enrichment and
attribute extraction.

- *Attention knockout*: in a window of layers, the last position may not attend to a set
  of source positions (the subject, or the relation's other tokens). The edge is cut inside
  the model's own attention: a hook on each attention module sets the additive attention
  mask of those (row, last position, source) entries to the dtype's minimum, so the softmax
  gives them zero weight and spreads it over the rest. The first token is never cut: it is
  the attention sink (:func:`check_sources` refuses it), and neither is the last position's
  edge to itself (the softmax needs one unblocked entry). Many knockouts run in one forward
  pass, one batch row each. The effect is the relative change in the true object's
  probability.
- *Subject enrichment*: the logit lens of the last subject position by layer: how many of
  the subject's attributes (the objects of all facts about it) sit in the top ``k`` tokens,
  against the same count for another subject's attributes.
- *Attribute extraction*: the fraction of facts for which one layer's attention (or MLP)
  output at the last position, read through the unembedding, has the object as its top
  token.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from .facts import Fact, object_token, subject_positions

__all__ = ["check_sources", "knocked_out", "knockout_probs", "relative_change", "knockout_scan",
           "subject_enrichment", "extraction_events", "extraction_rate"]


def check_sources(sources: Sequence[int], n_pos: int) -> list[int]:
    """Validate one knockout's source positions: inside the prompt, never the sink (0),
    never the last position itself."""
    out = sorted({int(s) for s in sources})
    bad = [s for s in out if not 0 <= s < n_pos]
    if bad:
        raise IndexError(f"source position {bad[0]} is outside the prompt (0..{n_pos - 1}).")
    if 0 in out:
        raise ValueError("position 0 is the attention sink: knocking it out would move most of the attention "
                         "mass elsewhere and measure the sink, not the edge. Leave it out of the sources.")
    if n_pos - 1 in out:
        raise ValueError(f"the last position ({n_pos - 1}) must keep its edge to itself (the softmax needs one "
                         "entry); leave it out of the sources.")
    return out


def _blocked_mask(mask: torch.Tensor, rows: list[int], sources: list[list[int]], batch: int) -> torch.Tensor:
    """A copy of the additive (float) or allowed (bool) attention mask with the last query
    position's entries for ``sources[i]`` blocked in row ``rows[i]``."""
    mask = mask.expand(batch, *mask.shape[1:]).clone()
    for r, src in zip(rows, sources):
        if mask.dtype == torch.bool:
            mask[r, :, -1, src] = False
        else:
            mask[r, :, -1, src] = torch.finfo(mask.dtype).min
    return mask


@contextmanager
def knocked_out(model, blocks: Sequence[tuple[Sequence[int], Sequence[int]]], n_pos: int):
    """Within the block, batch row ``i`` runs with the last position's attention to
    ``blocks[i][1]`` (source positions) cut at the layers ``blocks[i][0]``. An empty layer
    or source list leaves that row alone."""
    blocks = [(sorted({int(l) for l in layers}), check_sources(src, n_pos)) for layers, src in blocks]
    for layers, _ in blocks:
        bad = [l for l in layers if not 0 <= l < model.n_layers]
        if bad:
            raise IndexError(f"layer {bad[0]} is out of range: {model.name} has {model.n_layers} layers.")
    handles = []

    def hook_for(layer):
        rows = [i for i, (ls, src) in enumerate(blocks) if layer in ls and src]
        srcs = [blocks[i][1] for i in rows]

        def pre(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None or mask.dim() != 4:
                raise RuntimeError("attention knockout needs the 4-D attention mask of eager attention: load the "
                                   "model with attn_implementation='eager' (interpbook.load_model does).")
            hidden = args[0] if args else kwargs["hidden_states"]
            return args, {**kwargs, "attention_mask": _blocked_mask(mask, rows, srcs, hidden.shape[0])}

        return rows, pre

    try:
        for layer in range(model.n_layers):
            rows, pre = hook_for(layer)
            if rows:
                handles.append(model.anatomy.attn(layer).register_forward_pre_hook(pre, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def knockout_probs(model, prompt: str, target: int, blocks: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   batch_size: int = 128) -> torch.Tensor:
    """The probability of token ``target`` after ``prompt`` under each knockout in
    ``blocks`` (``(layers, sources)`` pairs; see :func:`knocked_out`), ``[len(blocks)]``."""
    enc = model.forward_inputs(prompt)
    n_pos = enc["input_ids"].shape[1]
    out = []
    for start in range(0, len(blocks), batch_size):
        chunk = blocks[start:start + batch_size]
        inputs = {k: v.repeat(len(chunk), 1) for k, v in enc.items()}
        with torch.no_grad(), knocked_out(model, chunk, n_pos):
            logits = model.forward_last(inputs)
        out.append(logits.float().softmax(-1)[:, target])
    return torch.cat(out)


def relative_change(knocked: torch.Tensor, clean: torch.Tensor | float) -> torch.Tensor:
    """Percent change of the object's probability: ``100 * (knocked - clean) / clean``."""
    return 100 * (knocked - clean) / clean


def knockout_scan(model, fact: Fact, window: int) -> dict[str, torch.Tensor]:
    """Relative change (%) of the object's probability when the last position cannot attend
    to the subject tokens, or to the other tokens except the sink and itself ("relation"),
    in a window of ``window`` layers starting at each layer (clipped at the top). Returns
    ``{"subject": [n_layers], "relation": [n_layers]}``."""
    if window < 1:
        raise ValueError(f"window must be at least 1 layer; got {window}.")
    enc = model.tokenize(fact.prompt)
    n_pos = enc["input_ids"].shape[1]
    subject = subject_positions(model.tokenizer, fact)
    relation = [p for p in range(1, n_pos - 1) if p not in subject]
    target = object_token(model.tokenizer, fact.target)
    windows = [list(range(s, min(model.n_layers, s + window))) for s in range(model.n_layers)]
    sets = {"subject": subject, "relation": relation}
    blocks = [([], [])] + [(w, src) for src in sets.values() for w in windows]
    probs = knockout_probs(model, fact.prompt, target, blocks)
    change = relative_change(probs[1:], probs[0])
    return {name: part for name, part in zip(sets, change.split(model.n_layers))}


def _last_positions(model, facts: Sequence[Fact], run) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a left-padded batch run: the last subject position and the last position."""
    width = run.input_ids.shape[1]
    lengths = run.attention_mask.sum(1)
    subj = torch.tensor([subject_positions(model.tokenizer, f)[-1] for f in facts]) + (width - lengths)
    return subj, torch.full_like(subj, width - 1)


def subject_enrichment(model, facts: Sequence[Fact], attributes: dict[str, set[str]], *, k: int = 50,
                       batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit lens of the last subject position at every layer: the mean number of the
    subject's attribute tokens (first tokens of ``attributes[subject]``) among the top
    ``k``, ``[n_layers]``; and the same count for the next fact's subject's attributes (a
    shifted pairing; a control for generic, subject-independent tokens)."""
    facts = list(facts)
    if len(facts) < 2:
        raise ValueError("subject_enrichment needs at least two facts (the control pairs each with another).")
    tok = model.tokenizer
    ids = [{object_token(tok, a) for a in attributes.get(f.subject, ())} for f in facts]
    control = ids[1:] + ids[:1]
    own = torch.zeros(model.n_layers)
    other = torch.zeros(model.n_layers)
    for start in range(0, len(facts), batch_size):
        chunk = facts[start:start + batch_size]
        with torch.no_grad():
            run = model.run([f.prompt for f in chunk], cache="resid_post")
            subj, _ = _last_positions(model, chunk, run)
            rows = torch.arange(len(chunk))
            for layer in range(model.n_layers):
                top = model.anatomy.unembed(run.cache["resid_post", layer][rows, subj]).topk(k, dim=-1).indices
                for i, row in enumerate(top.tolist()):
                    own[layer] += len(ids[start + i] & set(row))
                    other[layer] += len(control[start + i] & set(row))
    return own / len(facts), other / len(facts)


def extraction_events(model, facts: Sequence[Fact], site: str = "attn_out", *, batch_size: int = 32) -> torch.Tensor:
    """``[n_facts, n_layers]`` booleans: whether the layer's ``site`` output (``attn_out``
    or ``mlp_out``) at the last position, read through the final norm and unembedding, has
    the fact's object (its first token) as its top token (an *extraction event*)."""
    if site not in ("attn_out", "mlp_out"):
        raise ValueError(f"site must be 'attn_out' or 'mlp_out'; got {site!r}.")
    facts = list(facts)
    if not facts:
        raise ValueError("extraction needs at least one fact.")
    rows = []
    for start in range(0, len(facts), batch_size):
        chunk = facts[start:start + batch_size]
        targets = torch.tensor([object_token(model.tokenizer, f.target) for f in chunk])
        with torch.no_grad():
            run = model.run([f.prompt for f in chunk], cache=site)
            tops = torch.stack([model.anatomy.unembed(run.cache[site, layer][:, -1]).argmax(-1)
                                for layer in range(model.n_layers)], dim=1)
        rows.append(tops == targets[:, None])
    return torch.cat(rows)


def extraction_rate(model, facts: Sequence[Fact], site: str = "attn_out", *, batch_size: int = 32) -> torch.Tensor:
    """Per layer, the fraction of facts with an extraction event there ``[n_layers]``
    (see :func:`extraction_events`)."""
    return extraction_events(model, facts, site, batch_size=batch_size).float().mean(0)
