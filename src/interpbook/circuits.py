"""Circuit discovery on the indirect-object identification (IOI) task (book chapter 9).

Wang et al. (2023) found the circuit GPT-2 small uses to complete "When Mary and John went
to the store, John gave a drink to" with " Mary", the *indirect object* (IO), not the
repeated *subject* (S). This module holds the pieces a circuit study needs, written for any
model the anatomy supports:

* **Data.** :func:`ioi_dataset` builds prompt pairs offline from templates, names, places
  and objects: the clean prompt and its *ABC* corruption (the three name slots hold three
  different names), which keeps every token position and removes the IOI structure.
  :func:`single_token_names` keeps the names that are one token (with their leading space)
  for the model's tokenizer.
* **Metric.** :meth:`IOIDataset.metric` is the mean logit difference IO minus S of a
  batch of logits, :func:`logit_diffs` each prompt's on the model.
* **Paths.** :func:`direct_effects` path-patches every head's ABC output straight into the
  logits (all else frozen), :func:`path_patch` patches chosen *sender* heads' ABC outputs
  into chosen *receiver* heads' queries, keys or values only.
* **Evaluation.** :func:`template_means` gives each head's mean output over the ABC
  prompts of the same template; :func:`ablate_except` mean-ablates every head outside a
  circuit; :func:`circuit_logit_diffs` scores many circuits in batched forward passes and
  :func:`faithfulness` turns the scores into the paper's ratio.

Activation patching sweeps over (layer, position) and (layer, head) come from
:func:`interpbook.patching.sweep`; attention-pattern and OV scores from
:mod:`interpbook.heads`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .lm import Model
from .patching import logit_diff
from .tracing import edit, patch

__all__ = [
    "NAMES", "PLACES", "OBJECTS", "TEMPLATES", "IOIDataset", "single_token_words", "single_token_names",
    "ioi_dataset", "logit_diffs", "attention_to", "direct_effects", "path_patch", "template_means", "ablate_except",
    "circuit_logit_diffs", "faithfulness", "copy_scores",
]

Head = tuple[int, int]

#: Common English first names, filtered per model by :func:`single_token_names`.
NAMES = (
    "Mary John Alice Bob Sarah James Anna David Emma Michael Laura Daniel Kate Paul Lisa Mark Susan Peter "
    "Linda Tom Helen George Julia Frank Rachel Steve Karen Chris Amy Kevin Emily Jack Jessica Ryan Grace "
    "Adam Sophie Sam Lucy Ben Jane Max Rose Dan Claire Eric Megan Andrew Nancy Scott Amanda Brian Diana "
    "Henry Victoria Simon Hannah Carl Olivia Oscar Ruth Luke Martha Nick Anne Joe Kelly Matt Jenny Tim"
).split()
#: Places for the templates' ``{place}`` slot.
PLACES = "store park school office garden station hospital restaurant market beach house church library".split()
#: Objects for the templates' ``{object}`` slot.
OBJECTS = "drink book ring bone kiss basketball computer necklace apple pen ball snack bag gift".split()
#: Prompt templates in the BABA order, with ``{io}`` the indirect object and ``{s}`` the
#: subject, who is named twice; :func:`ioi_dataset` also builds the ABBA order by swapping
#: the first two names.
TEMPLATES = (
    "Then, {s} and {io} went to the {place}. {s} gave a {object} to",
    "Then, {s} and {io} had a lot of fun at the {place}. {s} gave a {object} to",
    "When {s} and {io} got a {object} at the {place}, {s} decided to give it to",
    "While {s} and {io} were working at the {place}, {s} gave a {object} to",
    "After {s} and {io} went to the {place}, {s} handed a {object} to",
    "Afterwards, {s} and {io} went to the {place}. {s} gave a {object} to",
    "Friends {s} and {io} found a {object} at the {place}. {s} gave it to",
    "Then, {s} and {io} were thinking about going to the {place}. {s} wanted to give a {object} to",
)

ROLES = ("io", "s1", "s2", "end")


def single_token_words(model: Model, words: Sequence[str]) -> list[str]:
    """The ``words`` that are one token for the model when preceded by a space (as they
    appear mid-sentence), in order."""
    if isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words):
        raise TypeError("words must be a list of non-empty strings, e.g. ['Mary', 'John'].")
    tok = model.tokenizer
    return [w for w in words if len(tok(" " + w.strip(), add_special_tokens=False)["input_ids"]) == 1]


def single_token_names(model: Model, names: Sequence[str] = NAMES) -> list[str]:
    """The names that are a single token (with their leading space) for ``model``."""
    return single_token_words(model, names)


@dataclass
class IOIDataset:
    """IOI prompt pairs for one model.

    ``prompts[i]`` is a clean prompt whose answer is the indirect object ``answers[i]`` (a
    token id) and whose wrong answer is the subject ``wrong[i]``; ``corrupt[i]`` is its ABC
    version (same template, place and object; three different names). ``template[i]`` is
    the template index and ``order[i]`` "BABA" or "ABBA". ``positions`` holds, per role
    (``io``, ``s1``, ``s2``, ``end``), each prompt's token index in its own tokenisation
    (no padding); :meth:`pos` turns it into the left-padded batch index."""

    prompts: list[str]
    corrupt: list[str]
    answers: torch.Tensor
    wrong: torch.Tensor
    template: torch.Tensor
    order: list[str]
    lengths: torch.Tensor
    positions: dict[str, torch.Tensor] = field(repr=False)
    names: list[str] = field(repr=False, default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows) -> "IOIDataset":
        """The dataset restricted to ``rows`` (indices, a slice or a bool mask)."""
        idx = torch.arange(len(self))[rows].reshape(-1).tolist()
        if not idx:
            raise ValueError("select() needs at least one row.")
        return IOIDataset([self.prompts[i] for i in idx], [self.corrupt[i] for i in idx], self.answers[idx],
                          self.wrong[idx], self.template[idx], [self.order[i] for i in idx], self.lengths[idx],
                          {k: v[idx] for k, v in self.positions.items()}, self.names)

    def pos(self, role: str) -> torch.Tensor:
        """Each prompt's index of ``role`` (io, s1, s2, end) in the left-padded batch ``[n]``."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}; got {role!r}.")
        return self.positions[role] + (int(self.lengths.max()) - self.lengths)

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean logit difference IO minus S over the prompts (``logits`` ``[n, vocab]`` or
        ``[n, pos, vocab]``; a batch of several copies of the dataset is averaged too)."""
        n = logits.shape[0]
        if n % len(self):
            raise ValueError(f"logits have {n} rows, not a multiple of the dataset's {len(self)} prompts.")
        reps = n // len(self)
        return logit_diff(logits, self.answers.repeat(reps), self.wrong.repeat(reps)).mean()


def ioi_dataset(model: Model, n_prompts: int = 64, *, seed: int = 0, templates: Sequence[str] = TEMPLATES,
                names: Sequence[str] = NAMES, places: Sequence[str] = PLACES,
                objects: Sequence[str] = OBJECTS) -> IOIDataset:
    """``n_prompts`` IOI prompts and their ABC corruptions, half BABA and half ABBA, the
    templates used in turn (sorted by template, so that one template's prompts are
    adjacent). Names, places and objects are filtered to single tokens for ``model`` so
    that a clean prompt and its corruption have the same number of tokens. Seeded."""
    if not isinstance(n_prompts, int) or n_prompts < 2:
        raise ValueError(f"n_prompts must be an int >= 2; got {n_prompts!r}.")
    if not templates or any("{io}" not in t or t.count("{s}") != 2 for t in templates):
        raise ValueError("Every template needs one '{io}' and two '{s}' slots, e.g. "
                         "'Then, {s} and {io} went to the {place}. {s} gave a {object} to'.")
    usable = single_token_names(model, names)
    if len(usable) < 5:
        raise ValueError(f"Only {len(usable)} of the {len(names)} names are single tokens for {model.name}; "
                         "an ABC corruption needs at least 5 (give more names).")
    fillers = {"place": single_token_words(model, places), "object": single_token_words(model, objects)}
    for slot, words in fillers.items():
        if any("{" + slot + "}" in t for t in templates) and not words:
            raise ValueError(f"None of the {slot}s is a single token for {model.name}; give others.")
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        t = i * len(templates) // n_prompts
        io, s, a, b, c = rng.sample(usable, 5)
        slots = {k: rng.choice(v) for k, v in fillers.items() if v}
        order = "BABA" if i % 2 == 0 else "ABBA"
        rows.append((t, order, io, s, a, b, c, slots))
    rows.sort(key=lambda r: r[0])
    prompts, corrupt, answers, wrong, tids, orders, lengths = [], [], [], [], [], [], []
    positions = {r: [] for r in ROLES}
    tok = model.tokenizer
    for t, order, io, s, a, b, c, slots in rows:
        text = _fill(templates[t], order, io, s, s, slots)
        prompts.append(text)
        corrupt.append(_fill(templates[t], order, a, b, c, slots))
        ids = tok(text)["input_ids"]
        io_id, s_id = model.token_id(" " + io), model.token_id(" " + s)
        s_at = [k for k, x in enumerate(ids) if x == s_id]
        io_at = [k for k, x in enumerate(ids) if x == io_id]
        if len(s_at) != 2 or len(io_at) != 1 or len(tok(corrupt[-1])["input_ids"]) != len(ids):
            raise ValueError(f"Template {templates[t]!r} does not tokenise to single-token names for "
                             f"{model.name} (a name must follow a space, not start the text).")
        for role, k in zip(ROLES, (io_at[0], s_at[0], s_at[1], len(ids) - 1)):
            positions[role].append(k)
        answers.append(io_id)
        wrong.append(s_id)
        tids.append(t)
        orders.append(order)
        lengths.append(len(ids))
    long = lambda x: torch.tensor(x, dtype=torch.long)
    return IOIDataset(prompts, corrupt, long(answers), long(wrong), long(tids), orders, long(lengths),
                      {r: long(v) for r, v in positions.items()}, usable)


def _fill(template: str, order: str, io: str, s1: str, s2: str, slots: dict) -> str:
    """One template filled in; ABBA swaps the first two names (``{io}`` comes first)."""
    first, second = (s1, io) if order == "BABA" else (io, s1)
    text = template.replace("{s}", "\0", 1).replace("{io}", "\1", 1)
    text = text.replace("\0", first).replace("\1", second).replace("{s}", s2)
    return text.format(**slots)


# --- attention and OV scores ------------------------------------------------------------
def attention_to(model: Model, ds: IOIDataset, role: str, *, source: str = "end") -> torch.Tensor:
    """Mean attention of every head from the ``source`` token to the ``role`` token on the
    clean prompts ``[layer, head]`` (e.g. END -> IO for name movers)."""
    q, k = ds.pos(source), ds.pos(role)
    run = model.run(ds.prompts, cache="attn_pattern", stop_early=True)
    rows = torch.arange(len(ds))
    return torch.stack([run.cache["attn_pattern", layer][rows, :, q, k].float().mean(0)
                        for layer in range(model.n_layers)])


def copy_scores(model: Model, heads: Sequence[Head], token_ids, *, k: int = 5, negative: bool = False) -> torch.Tensor:
    """Wang et al.'s copy score of each head ``[n_heads]``: the fraction of ``token_ids``
    (e.g. the names) that the head's OV circuit, fed the token (after the first MLP, as in
    :func:`interpbook.heads.ov_logits`), puts among its ``k`` highest logits over the whole
    vocabulary. ``negative`` scores the negated circuit (negative name movers)."""
    from .heads import ov_logits, topk_hit_rate

    ids = torch.as_tensor(token_ids, dtype=torch.long)
    out = []
    for layer, head in _checked_heads(model, heads):
        logits = ov_logits(model, layer, head, ids)
        out.append(topk_hit_rate(-logits if negative else logits, ids, k))
    return torch.stack(out) if out else torch.empty(0)


# --- paths --------------------------------------------------------------------------------
def _checked_heads(model: Model, heads) -> list[Head]:
    out = []
    for h in heads:
        if not (isinstance(h, (tuple, list)) and len(h) == 2):
            raise TypeError(f"A head is a (layer, head) pair; got {h!r}.")
        layer, head = int(h[0]), int(h[1])
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise IndexError(f"Head {(layer, head)} is out of range: {model.name} has layers 0..{model.n_layers - 1} "
                             f"and heads 0..{model.n_heads - 1}.")
        out.append((layer, head))
    return out


def _block_out(model: Model, layer: int, z: torch.Tensor) -> torch.Tensor:
    """What attention adds to the residual stream from head outputs ``z [..., head, d_head]``:
    the output projection, then the post-attention norm where the model has one (Gemma)."""
    a = model.anatomy
    return a.post_attn_norm(layer)(a.o_proj(layer)(z.flatten(-2)))


def _answer_logit_diff(model: Model, resid: torch.Tensor, ds: IOIDataset) -> torch.Tensor:
    """IO minus S logit from final residual vectors ``[..., n, d_model]`` (only the two
    unembedding columns each prompt needs are computed) ``[..., n]``."""
    a = model.anatomy
    normed = a.final_norm()(resid)
    W_U, b_U = a.W_U, a.b_U
    cols = torch.stack([ds.answers, ds.wrong])                      # [2, n]
    logits = torch.einsum("...nd,dkn->...kn", normed, W_U[:, cols])
    if b_U is not None:
        logits = logits + b_U[cols]
    logits = a.softcap(logits)
    return logits[..., 0, :] - logits[..., 1, :]


def direct_effects(model: Model, ds: IOIDataset) -> torch.Tensor:
    """Path patching from each head straight to the logits ``[layer, head]``: the mean IO-S
    logit difference when that head's output at the last position is taken from the ABC
    run and every other component keeps its clean value, relative to the clean one
    (``(patched - clean) / clean``). Name movers score negative (the clean answer loses
    its support), negative name movers positive. No extra forward pass is needed: only
    the head's term in the final residual stream changes."""
    clean_ld = _mean_clean(model, ds)
    sites = [("attn_z", l) for l in range(model.n_layers)] + [("resid_post", model.n_layers - 1)]
    with torch.no_grad():
        clean = model.run(ds.prompts, cache=sites, stop_early=True).cache
        corrupt = model.run(ds.corrupt, cache=sites[:-1], stop_early=True).cache
        final = clean["resid_post", model.n_layers - 1][:, -1]        # [n, d]
        H = model.n_heads
        effects = torch.empty(model.n_layers, H)
        eye = torch.eye(H, dtype=torch.bool)[:, None, :, None]          # [H, 1, H, 1]
        for layer in range(model.n_layers):
            zc, zx = clean["attn_z", layer][:, -1], corrupt["attn_z", layer][:, -1]   # [n, H, d_head]
            mixed = torch.where(eye, zx[None], zc[None])                # [H, n, H, d_head]
            delta = _block_out(model, layer, mixed) - _block_out(model, layer, zc)[None]
            effects[layer] = _answer_logit_diff(model, final[None] + delta, ds).mean(-1)
    return (effects - clean_ld) / clean_ld


def logit_diffs(model: Model, ds: IOIDataset, *, corrupted: bool = False) -> torch.Tensor:
    """Each prompt's IO minus S logit difference ``[n]``, on the clean prompts or (with
    ``corrupted``) on their ABC versions (still IO minus S of the clean prompt)."""
    logits = model.logits(ds.corrupt if corrupted else ds.prompts)
    return logit_diff(logits, ds.answers, ds.wrong)


def _mean_clean(model: Model, ds: IOIDataset) -> float:
    return float(logit_diffs(model, ds).mean())


def path_patch(model: Model, ds: IOIDataset, senders: Sequence[Head], receivers: Sequence[Head], *,
               site: str = "q", pos: int | None = -1, batch_size: int = 256) -> torch.Tensor:
    """Path patching (Wang et al. 2023): for each sender head, the mean IO-S logit
    difference when the sender's ABC output reaches *only* the receivers' ``site`` input
    (``q``, ``k`` or ``v``; at position ``pos``, None for all), relative to the clean one
    ``[n_senders]``.

    Two passes per sender, on the clean prompts: (1) the sender's output comes from the ABC
    run and every other head is frozen to its clean output (MLPs recompute), and the
    receivers' ``site`` is recorded; (2) a clean run with only the receivers' ``site``
    replaced by the recording. Receivers of ``k``/``v`` are named by their query head. A
    sender at or after a receiver's layer cannot reach it. Senders are packed into batched
    forwards of at most ``batch_size`` rows."""
    if site not in ("q", "k", "v"):
        raise ValueError(f"site must be 'q', 'k' or 'v' (the receiver's input); got {site!r}.")
    senders, receivers = _checked_heads(model, senders), _checked_heads(model, receivers)
    if not receivers:
        raise ValueError("path_patch needs at least one receiver head.")
    group = model.n_heads // model.anatomy.n_kv_heads if site in ("k", "v") else 1
    by_layer: dict[int, list[int]] = {}
    for layer, head in receivers:
        by_layer.setdefault(layer, []).append(head // group)
    last = max(by_layer)
    n = len(ds)
    clean_ld = _mean_clean(model, ds)
    if not senders:
        return torch.empty(0)
    enc = model.tokenize(ds.prompts)
    layers = range(last + 1)
    with torch.no_grad():
        zc = model.run(enc, cache=[("attn_z", l) for l in layers], stop_early=True).cache
        zx = model.run(ds.corrupt, cache=[("attn_z", l) for l in layers], stop_early=True).cache
    copies = max(1, batch_size // n)
    out = torch.empty(len(senders))
    for start in range(0, len(senders), copies):
        chunk = senders[start:start + copies]
        big = {k: v.repeat(len(chunk), 1) for k, v in enc.items()}
        frozen = []
        for layer in layers:
            z = zc["attn_z", layer].repeat(len(chunk), 1, 1, 1)
            for c, (sl, sh) in enumerate(chunk):
                if sl == layer:
                    z[c * n:(c + 1) * n, :, sh] = zx["attn_z", layer][:, :, sh]
            frozen.append(edit(("attn_z", layer), lambda x, z=z: z))
        with torch.no_grad():
            rec = model.run(big, cache=[(site, l) for l in by_layer], edits=frozen, stop_early=True).cache
            p = slice(None) if pos is None else pos
            edits = [patch((site, l), rec[site, l][:, p, hs].clone(), pos=p, head=hs)
                     for l, hs in by_layer.items()]
            logits = model.logits(big, edits=edits)
        for c, part in enumerate(logits.split(n)):
            out[start + c] = float(ds.metric(part))
    return (out - clean_ld) / clean_ld


# --- circuit evaluation by mean ablation ---------------------------------------------------
def template_means(model: Model, ds: IOIDataset) -> list[torch.Tensor]:
    """Per layer, every head's output ``attn_z`` averaged over the ABC prompts of the same
    template, broadcast back to each prompt's row ``[n, pos, head, d_head]``: the values a
    mean ablation writes (Wang et al. ablate with the ABC mean of each template)."""
    with torch.no_grad():
        cache = model.run(ds.corrupt, cache="attn_z", stop_early=True).cache
    out = []
    for layer in range(model.n_layers):
        z = cache["attn_z", layer]
        mean = torch.empty_like(z)
        for t in ds.template.unique():
            rows = (ds.template == t).nonzero()[:, 0]
            mean[rows] = z[rows].mean(0, keepdim=True)
        out.append(mean)
    return out


def _keep_masks(model: Model, circuits: Sequence[Sequence[Head]]) -> torch.Tensor:
    """``[n_circuits, layer, head]``: True where the head belongs to the circuit."""
    keep = torch.zeros(len(circuits), model.n_layers, model.n_heads, dtype=torch.bool)
    for c, heads in enumerate(circuits):
        for layer, head in _checked_heads(model, heads):
            keep[c, layer, head] = True
    return keep


def ablate_except(model: Model, circuit: Sequence[Head], means: list[torch.Tensor]) -> list:
    """Edits that mean-ablate every head *outside* ``circuit`` at every position (the values
    from :func:`template_means`); MLPs and the heads of the circuit run as usual."""
    return _ablation_edits(model, _keep_masks(model, [circuit]), means)


def _ablation_edits(model: Model, keep: torch.Tensor, means: list[torch.Tensor]) -> list:
    """One edit per layer for ``keep [copies, layer, head]`` on a batch of ``copies``
    stacked copies of the dataset."""
    if len(means) != model.n_layers:
        raise ValueError(f"means needs one tensor per layer ({model.n_layers}); got {len(means)}.")
    copies = keep.shape[0]
    edits = []
    for layer in range(model.n_layers):
        k = keep[:, layer]                                              # [copies, head]
        if bool(k.all()):
            continue
        n = means[layer].shape[0]
        rows_keep = k.repeat_interleave(n, 0)[:, None, :, None]         # [copies*n, 1, head, 1]
        mean = means[layer].repeat(copies, 1, 1, 1)
        edits.append(edit(("attn_z", layer), lambda z, m=mean, r=rows_keep: torch.where(r, z, m)))
    return edits


def circuit_logit_diffs(model: Model, ds: IOIDataset, circuits: Sequence[Sequence[Head]],
                        means: list[torch.Tensor], *, batch_size: int = 256) -> torch.Tensor:
    """Mean IO-S logit difference of each circuit ``[n_circuits]``: the clean prompts with
    every head outside the circuit mean-ablated (:func:`ablate_except`). Circuits are packed
    into batched forwards of at most ``batch_size`` rows. An empty circuit ablates every
    head; a circuit of every head is the full model."""
    if not circuits:
        raise ValueError("circuit_logit_diffs needs at least one circuit (a list of (layer, head) pairs).")
    keep = _keep_masks(model, circuits)
    if means[0].shape[0] != len(ds):
        raise ValueError(f"means were computed on {means[0].shape[0]} prompts, the dataset has {len(ds)}: "
                         "use template_means(model, ds) on the same dataset.")
    enc = model.tokenize(ds.prompts)
    n = len(ds)
    copies = max(1, batch_size // n)
    out = []
    for start in range(0, len(circuits), copies):
        k = keep[start:start + copies]
        big = {key: v.repeat(k.shape[0], 1) for key, v in enc.items()}
        with torch.no_grad():
            logits = model.logits(big, edits=_ablation_edits(model, k, means))
        out += [float(ds.metric(part)) for part in logits.split(n)]
    return torch.tensor(out)


def faithfulness(circuit: float, model: float, empty: float | None = None) -> float:
    """How much of the model's behaviour a circuit keeps: ``circuit / model`` (Wang et al.),
    or with ``empty`` (every head ablated) the normalised ``(circuit - empty) / (model -
    empty)`` of Hanna et al. (2024)."""
    base = 0.0 if empty is None else float(empty)
    gap = float(model) - base
    if abs(gap) < 1e-8:
        raise ValueError("The model's metric equals the baseline's: there is no behaviour to be faithful to.")
    return (float(circuit) - base) / gap
