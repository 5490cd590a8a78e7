"""Binding entities to attributes in context (book chapter 10).

A *binding context* names two entities and an attribute for each ("Alice lives in Paris.
Bob lives in Tokyo.") and a query asks for one entity's attribute. This module builds such
contexts from the book's offline data (:class:`BindingDataset`), and the interventions of
the chapter's two papers:

- binding-ID mean interventions (Feng and Steinhardt): :func:`slot_difference` is the mean
  difference between the activations of the second and the first slot's token at every
  layer, :func:`binding_edits` adds it to one slot and subtracts it from the other, and
  :func:`switch_rate` counts the answers that flip to the other attribute;
- moving cached keys and values between positions with the rotary embedding re-applied
  (:func:`rotate_keys`, :func:`move_cached`), to test position independence and
  factorizability on a key/value cache;
- the lookback signature (Prakash et al.): :func:`patch_last_token_by_layer` patches the
  last-token residual of a counterfactual query into the base query at every layer, in
  batched one-token passes on the base prompts' key/value cache, and
  :func:`lookback_outcomes` sorts each answer into base / counterfactual / third value /
  other;
- :func:`belief_stories`, a small CausalToM-style task (who believes what is in which
  container) to test whether a model tracks beliefs at all.
"""

from __future__ import annotations

import copy
import inspect
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .circuits import single_token_names, single_token_words
from .lm import Model
from .relations import country_capital
from .tracing import patch

__all__ = [
    "ROLES", "BindingDataset", "binding_dataset", "run_last", "slot_difference", "random_like", "binding_edits",
    "two_way_correct", "switch_rate", "rotate_keys", "context_cache", "move_cached", "swap_cached",
    "context_and_query", "query_logits", "mean_intervention_verdict", "patch_last_token_by_layer", "OUTCOMES", "lookback_outcomes", "BeliefStories",
    "belief_stories",
]

#: Token roles in a binding context (entity and attribute of slot 0, then of slot 1).
ROLES = ("E0", "A0", "E1", "A1")


@dataclass
class BindingDataset:
    """Two-entity binding prompts, all of the same token length (no padding).

    ``entities[i]`` and ``attributes[i]`` are context ``i``'s pairs for slots 0 and 1,
    ``query[i]`` the slot its question asks about, ``attr_ids[i]`` the token ids of its two
    attributes (slot order). ``positions[role]`` is the token index of ``E0``, ``A0``,
    ``E1``, ``A1`` (the same in every prompt) and ``context_end`` the number of tokens up to
    and including the context (the question starts there)."""

    prompts: list[str]
    entities: list[tuple[str, str]]
    attributes: list[tuple[str, str]]
    query: torch.Tensor
    attr_ids: torch.Tensor
    positions: dict[str, int] = field(repr=False)
    context_end: int = field(repr=False, default=0)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def answers(self) -> torch.Tensor:
        """The right attribute's token id for each prompt."""
        return self.attr_ids.gather(1, self.query[:, None])[:, 0]

    @property
    def others(self) -> torch.Tensor:
        """The other slot's attribute (the wrong answer) for each prompt."""
        return self.attr_ids.gather(1, 1 - self.query[:, None])[:, 0]

    def select(self, rows) -> "BindingDataset":
        """The dataset restricted to ``rows`` (indices, a slice or a bool mask)."""
        idx = torch.arange(len(self))[rows]
        idx = [int(i) for i in (idx if idx.dim() else idx[None])]
        return BindingDataset([self.prompts[i] for i in idx], [self.entities[i] for i in idx],
                              [self.attributes[i] for i in idx], self.query[idx], self.attr_ids[idx],
                              dict(self.positions), self.context_end)


def _context(entities, attributes) -> str:
    return "".join(f" {e} lives in {a}." for e, a in zip(entities, attributes))


def binding_prompt(model: Model, entities: Sequence[str], attributes: Sequence[str], query: int) -> str:
    """One binding prompt: the context, a question about slot ``query``, and the answer begun
    as "<entity> lives in" (through the model's chat template when it has one, plain text
    otherwise), so that the next token is the attribute."""
    e = entities[query]
    user = f"Facts:{_context(entities, attributes)} Where does {e} live?"
    return model.chat_prompt(user, answer_prefix=f"{e} lives in")


def _find(ids: list[int], token: int, start: int = 0) -> int:
    try:
        return ids.index(token, start)
    except ValueError:
        raise ValueError("a binding word was not found as one token in its prompt (was the prompt "
                         "tokenised differently from the words?)") from None


def binding_dataset(model: Model, n: int, *, seed: int = 0, first_query: int = 0,
                    names: Sequence[str] | None = None, cities: Sequence[str] | None = None) -> BindingDataset:
    """``n`` binding prompts with two entities (first names) living in two cities.

    Names and cities are single tokens for ``model`` (with a leading space): by default the
    book's IOI names and the capitals of the GeoNames countries. Each context draws two
    different names and cities (seeded); the queried slot alternates, starting at
    ``first_query`` (0 or 1). Every prompt
    has the same token length and the same token positions for each role (checked)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of prompts; got {n!r}.")
    names = single_token_names(model) if names is None else single_token_words(model, names)
    # the answer begins with the name (no leading space): keep names that are one token both ways
    names = [x for x in names if len(model.tokenizer(x, add_special_tokens=False)["input_ids"]) == 1]
    if cities is None:
        cities = sorted({c for _, c in country_capital().pairs if " " not in c and "-" not in c})
    cities = single_token_words(model, cities)
    if len(names) < 2 or len(cities) < 2:
        raise ValueError(f"need at least two single-token names and cities for {model.name}; "
                         f"got {len(names)} names and {len(cities)} cities.")
    if first_query not in (0, 1):
        raise ValueError(f"first_query is a slot, 0 or 1; got {first_query!r}.")
    rng = random.Random(seed)
    query = (torch.arange(n) + first_query) % 2
    ents, attrs, prompts = [], [], []
    for i in range(n):
        e, a = tuple(rng.sample(list(names), 2)), tuple(rng.sample(list(cities), 2))
        ents.append(e)
        attrs.append(a)
        prompts.append(binding_prompt(model, e, a, int(query[i])))
    attr_ids = torch.tensor([[model.token_id(" " + x) for x in a] for a in attrs])
    tok = model.tokenizer
    positions, ends, lengths = [], [], set()
    for p, e, a in zip(prompts, ents, attrs):
        ids = tok(p)["input_ids"]
        lengths.add(len(ids))
        e0 = _find(ids, model.token_id(" " + e[0]))
        a0 = _find(ids, int(model.token_id(" " + a[0])), e0)
        e1 = _find(ids, model.token_id(" " + e[1]), a0)
        a1 = _find(ids, model.token_id(" " + a[1]), e1)
        positions.append((e0, a0, e1, a1))
        ends.append(a1 + 2)  # the attribute and its full stop
    if len(lengths) != 1 or len(set(positions)) != 1:
        raise ValueError("the binding prompts do not line up token by token for this tokenizer "
                         f"(lengths {sorted(lengths)}); pass names and cities that are single tokens.")
    return BindingDataset(prompts, ents, attrs, query, attr_ids, dict(zip(ROLES, positions[0])), ends[0])


# --- binding-ID mean interventions -----------------------------------------------------------

def run_last(model: Model, prompts, *, edits=(), cache=None) -> tuple:
    """One forward pass without gradients that computes the unembedding at the last position
    only (with a large vocabulary most of the cost of a short prompt is the unembedding at
    every position): ``(logits [batch, vocab], recorded activations)``."""
    run = model.run(prompts, cache=cache, edits=edits, last_only=True)
    return run.last_logits, run.cache


def _resid(model: Model, ds: BindingDataset) -> torch.Tensor:
    """resid_pre of every layer, ``[layer, batch, pos, d_model]``."""
    with torch.no_grad():
        return model.run(ds.prompts, cache="resid_pre", stop_early=True).cache.stack("resid_pre")


def slot_difference(model: Model, ds: BindingDataset, kind: str) -> torch.Tensor:
    """The binding-ID difference ``mean(slot 1) - mean(slot 0)`` of the entity (``kind="E"``)
    or attribute (``kind="A"``) token's residual stream entering every layer,
    ``[layer, d_model]``, averaged over the contexts of ``ds``."""
    if kind not in ("E", "A"):
        raise ValueError(f"kind is 'E' (entities) or 'A' (attributes); got {kind!r}.")
    resid = _resid(model, ds)
    return (resid[:, :, ds.positions[kind + "1"]] - resid[:, :, ds.positions[kind + "0"]]).mean(1)


def random_like(delta: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random directions with the same norm as ``delta`` in every row (one per layer): the
    control for a mean intervention."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(delta.shape, generator=g, dtype=delta.dtype)
    return r / r.norm(dim=-1, keepdim=True) * delta.norm(dim=-1, keepdim=True)


def binding_edits(model: Model, ds: BindingDataset, resid: torch.Tensor, kind: str, delta: torch.Tensor):
    """Edits that swap the binding IDs of one kind: at every layer, the slot-0 token's
    residual becomes its clean value plus ``delta[layer]`` and the slot-1 token's its clean
    value minus ``delta[layer]``. ``resid`` is the clean ``resid_pre`` of every layer of the
    same prompts, ``[layer, batch, pos, d_model]``."""
    if kind not in ("E", "A"):
        raise ValueError(f"kind is 'E' (entities) or 'A' (attributes); got {kind!r}.")
    if delta.shape != (model.n_layers, model.d_model):
        raise ValueError(f"delta must be [n_layers, d_model] = {(model.n_layers, model.d_model)}; "
                         f"got {tuple(delta.shape)}.")
    p0, p1 = ds.positions[kind + "0"], ds.positions[kind + "1"]
    return [e for layer in range(model.n_layers)
            for e in (patch(("resid_pre", layer), (resid[layer, :, p0] + delta[layer]).clone(), pos=p0),
                      patch(("resid_pre", layer), (resid[layer, :, p1] - delta[layer]).clone(), pos=p1))]


def two_way_correct(logits: torch.Tensor, ds: BindingDataset) -> torch.Tensor:
    """Bool per prompt: the right attribute's logit beats the other attribute's."""
    rows = torch.arange(len(ds))
    return logits[rows, ds.answers] > logits[rows, ds.others]


def switch_rate(model: Model, ds: BindingDataset, edits, *, among: torch.Tensor | None = None) -> float:
    """Fraction of prompts whose answer, under ``edits``, is the *other* slot's attribute
    (two-way), among the prompts in the bool mask ``among`` (default: all)."""
    logits, _ = run_last(model, ds.prompts, edits=edits)
    switched = ~two_way_correct(logits, ds)
    among = torch.ones(len(ds), dtype=torch.bool) if among is None else among
    if not bool(among.any()):
        raise ValueError("no prompt left to score: the mask `among` selects none.")
    return float(switched[among].float().mean())


def mean_intervention_verdict(switch: dict, control: dict, *, margin: float = 0.25) -> str:
    """The reproduction verdict for binding-ID mean interventions, from the switch rates of
    the entity (``"E"``) and attribute (``"A"``) interventions and of their norm-matched
    random controls: "reproduces" when both kinds switch most answers (> 0.5) and each beats
    its control by at least ``margin``; "partially" when at least one kind beats its control
    by ``margin``; "not at this scale" otherwise."""
    beats = {k: switch[k] - control[k] >= margin for k in ("E", "A")}
    if all(beats.values()) and min(switch["E"], switch["A"]) > 0.5:
        return "reproduces"
    return "partially" if any(beats.values()) else "not at this scale"


# --- key/value caches: moving a token to another position -----------------------------------

def _rotary(model: Model):
    mods = [m for name, m in model.hf.named_modules() if name.endswith("rotary_emb")]
    if not mods:
        raise ValueError(f"{model.name} has no rotary position embedding: its positions are absolute "
                         "(added to the token embedding), so a cached token cannot be moved by rotating its keys.")
    return mods[0]


def _cos_sin(model: Model, layer: int, delta: torch.Tensor, like: torch.Tensor):
    """cos and sin of the rotation by ``delta`` positions at ``layer``, ``[n, rot_dim]``,
    normalised (a rope scaling factor must not be applied twice)."""
    rot = _rotary(model)
    kwargs = {}
    if "layer_type" in inspect.signature(rot.forward).parameters:
        kwargs["layer_type"] = model.hf.config.layer_types[layer]
    cos, sin = rot(like, position_ids=delta[None].to(like.device), **kwargs)
    scale = (cos.float() ** 2 + sin.float() ** 2).sqrt()
    return (cos.float() / scale)[0], (sin.float() / scale)[0]


def rotate_keys(model: Model, keys: torch.Tensor, layer: int, delta) -> torch.Tensor:
    """Keys after the rotary embedding, ``[..., n, d_head]``, moved by ``delta`` positions
    (an int, or one per key position): the keys the same token would have had ``delta``
    positions later. Only the rotary dimensions turn (partial rotary: the first ones)."""
    n = keys.shape[-2]
    delta = torch.as_tensor(delta)
    if delta.dtype.is_floating_point or delta.dim() > 1:
        raise TypeError(f"delta must be an int or a 1-D tensor of ints; got {delta!r}.")
    delta = delta.expand(n) if delta.dim() == 0 else delta
    if delta.shape != (n,):
        raise ValueError(f"delta has {delta.numel()} entries for {n} key positions.")
    cos, sin = _cos_sin(model, layer, delta.long(), keys)
    r = cos.shape[-1]
    k, rest = keys[..., :r].float(), keys[..., r:]
    half = torch.cat((-k[..., r // 2:], k[..., : r // 2]), dim=-1)
    return torch.cat(((k * cos + half * sin).to(keys.dtype), rest), dim=-1)


def context_cache(model: Model, prompts) -> tuple:
    """Run ``prompts`` (equal token lengths) and return ``(cache, input_ids)``: the key/value
    cache of every layer."""
    enc = model.tokenize(prompts)
    if not bool(enc["attention_mask"].all()):
        raise ValueError("the prompts have different token lengths: a shared cache needs them equal (no padding).")
    with torch.no_grad():
        out = model.hf(input_ids=enc["input_ids"], use_cache=True)
    return out.past_key_values, enc["input_ids"]


def context_and_query(model: Model, ds: BindingDataset) -> tuple:
    """The key/value cache of the contexts of ``ds`` (tokens up to ``ds.context_end``) and
    the token ids of the rest of each prompt (the question and the answer's beginning)."""
    ids = model.tokenize(ds.prompts)["input_ids"]
    cache, _ = context_cache(model, {"input_ids": ids[:, :ds.context_end]})
    return cache, ids[:, ds.context_end:]


def _layers(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def move_cached(model: Model, cache, src: Sequence[int], dst: Sequence[int], *, source=None,
                rerotate: bool = True):
    """A copy of ``cache`` in which the keys and values at positions ``dst`` are those of
    positions ``src`` (of ``source``'s cache, default ``cache`` itself), at every layer.
    With ``rerotate`` the keys are turned by ``dst - src`` positions, so the moved token
    looks to later queries as if it sat at ``dst``; without it only the content moves and
    the keys keep their old positional phase."""
    src, dst = [int(i) for i in src], [int(i) for i in dst]
    if len(src) != len(dst):
        raise ValueError(f"src and dst need the same number of positions; got {len(src)} and {len(dst)}.")
    out = copy.deepcopy(cache)
    source = cache if source is None else source
    n = out.layers[0].keys.shape[-2]
    bad = [i for i in src + dst if not 0 <= i < n]
    if bad:
        raise IndexError(f"position {bad[0]} is outside the cache (0..{n - 1}).")
    delta = torch.tensor([d - s for s, d in zip(src, dst)])
    for layer, ((k, v), (k_src, v_src)) in enumerate(zip(_layers(out), _layers(source))):
        keys = k_src[..., src, :]
        k[..., dst, :] = rotate_keys(model, keys, layer, delta) if rerotate else keys
        v[..., dst, :] = v_src[..., src, :]
    return out


def swap_cached(model: Model, cache, i: int, j: int, *, rerotate: bool = True):
    """A copy of ``cache`` with the tokens at positions ``i`` and ``j`` exchanged."""
    return move_cached(model, cache, [i, j], [j, i], rerotate=rerotate)


def query_logits(model: Model, cache, query_ids: torch.Tensor, start: int | None = None) -> torch.Tensor:
    """Last-position logits of ``query_ids`` ``[batch, n]`` read against ``cache`` (a copy
    is used: the cache is not extended), with positions from ``start`` (default: right after
    the cached tokens)."""
    n_cached = cache.layers[0].keys.shape[-2]
    start = n_cached if start is None else start
    pos = torch.arange(start, start + query_ids.shape[1])[None].expand(query_ids.shape[0], -1)
    mask = torch.ones(query_ids.shape[0], n_cached + query_ids.shape[1], dtype=torch.long)
    with torch.no_grad():
        out = model.hf(input_ids=query_ids, past_key_values=copy.deepcopy(cache), position_ids=pos,
                       attention_mask=mask, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


# --- lookbacks: last-token patching by layer -------------------------------------------------

def patch_last_token_by_layer(model: Model, base: Sequence[str], counterfactual: Sequence[str], *,
                              site: str = "resid_pre", max_rows: int = 64) -> torch.Tensor:
    """Last-position logits ``[layer, batch, vocab]`` of the ``base`` prompts with the last
    token's ``site`` at one layer replaced by the ``counterfactual`` prompts' (row ``l``:
    layer ``l``).

    A patch at the last position cannot change the positions before it (attention is
    causal), so the base prompts' keys and values up to the last token are computed once
    and every patched run is a one-token pass on top of them: batches of at most
    ``max_rows`` rows (copies of the base batch, one per layer, each patched at its own
    layer). Every row holds its own copy of the prefix's keys and values, so larger batches
    cost memory and gain nothing on a CPU (16 prompts of 50 tokens on SmolLM2: 0.35 GB above
    the model with 64 rows, 0.80 GB with 256, in about the same time)."""
    if len(base) != len(counterfactual):
        raise ValueError(f"base and counterfactual need one prompt each per row; got {len(base)} and "
                         f"{len(counterfactual)}.")
    with torch.no_grad():
        cf = model.run(list(counterfactual), cache=site, stop_early=True).cache
    enc = model.forward_inputs(list(base))
    prefix, last = model.prefix_cache(enc, enc["input_ids"].shape[1] - 1)
    b, L = len(base), model.n_layers
    per = max(1, max_rows // b)
    out = None
    for first in range(0, L, per):
        layers = list(range(first, min(L, first + per)))
        edits = [patch((site, layer), cf[site, layer][:, -1].clone(), pos=-1,
                       rows=slice(i * b, (i + 1) * b)) for i, layer in enumerate(layers)]
        copies = torch.arange(b).repeat(len(layers))      # copy i: rows i*b .. (i+1)*b
        with torch.no_grad(), model.trace(edits=edits):
            logits = model.forward_last_from(prefix, copies, {k: v.repeat(len(layers), 1) for k, v in last.items()})
        if out is None:  # filled batch by batch: no second copy from concatenating
            out = logits.new_empty(L, b, logits.shape[-1])
        out[first:first + len(layers)] = logits.view(len(layers), b, -1)
    return out


#: Outcome labels of :func:`lookback_outcomes`, in code order 0..3.
OUTCOMES = ("base", "counterfactual", "third value", "other")


def lookback_outcomes(logits: torch.Tensor, base_answer: torch.Tensor, cf_answer: torch.Tensor,
                      third: torch.Tensor) -> torch.Tensor:
    """Sort each top-1 answer (``logits[..., batch, vocab]``) into :data:`OUTCOMES` codes:
    the base prompt's answer (0), the counterfactual's answer (1), the third value (2: the
    base context's attribute for the slot the counterfactual asks about), or anything else (3)."""
    top = logits.argmax(-1)
    codes = torch.full_like(top, 3)
    for code, ids in ((2, third), (1, cf_answer), (0, base_answer)):
        codes[top == ids.to(top.device)] = code
    return codes


# --- belief tracking (CausalToM-style) -------------------------------------------------------

@dataclass
class BeliefStories:
    """Two characters each fill one container with one drink; neither sees the other. The
    question asks what one character believes a container holds: the drink they put in
    their own container, "unknown" for the other's. ``candidates[i]`` holds the token ids
    of the two drinks and " unknown"; ``answer[i]`` indexes the right one."""

    prompts: list[str]
    candidates: torch.Tensor
    answer: torch.Tensor


DRINKS = ("tea", "coffee", "milk", "juice", "water", "beer", "wine", "soda")
CONTAINERS = ("cup", "bottle", "glass", "jar", "mug", "bowl")


def belief_stories(model: Model, n: int, *, seed: int = 0) -> BeliefStories:
    """``n`` short stories with a belief question each (half about a character's own
    container, half about the other's)."""
    names = single_token_names(model)
    drinks = single_token_words(model, DRINKS)
    containers = single_token_words(model, CONTAINERS)
    unknown = model.token_id(" unknown")
    rng = random.Random(seed)
    prompts, cands, answers = [], [], []
    for i in range(n):
        (p, q), (c, d), (x, y) = rng.sample(names, 2), rng.sample(containers, 2), rng.sample(drinks, 2)
        story = (f"Story: {p} and {q} are in a kitchen. {p} fills a {c} with {x}. {q} fills a {d} with {y}. "
                 f"{p} and {q} cannot see each other's containers.")
        own = i % 2 == 0
        question = (f" What does {p} believe the {c if own else d} contains? Answer with one word, "
                    f"or 'unknown' if {p} cannot know.")
        prompts.append(model.chat_prompt(story + question, answer_prefix="Answer:"))
        cands.append([model.token_id(" " + x), model.token_id(" " + y), unknown])
        answers.append(0 if own else 2)
    return BeliefStories(prompts, torch.tensor(cands), torch.tensor(answers))
