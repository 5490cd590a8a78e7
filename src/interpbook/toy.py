"""Tiny attention-only transformers trained on synthetic in-context tasks (book chapter 12).

No training checkpoints of a pretrained language model exist offline, so Week 12 trains its
own small models on the CPU and watches circuits form. This module has the three pieces:

* **The task** (:class:`ICLTask`): in-context classification in the style of Singh et al.
  (2024). A sequence holds ``n_pairs`` exemplar-label pairs ``x1 y1 x2 y2 ... xq``; the query
  ``xq`` repeats one of the exemplars and the model must output that exemplar's label. Labels
  are re-assigned at random in every sequence, so no item-to-label mapping can be memorised:
  only looking the label up in context (an induction circuit) solves it. A second task,
  :class:`NameTask`, is indirect-object identification in miniature (two names, then one of
  them again; the answer is the other), which a *name mover* head solves. Both give the same
  interface (:data:`TASKS`), so everything below works for either.
* **The model** (:func:`attention_only_model`): a Hugging Face GPT-2 with tiny sizes whose
  MLPs are switched off (weights zero and frozen), wrapped as an
  :class:`interpbook.Model`, so every site, hook and head tool of the book works on it.
* **Training with checkpoints** (:func:`train_icl`): seeded AdamW, per-step loss, and at
  every checkpoint the held-out accuracy, the heads' previous-token and label-match scores
  and the weights. Runs are cached on disk (:func:`interpbook.artifacts.cached`), keyed on
  the full :class:`TrainSpec`. A spec can *clamp* a sub-circuit to its ideal during
  training (:data:`CLAMPS`), the "artificial optogenetics" of Singh et al.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Iterator, Sequence

import torch

from .artifacts import cached
from .heads import previous_token_score
from .lm import Model
from .tracing import edit

__all__ = [
    "ICLTask", "NameTask", "TASKS", "ToyTokenizer", "attention_only_model", "TrainSpec", "CLAMPS", "clamped",
    "label_attention", "held_out_batch", "evaluate", "train_icl", "load_checkpoint", "steps_to",
    "mean_ablate_heads", "accuracy", "circuit_size",
]

#: The sub-circuits a :class:`TrainSpec` can clamp to their ideal during training:
#: ``"prev"`` fixes the first layer's clamp head to attend to the previous token,
#: ``"match"`` fixes the second layer's clamp head to attend, from the query, to the label of
#: the matching exemplar, ``"copy"`` replaces that head's output at the query by an ideal copy
#: (the unembedding direction of each token it attends to, weighted by its attention).
CLAMPS = ("prev", "match", "copy")


# --- the task ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ICLTask:
    """In-context classification: ``n_pairs`` (item, label) pairs, then ``n_queries`` queries.

    A sequence reads ``x1 y1 ... xP yP q1 a1 q2 a2 ... qQ``: every query repeats one of the
    exemplars (drawn with replacement) and is followed by its label, except the last, where the
    sequence ends. The model is trained to predict the label at every query. Token ids: 0 is
    padding, ``1..n_items`` are items, the next ``n_labels`` ids are labels.
    """

    kind: ClassVar[str] = "icl"        # names the task's runs in the cache (not part of the key)

    n_pairs: int = 4
    n_items: int = 64
    n_labels: int = 16
    n_queries: int = 1

    def __post_init__(self):
        if self.n_pairs < 1 or self.n_items < self.n_pairs or self.n_labels < self.n_pairs:
            raise ValueError(f"An ICLTask needs n_pairs >= 1 distinct items and labels per sequence: "
                             f"n_items ({self.n_items}) and n_labels ({self.n_labels}) must be at least "
                             f"n_pairs ({self.n_pairs}).")
        if self.n_queries < 1:
            raise ValueError(f"An ICLTask needs at least one query; got n_queries={self.n_queries}.")

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_items + self.n_labels

    @property
    def seq_len(self) -> int:
        return 2 * (self.n_pairs + self.n_queries) - 1

    @property
    def query_pos(self) -> torch.Tensor:
        """The positions of the queries ``[n_queries]`` (where the loss is taken)."""
        return torch.arange(2 * self.n_pairs, self.seq_len, 2)

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``n`` sequences: ``ids [n, seq_len]``, the answers ``target [n, n_queries]`` and
        ``label_pos [n, n_queries]``, the position of each query's exemplar label (where an ideal
        induction head looks)."""
        P, Q = self.n_pairs, self.n_queries
        items = torch.rand(n, self.n_items, generator=generator).argsort(-1)[:, :P] + 1
        labels = torch.rand(n, self.n_labels, generator=generator).argsort(-1)[:, :P] + 1 + self.n_items
        which = torch.randint(0, P, (n, Q), generator=generator)
        ids = torch.zeros(n, 2 * (P + Q), dtype=torch.long)
        ids[:, 0:2 * P:2], ids[:, 1:2 * P:2] = items, labels
        target = labels.gather(1, which)
        ids[:, 2 * P::2], ids[:, 2 * P + 1::2] = items.gather(1, which), target
        return {"ids": ids[:, :-1], "target": target, "label_pos": 2 * which + 1, "query_pos": self.query_pos}

    def token_name(self, i: int) -> str:
        """``x3`` for item 3, ``y7`` for label 7, ``<pad>`` for 0."""
        if i == 0:
            return "<pad>"
        return f"x{i - 1}" if i <= self.n_items else f"y{i - 1 - self.n_items}"


@dataclass(frozen=True)
class NameTask:
    """Indirect-object identification in miniature: two names, then one of them again.

    A sequence reads ``w w A w B w ... S``: ``n_context`` tokens in which two distinct names
    stand at random positions among filler words, then the subject ``S``, a repeat of one of
    the two. The answer is the other name, the indirect object (in "When Mary and John went
    to the store, John gave a drink to", Mary). A *name mover* head (in IOI, one of the last
    layers) attends from the final position to the indirect object and copies it. Token ids: 0 is
    padding, ``1..n_fillers`` are filler words, the next ``n_names`` ids are names.
    """

    kind: ClassVar[str] = "names"

    n_names: int = 16
    n_fillers: int = 16
    n_context: int = 6

    def __post_init__(self):
        if self.n_names < 2:
            raise ValueError(f"A NameTask needs two distinct names per sequence: n_names ({self.n_names}) must be "
                             "at least 2.")
        if self.n_context < 2 or (self.n_context > 2 and self.n_fillers < 1):
            raise ValueError(f"A NameTask needs n_context >= 2 positions for the two names, and n_fillers >= 1 to "
                             f"fill the rest: got n_context={self.n_context}, n_fillers={self.n_fillers}.")

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_fillers + self.n_names

    @property
    def seq_len(self) -> int:
        return self.n_context + 1

    @property
    def query_pos(self) -> torch.Tensor:
        """The position of the repeated subject ``[1]``, the last one (where the loss is taken)."""
        return torch.tensor([self.n_context])

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``n`` sequences: ``ids [n, seq_len]``, the indirect object ``target [n, 1]``, its
        position ``label_pos [n, 1]`` (where an ideal name mover looks from the query) and the
        position of the subject's first mention ``subject_pos [n, 1]``."""
        C = self.n_context
        ids = torch.randint(1, self.n_fillers + 1, (n, C + 1), generator=generator)
        names = torch.rand(n, self.n_names, generator=generator).argsort(-1)[:, :2] + 1 + self.n_fillers
        pos = torch.rand(n, C, generator=generator).argsort(-1)[:, :2]         # [io, subject] positions
        rows = torch.arange(n)[:, None]
        ids[rows, pos] = names
        ids[:, C] = names[:, 1]
        return {"ids": ids, "target": names[:, :1], "label_pos": pos[:, :1], "subject_pos": pos[:, 1:],
                "query_pos": self.query_pos}

    def token_name(self, i: int) -> str:
        """``w3`` for filler word 3, ``N7`` for name 7, ``<pad>`` for 0."""
        if i == 0:
            return "<pad>"
        return f"w{i - 1}" if i <= self.n_fillers else f"N{i - 1 - self.n_fillers}"


#: The tasks of the toy models. Each gives ``vocab_size``, ``seq_len``, ``query_pos``,
#: ``token_name`` and ``sample(n, generator)``, whose batch holds ``ids``, ``target``,
#: ``query_pos`` and ``label_pos``: the position of each query's answer in the context, where
#: the task's ideal head attends from the query (:func:`label_attention`).
TASKS = (ICLTask, NameTask)


class ToyTokenizer:
    """Just enough of a tokenizer for :class:`interpbook.Model` on integer token ids: padding
    and readable names (the task's ``token_name``) for ``decode``; no text encoding."""

    pad_token = eos_token = "<pad>"
    pad_token_id = eos_token_id = 0
    bos_token_id = None
    padding_side = "left"
    chat_template = None

    def __init__(self, task: ICLTask | NameTask):
        self.task = task

    def decode(self, ids, **_) -> str:
        return " ".join(self.task.token_name(int(i)) for i in torch.as_tensor(ids).flatten())

    def __call__(self, *_, **__):
        raise TypeError("The toy model reads token ids, not text: pass a tensor of ids (e.g. ICLTask.sample).")


# --- the model -----------------------------------------------------------------------------
def attention_only_model(task: ICLTask | NameTask, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                         seed: int = 0) -> Model:
    """A freshly initialised attention-only transformer for ``task``, as an :class:`interpbook.Model`.

    It is a Hugging Face GPT-2 (LayerNorm, learned absolute positions, untied unembedding)
    whose MLPs are zero and frozen: every block adds attention only, and the
    book's anatomy, tracing and head tools apply unchanged. Initialised from ``seed`` without
    touching the global random state.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads}).")
    cfg = GPT2Config(vocab_size=task.vocab_size, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=1,
                     n_positions=task.seq_len, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, pad_token_id=0, bos_token_id=None, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = GPT2LMHeadModel(cfg)
        _default_init(hf)
    hf.config._attn_implementation = "eager"
    for block in hf.transformer.h:
        for p in block.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
    hf.eval()
    return Model(hf, ToyTokenizer(task), name=f"toy-{n_layers}L-d{d_model}-h{n_heads}-s{seed}")


def _default_init(hf) -> None:
    """PyTorch's default initialisation instead of GPT-2's (all weights N(0, 0.02)): token
    embeddings N(0, 1), projections and biases U(+-1/sqrt(fan_in)), positions N(0, 0.02).
    With GPT-2's small initialisation the induction circuit stays on its plateau for
    thousands of steps; with this one the phase change comes within the CPU budget."""
    with torch.no_grad():
        hf.transformer.wte.weight.normal_(0.0, 1.0)
        hf.transformer.wpe.weight.normal_(0.0, 0.02)
        bound = hf.config.n_embd ** -0.5
        for block in hf.transformer.h:
            for proj in (block.attn.c_attn, block.attn.c_proj):
                proj.weight.uniform_(-bound, bound)
                proj.bias.uniform_(-bound, bound)
        hf.lm_head.weight.uniform_(-bound, bound)


def label_attention(pattern: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Attention from each query to its answer in the context (``batch["label_pos"]``),
    averaged over queries and sequences ``[head]``: an ideal induction ("match") head of
    :class:`ICLTask`, attending to the label of the query's twin, or an ideal name mover of
    :class:`NameTask`, attending to the indirect object, scores 1.

    ``pattern [batch, head, q, k]``; ``batch`` from the task's ``sample``."""
    rows = torch.arange(pattern.shape[0])[:, None]
    picked = pattern.permute(0, 2, 3, 1)[rows, batch["query_pos"], batch["label_pos"]]   # [batch, query, head]
    return picked.mean((0, 1))


# --- clamping ("artificial optogenetics") ---------------------------------------------------
@contextmanager
def clamped(model: Model, kind: str | None, batch: dict[str, torch.Tensor], *, head: int = 0) -> Iterator[None]:
    """Forward passes on ``batch`` inside the block run with sub-circuit ``kind`` (one of
    :data:`CLAMPS`, or None for nothing) fixed to its ideal in head ``head``.

    A pattern clamp replaces the head's output before the output projection by
    ``ideal_pattern @ v`` (values carry no rotary embedding, so that is exactly the head with
    its pattern fixed); the head's own query-key weights then get no gradient. The copy clamp
    zeroes the head's output at the query and adds ``sum_k A[q, k] * sqrt(d) * u(token_k)``,
    with ``u`` the unit unembedding direction of the attended token, so the pattern still has
    to be learned but whatever it attends to is copied perfectly."""
    if kind is None:
        yield
        return
    if kind not in CLAMPS:
        raise ValueError(f"Unknown clamp {kind!r}; choose one of {', '.join(CLAMPS)} or None.")
    a = model.anatomy
    layer = 0 if kind == "prev" else a.n_layers - 1
    if not 0 <= head < a.n_heads:
        raise IndexError(f"Clamp head {head} is out of range: the model has {a.n_heads} heads per layer.")
    ids, label_pos, qpos = batch["ids"], batch["label_pos"], batch["query_pos"]
    n, T = ids.shape
    hooks, store = [], {}

    v_point = a.qkv_point("v", layer)

    def keep_v(module, args, out):
        store["v"] = v_point.read(out)[:, :, head]

    def ideal_pattern() -> torch.Tensor:
        if kind == "prev":
            prev = torch.zeros(T, T)
            prev[0, 0] = 1.0                                   # the first token can only see itself
            prev[torch.arange(1, T), torch.arange(T - 1)] = 1.0
            return prev.expand(n, T, T)
        return torch.nn.functional.one_hot(label_pos, T).float()              # query rows only

    def set_z(module, args):
        z = args[0].view(n, T, a.n_heads, a.d_head).clone()
        if kind == "copy":
            z[:, qpos, head] = 0.0
        elif kind == "prev":
            z[:, :, head] = ideal_pattern() @ store["v"]
        else:
            z[:, qpos, head] = ideal_pattern() @ store["v"]
        return (z.view(args[0].shape),) + tuple(args[1:])

    def add_copy(module, args, out):
        attn_out, weights = out[0], out[1]
        u = a.W_U.detach().T[ids]                                  # [n, T, d_model]
        u = u / u.norm(dim=-1, keepdim=True) * a.d_model ** 0.5
        ideal = weights[:, head, qpos] @ u                          # [n, query, d_model]
        attn_out = attn_out.clone()
        attn_out[:, qpos] = attn_out[:, qpos] + ideal
        return (attn_out,) + tuple(out[1:])

    try:
        if kind == "copy":
            hooks.append(a.o_proj(layer).register_forward_pre_hook(set_z))
            hooks.append(a.attn(layer).register_forward_hook(add_copy))
        else:
            hooks.append(v_point.module.register_forward_hook(keep_v))
            hooks.append(a.o_proj(layer).register_forward_pre_hook(set_z))
        yield
    finally:
        for h in hooks:
            h.remove()


# --- training ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSpec:
    """Everything a training run depends on (the cache key). ``clamp`` is one of
    :data:`CLAMPS` or None; ``eval_every`` is the checkpoint interval in steps."""

    task: ICLTask | NameTask = field(default_factory=ICLTask)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    steps: int = 1200
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0
    clamp: str | None = None
    eval_every: int = 25
    n_eval: int = 512

    def __post_init__(self):
        if self.clamp is not None and self.clamp not in CLAMPS:
            raise ValueError(f"Unknown clamp {self.clamp!r}; choose one of {', '.join(CLAMPS)} or None.")
        if self.n_layers < 2 and self.clamp in ("match", "copy"):
            raise ValueError("Match and copy clamps act on the last layer's head, which needs a layer "
                             "before it for the previous-token head: use n_layers >= 2.")
        if not isinstance(self.task, TASKS):
            raise TypeError(f"TrainSpec.task must be an ICLTask or a NameTask, not {type(self.task).__name__}.")
        if self.steps < self.eval_every or self.eval_every < 1:
            raise ValueError(f"Need 1 <= eval_every ({self.eval_every}) <= steps ({self.steps}).")

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.task.seq_len


def held_out_batch(spec: TrainSpec) -> dict[str, torch.Tensor]:
    """The held-out batch every checkpoint of a run from ``spec`` is scored on (its own seed
    stream, apart from the training batches)."""
    return spec.task.sample(spec.n_eval, torch.Generator().manual_seed(10_000 + spec.seed))


def evaluate(model: Model, batch: dict[str, torch.Tensor], *, clamp: str | None = None) -> dict[str, torch.Tensor]:
    """Accuracy and loss at the queries, and every head's previous-token score and label
    attention (:func:`label_attention`) ``[layer, head]`` on ``batch`` (patterns as the heads
    compute them, also under a clamp)."""
    a = model.anatomy
    with clamped(model, clamp, batch):
        run = model.run(batch["ids"], cache="attn_pattern")
    logits = run.logits[:, batch["query_pos"]].float().flatten(0, 1)
    target = batch["target"].flatten()
    pats = [run.cache["attn_pattern", l].float() for l in range(a.n_layers)]
    return {
        "acc": (logits.argmax(-1) == target).float().mean(),
        "loss": torch.nn.functional.cross_entropy(logits, target),
        "prev": torch.stack([previous_token_score(p) for p in pats]),
        "match": torch.stack([label_attention(p, batch) for p in pats]),
    }


def _progress(total: int, desc: str):
    from tqdm.std import tqdm
    return tqdm(total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False)


def _train(spec: TrainSpec) -> dict:
    model = attention_only_model(spec.task, d_model=spec.d_model, n_layers=spec.n_layers,
                                 n_heads=spec.n_heads, seed=spec.seed)
    hf = model.hf
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(spec.seed)
    held_out = held_out_batch(spec)
    losses, ckpts = [], {"step": [], "acc": [], "loss": [], "prev": [], "match": [], "state": []}

    def checkpoint(step: int) -> None:
        hf.eval()
        with torch.no_grad():
            m = evaluate(model, held_out, clamp=spec.clamp)
        for k in ("acc", "loss", "prev", "match"):
            ckpts[k].append(m[k])
        ckpts["step"].append(step)
        ckpts["state"].append({k: v.detach().clone() for k, v in hf.state_dict().items()})

    checkpoint(0)
    with _progress(spec.steps, f"training {model.name}") as bar:
        for step in range(1, spec.steps + 1):
            hf.train()
            batch = spec.task.sample(spec.batch, gen)
            with clamped(model, spec.clamp, batch):
                logits = hf(input_ids=batch["ids"], use_cache=False).logits[:, batch["query_pos"]]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target"].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % spec.eval_every == 0:
                checkpoint(step)
            bar.update(1)
    hf.eval()
    out = {"train_loss": torch.tensor(losses)}
    for k in ("step", "acc", "loss"):
        out[k] = torch.tensor(ckpts[k])
    out["prev"], out["match"] = torch.stack(ckpts["prev"]), torch.stack(ckpts["match"])
    out["states"] = ckpts["state"]
    return out


def train_icl(spec: TrainSpec = TrainSpec()) -> dict:
    """Train (or load from the cache) one run on ``spec.task``, whichever task it is (the name
    is the first task's): ``train_loss [steps]``; per checkpoint ``step``,
    held-out ``acc`` and ``loss``, ``prev`` and ``match`` scores ``[ckpt, layer, head]`` and the
    weights ``states`` (state dicts; see :func:`load_checkpoint`)."""
    key = {"format": 1, **asdict(spec)}
    return cached("toy", f"{spec.task.kind}-{spec.n_layers}L-d{spec.d_model}", key, lambda: _train(spec))


def load_checkpoint(spec: TrainSpec, run: dict, index: int) -> Model:
    """The model of ``run`` (trained from ``spec``) at checkpoint ``index`` (negative counts from the end)."""
    states = run["states"]
    if not -len(states) <= index < len(states):
        raise IndexError(f"Checkpoint {index} is out of range: the run has {len(states)} checkpoints.")
    model = attention_only_model(spec.task, d_model=spec.d_model, n_layers=spec.n_layers,
                                 n_heads=spec.n_heads, seed=spec.seed)
    model.hf.load_state_dict(states[index])
    return model


def steps_to(steps: torch.Tensor, values: torch.Tensor, threshold: float) -> int | None:
    """The first checkpoint step at which ``values`` reach ``threshold`` (None if never)."""
    hit = (values >= threshold).nonzero()
    return int(steps[hit[0, 0]]) if len(hit) else None


def mean_ablate_heads(model: Model, batch: dict[str, torch.Tensor], heads: Sequence[tuple[int, int]]) -> list:
    """Edits that replace the outputs (``attn_z``) of ``heads`` by their mean over ``batch``
    at each position, so a head keeps its average contribution but loses its information."""
    return _mean_edits(_mean_z(model, batch), heads)


def _mean_z(model: Model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every layer's head outputs averaged over ``batch`` ``[1, pos, head, d_head]``."""
    run = model.run(batch["ids"], cache="attn_z")
    return [run.cache["attn_z", layer].mean(0, keepdim=True) for layer in range(model.anatomy.n_layers)]


def _mean_edits(means: list[torch.Tensor], heads: Sequence[tuple[int, int]]) -> list:
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(int(layer), []).append(int(h))

    def make(layer: int, hs: list[int]):
        mean = means[layer]
        idx = torch.tensor(hs)

        def fn(z: torch.Tensor) -> torch.Tensor:
            out = z.clone()
            out[:, :, idx] = mean[:, :, idx].expand(z.shape[0], -1, -1, -1)
            return out
        return fn

    return [edit(("attn_z", layer), make(layer, hs)) for layer, hs in by_layer.items()]


def accuracy(model: Model, batch: dict[str, torch.Tensor], edits: Sequence = ()) -> float:
    """Accuracy at the queries of ``batch``, with ``edits`` applied (e.g. :func:`mean_ablate_heads`)."""
    logits = model.run(batch["ids"], edits=edits).logits[:, batch["query_pos"]]
    return float((logits.argmax(-1) == batch["target"]).float().mean())


def circuit_size(model: Model, batch: dict[str, torch.Tensor], keep: float = 0.9) -> tuple[int, list[tuple[int, int]]]:
    """The fewest heads that keep ``keep`` of the model's accuracy when every other head is
    mean-ablated, and the heads in order of importance.

    Heads are ranked by how much accuracy mean-ablating each one alone costs; the circuit is
    the shortest prefix of that ranking whose heads, kept while all others are ablated,
    reach ``keep`` times the full accuracy. A greedy estimate (an upper bound on the
    smallest such set), in the spirit of the circuit sizes of Tigges et al. (2024)."""
    a = model.anatomy
    heads = [(l, h) for l in range(a.n_layers) for h in range(a.n_heads)]
    full, means = accuracy(model, batch), _mean_z(model, batch)        # the means once, for every ablation
    cost = {hd: full - accuracy(model, batch, _mean_edits(means, [hd])) for hd in heads}
    order = sorted(heads, key=lambda hd: -cost[hd])
    for k in range(1, len(order) + 1):
        if accuracy(model, batch, _mean_edits(means, order[k:])) >= keep * full:
            return k, order
    return len(order), order
