"""Causal tracing (Meng et al. 2022): where does a model carry a fact it recalls?

Three runs of one prompt (``"Fact: The Eiffel Tower is in the city of"``):

- the *clean* run gives the probability of the true object's first token;
- the *corrupted* run adds Gaussian noise to the subject's token embeddings, so the model
  no longer knows whom the prompt is about (the probability drops: the *total effect* is
  clean minus corrupted);
- a *restored* run is the corrupted run with one activation set back to its clean value:
  the hidden state (``resid_post``) at one (layer, position), or the MLP or attention output
  over a window of layers at one position. The *indirect effect* of that activation is the
  restored probability minus the corrupted one. Averaged over facts: the AIE.

Noise: ``factor`` (3, as in the paper) times the standard deviation of the input
embeddings (after any embedding scale, as the ``embed`` site carries them) of the subject
tokens of the facts traced (:func:`noise_scale`). Each fact is corrupted by ``n_samples``
noise draws; every restoration of that fact reuses the same draws, so effects are paired
differences and the corrupted probability is their mean.

Batched: a restored run differs from the corrupted one only in the rows it restores, so
:func:`trace_fact` packs many restorations into one forward pass (rows = restoration x
noise sample), each restored by a row-selective edit (:mod:`interpbook.tracing`), and
only from the restored position on: the positions before it are the corrupted run's,
computed once.
Positions before the subject are never corrupted (the model is causal), so restoring them
changes nothing: they get the corrupted probability without a forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..tracing import edit
from .facts import Fact, object_token, subject_positions

__all__ = ["KINDS", "SITES", "noise_scale", "window_layers", "FactTrace", "restored_probs", "trace_fact", "trace_facts",
           "POSITION_GROUPS", "position_groups", "average_indirect_effects"]

#: What can be restored (hidden states, MLP outputs, attention outputs).
KINDS = ("hidden", "mlp", "attn")
#: The anatomy site each kind restores.
SITES = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
#: The paper's grouping of token positions for averaging over prompts of different lengths.
POSITION_GROUPS = ("first subject", "middle subject", "last subject", "first after", "further", "last")


def noise_scale(model, facts: Sequence[Fact], factor: float = 3.0) -> float:
    """``factor`` x the standard deviation of the subject tokens' input embeddings
    (all their entries, after the model's embedding scale)."""
    if not facts:
        raise ValueError("noise_scale needs facts to measure the subjects' embeddings on.")
    ids = sorted({int(model.tokenize(f.prompt)["input_ids"][0, p]) for f in facts
                  for p in subject_positions(model.tokenizer, f)})
    with torch.no_grad():
        emb = model.anatomy.W_E[ids].float() * model.anatomy.embed_scale
    return float(factor * emb.std())


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The ``window`` layers centred on ``layer``, clipped to the model (the paper's MLP and
    attention restorations)."""
    if window < 1:
        raise ValueError(f"window must be at least 1 layer; got {window}.")
    lo = max(0, layer - window // 2)
    return list(range(lo, min(n_layers, lo + window)))


@dataclass
class FactTrace:
    """Causal-tracing results for one fact.

    ``probs[kind]`` is ``[n_layers, n_pos]``: the true object's probability with that
    activation restored. ``clean`` and ``corrupted`` are the unrestored probabilities."""

    fact: Fact
    tokens: list[str]
    subject: list[int]
    clean: float
    corrupted: float
    probs: dict[str, torch.Tensor]
    window: int

    @property
    def total_effect(self) -> float:
        """Clean minus corrupted probability."""
        return self.clean - self.corrupted

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """Restored minus corrupted probability ``[n_layers, n_pos]``."""
        return self.probs[kind] - self.corrupted


def _restore_fn(clean_value: torch.Tensor, rows: list[int], pos: list[int]):
    """Set ``value[rows[i], pos[i]]`` back to the clean run's activation at ``pos[i]``."""
    r, p = torch.tensor(rows), torch.tensor(pos)

    def fn(x):
        out = x.clone()
        out[r, p] = clean_value[0, p].to(x)
        return out

    return fn


def _add_noise(positions: torch.Tensor, noise: torch.Tensor):
    """Add ``noise[row, i]`` to the embedding at ``positions[i]`` of every row."""

    def fn(x):
        out = x.clone()
        out[:, positions] = x[:, positions] + noise.to(x)
        return out

    return fn


def restored_probs(model, prompt: str, target: int, subject: list[int], noise: torch.Tensor,
                   restorations: Sequence[tuple[str, Sequence[int], int]], clean_cache, *,
                   batch_size: int = 256) -> torch.Tensor:
    """The target's probability, averaged over noise samples, for each restoration.

    ``noise`` is ``[n_samples, len(subject), d_model]`` added to the subject's embeddings;
    a restoration ``(site, layers, pos)`` sets ``site`` at each of ``layers`` and position
    ``pos`` (an int or a list) back to ``clean_cache``'s value; an empty layer list restores
    nothing (the corrupted run). Returns ``[len(restorations)]``.

    A restoration cannot change the positions before its first one, so the corrupted run's
    keys and values there are computed once per noise sample (:meth:`~interpbook.lm.Model.prefix_cache`)
    and the restored runs process only the positions from there on."""
    n_samples = noise.shape[0]
    enc = model.forward_inputs(prompt)
    n_pos = enc["input_ids"].shape[1]
    per_pass = max(1, batch_size // n_samples)
    subj = torch.tensor(subject)
    groups: dict[int, list[int]] = {}
    for i, (_, layers, pos) in enumerate(restorations):
        first = min(q % n_pos for q in ([pos] if isinstance(pos, int) else pos)) if layers else n_pos - 1
        groups.setdefault(first, []).append(i)
    out = torch.empty(len(restorations))
    for start, members in sorted(groups.items()):
        early = subj < start
        if start > 0:
            samples = {k: v.repeat(n_samples, 1) for k, v in enc.items()}
            prefix, rest = model.prefix_cache(samples, start, edits=[edit("embed", _add_noise(subj[early], noise[:, early]))])
            rest = {k: v[:1] for k, v in rest.items()}
        else:
            prefix, rest = None, enc
        for first in range(0, len(members), per_pass):
            chunk = members[first:first + per_pass]
            plan: dict[tuple[str, int], tuple[list, list]] = {}
            for c, i in enumerate(chunk):
                site, layers, pos = restorations[i]
                for layer in layers:
                    for q in [pos] if isinstance(pos, int) else pos:
                        r, p = plan.setdefault((site, layer), ([], []))
                        r += range(c * n_samples, (c + 1) * n_samples)
                        p += [q % n_pos - start] * n_samples
            edits = [edit("embed", _add_noise(subj[~early] - start, noise[:, ~early].repeat(len(chunk), 1, 1)))]
            edits += [edit(key, _restore_fn(clean_cache[key][:, start:], r, p)) for key, (r, p) in plan.items()]
            inputs = {k: v.repeat(len(chunk) * n_samples, 1) for k, v in rest.items()}
            with torch.no_grad(), model.trace(edits=edits):
                if prefix is None:
                    logits = model.forward_last(inputs)
                else:
                    rows = torch.arange(n_samples).repeat(len(chunk))
                    logits = model.forward_last_from(prefix, rows, inputs)
            prob = logits.float().softmax(-1)[:, target]
            out[chunk] = prob.view(len(chunk), n_samples).mean(1)
    return out


def trace_fact(model, fact: Fact, *, noise: float, n_samples: int = 5, kinds: Sequence[str] = KINDS,
               window: int | None = None, seed: int = 0, batch_size: int = 256,
               positions: Sequence[int] | None = None) -> FactTrace:
    """Causal tracing of one fact: every kind restored at every layer and position.

    ``noise``: the noise standard deviation (:func:`noise_scale`). ``window``: layers per
    MLP/attention restoration (default a fifth of the depth, the paper's 10 of 48 layers
    rounded). ``positions``: the positions to restore (default every one from the first
    subject token; negative ones count from the end); the others are NaN, except those
    before the subject, which hold the corrupted probability (restoring them changes
    nothing). Seeded: the same ``seed`` gives the same noise."""
    bad = [k for k in kinds if k not in SITES]
    if bad:
        raise ValueError(f"unknown kind {bad[0]!r}; choose from {', '.join(KINDS)}.")
    if noise < 0 or n_samples < 1:
        raise ValueError(f"noise must be >= 0 and n_samples >= 1; got {noise}, {n_samples}.")
    n_layers = model.n_layers
    window = max(1, round(n_layers * 10 / 48)) if window is None else window
    window_layers(0, window, n_layers)  # validates
    subject = subject_positions(model.tokenizer, fact)
    target = object_token(model.tokenizer, fact.target)
    sites = sorted({(SITES[k], layer) for k in kinds for layer in range(n_layers)})
    with torch.no_grad():
        clean_run = model.run(fact.prompt, cache=sites)
    n_pos = clean_run.input_ids.shape[1]
    clean = float(clean_run.last_logits.float().softmax(-1)[0, target])
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randn(n_samples, len(subject), model.d_model, generator=gen) * noise
    todo = range(subject[0], n_pos) if positions is None else sorted({p % n_pos for p in positions})
    todo = [p for p in todo if p >= subject[0]]
    restorations = [("embed", [], 0)]
    where = []
    for kind in kinds:
        for layer in range(n_layers):
            for pos in todo:
                layers = [layer] if kind == "hidden" else window_layers(layer, window, n_layers)
                restorations.append((SITES[kind], layers, pos))
                where.append((kind, layer, pos))
    probs = restored_probs(model, fact.prompt, target, subject, draws, restorations, clean_run.cache,
                           batch_size=batch_size)
    corrupted = float(probs[0])
    out = {k: torch.full((n_layers, n_pos), float("nan")) for k in kinds}
    for k in kinds:
        out[k][:, :subject[0]] = corrupted
    for (kind, layer, pos), p in zip(where, probs[1:]):
        out[kind][layer, pos] = p
    tokens = [model.tokenizer.decode([int(i)]) for i in clean_run.input_ids[0]]
    return FactTrace(fact, tokens, subject, clean, corrupted, out, window)


def trace_facts(model, facts: Sequence[Fact], *, noise: float, progress: bool = False, **kwargs) -> list[FactTrace]:
    """:func:`trace_fact` for each fact (seeded per fact by its index)."""
    seed = kwargs.pop("seed", 0)
    items = list(enumerate(facts))
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(items, desc="causal tracing")
    return [trace_fact(model, f, noise=noise, seed=seed + i, **kwargs) for i, f in items]


def position_groups(trace: FactTrace) -> list[int]:
    """For each token position, its index in :data:`POSITION_GROUPS` (-1 before the subject)."""
    first, last = trace.subject[0], trace.subject[-1]
    n_pos = len(trace.tokens)
    groups = []
    for pos in range(n_pos):
        if pos < first:
            g = -1
        elif pos == n_pos - 1:
            g = 5
        elif pos == last:
            g = 2
        elif pos == first:
            g = 0
        elif pos < last:
            g = 1
        elif pos == last + 1:
            g = 3
        else:
            g = 4
        groups.append(g)
    return groups


def average_indirect_effects(traces: Sequence[FactTrace], kind: str) -> torch.Tensor:
    """The average indirect effect ``[n_layers, len(POSITION_GROUPS)]``: each fact's effects
    averaged within each position group (over the traced positions), then over the facts
    that have that group (NaN where none has it)."""
    if not traces:
        raise ValueError("average_indirect_effects needs at least one trace.")
    n_layers = traces[0].probs[kind].shape[0]
    total = torch.zeros(n_layers, len(POSITION_GROUPS))
    count = torch.zeros(len(POSITION_GROUPS))
    for t in traces:
        effect, groups = t.indirect_effect(kind), torch.tensor(position_groups(t))
        traced = ~effect.isnan().any(0)
        for g in range(len(POSITION_GROUPS)):
            cols = ((groups == g) & traced).nonzero()[:, 0]
            if len(cols):
                total[:, g] += effect[:, cols].mean(1)
                count[g] += 1
    return total / count
