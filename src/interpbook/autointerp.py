"""Describing features automatically, and scoring the descriptions, offline.

Automated interpretability (Bills et al., 2023; Paulo et al., 2024) explains a feature
from its top-activating contexts and scores the explanation by how well it predicts the
feature's behaviour on new text. Output-centric descriptions (Gur-Arieh et al., 2025)
explain a feature by what it *does* to the model's predictions instead. This module
implements both with explanations a small model can produce and check without a strong
LLM: an explanation is a **set of tokens**.

Explainers (each returns token ids per feature):

- :func:`max_act` (MaxAct, input-centric): the most frequent tokens at the feature's
  highest activations;
- :func:`vocab_proj` (VocabProj): the feature's output direction read through the
  norm-folded unembedding;
- :func:`token_change` (TokenChange): the tokens whose log-probability rises most when the
  direction is added to the residual stream (:func:`steering_effect`).

Scorers (each returns one number per feature, 0.5 is chance unless said otherwise):

- :func:`detection` and :func:`fuzzing`: a rule-based judge ("the text contains a token of
  the set" / "the highlighted token is in the set") on activating vs non-activating
  held-out contexts, balanced accuracy;
- :func:`surprisal`: does prefixing the explanation lower the model's loss on activating
  contexts more than on others (AUROC);
- :func:`embedding`: is the explanation's embedding (the model's mean-pooled hidden
  state) closer to activating contexts (AUROC);
- :func:`output_score` (intervention): does the explanation's tokens gain more under the
  feature's own steering than under other features' steering (AUROC over distractors);
- :func:`judge_detection`: the same detection task put to the model itself as a yes/no
  question (to show how a 135M judge does).

The shared SAE of the week-7 page comes from :func:`interpbook.sae.shared_sae` with the same data and
configuration, so it is read from the cache instead of retrained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lm import Model
from .sae import sae_layer
from .snmf import auroc
from .tracing import edit

__all__ = [
    "Contexts", "contexts", "thresholds",
    "max_act", "vocab_proj", "output_directions", "steering_effect", "token_change", "union",
    "detection", "fuzzing", "output_score", "surprisal", "embedding", "judge_detection", "describe",
]

# --- held-out contexts ------------------------------------------------------------------------
@dataclass
class Contexts:
    """Held-out text cut into short contexts, with every feature's activations on them.

    ``ids [n_contexts, length]`` token ids; ``acts [n_contexts, length, features]``."""

    ids: torch.Tensor
    acts: torch.Tensor

    def peak(self) -> torch.Tensor:
        """Each context's largest activation per feature ``[n_contexts, features]``."""
        return self.acts.max(1).values


def contexts(windows: torch.Tensor, acts: torch.Tensor, length: int = 16, *, skip: int = 1) -> Contexts:
    """Cut ``windows [n, seq_len]`` (positions ``>= skip``) into contexts of ``length``
    tokens; ``acts [n * (seq_len - skip), features]`` is the layout of
    :func:`interpbook.sae.collect` (a remainder shorter than ``length`` is dropped)."""
    n, seq_len = windows.shape
    per = seq_len - skip
    if acts.dim() != 2 or acts.shape[0] != n * per:
        raise ValueError(f"acts must be [n_windows * (seq_len - skip), features] = [{n * per}, ...]; "
                         f"got {tuple(acts.shape)}.")
    if not 1 <= length <= per:
        raise ValueError(f"length must be in 1..{per}; got {length}.")
    m = per // length
    ids = windows[:, skip:skip + m * length].reshape(n * m, length)
    a = acts.view(n, per, -1)[:, :m * length].reshape(n * m, length, -1)
    return Contexts(ids, a.float())


def _split_labels(peak: torch.Tensor, threshold: torch.Tensor, n: int, generator: torch.Generator
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per feature: the ``n`` contexts with the highest peaks above ``threshold``
    (activating) and ``n`` random contexts whose peak stays below it."""
    out = []
    for f in range(peak.shape[1]):
        above = (peak[:, f] > threshold[f]).nonzero()[:, 0]
        below = (peak[:, f] <= threshold[f]).nonzero()[:, 0]
        pos = above[peak[above, f].argsort(descending=True)[:n]]
        neg = below[torch.randperm(len(below), generator=generator)[:n]]
        out.append((pos, neg))
    return out


def thresholds(explain: Contexts, fraction: float = 0.5, top: int = 20) -> torch.Tensor:
    """Where a feature "fires": ``fraction`` of the mean of its ``top`` activations on the
    explanation contexts ``[features]`` (at least 0)."""
    flat = explain.acts.flatten(0, 1)
    top = min(top, len(flat))
    return (fraction * flat.topk(top, dim=0).values.mean(0)).clamp_min(0)


def _balanced_accuracy(pred_pos: torch.Tensor, pred_neg: torch.Tensor) -> float:
    return 0.5 * (float(pred_pos.float().mean()) + float((~pred_neg).float().mean()))


def _check_explanations(explanations, n_features: int) -> None:
    if len(explanations) != n_features:
        raise ValueError(f"Need one explanation per feature: {n_features}; got {len(explanations)}.")


# --- explainers ---------------------------------------------------------------------------------
def max_act(explain: Contexts, k: int = 5, top: int = 20) -> list[list[int]]:
    """MaxAct: the ``k`` most frequent token ids among each feature's ``top`` highest
    activations on ``explain`` (ties broken by the higher activation)."""
    if k < 1 or top < 1:
        raise ValueError(f"k and top must be >= 1; got k={k}, top={top}.")
    flat_ids = explain.ids.flatten()
    flat = explain.acts.flatten(0, 1)
    out = []
    for f in range(flat.shape[1]):
        values, idx = flat[:, f].topk(min(top, len(flat_ids)))
        tokens = flat_ids[idx[values > 0]]
        counts: dict[int, int] = {}
        for t in tokens.tolist():          # in order of activation: first seen = stronger
            counts[t] = counts.get(t, 0) + 1
        out.append(sorted(counts, key=lambda t: -counts[t])[:k])
    return out


def output_directions(model: Model, layer: int, neurons: torch.Tensor, sign: torch.Tensor | None = None) -> torch.Tensor:
    """What ``neurons`` of ``layer``'s MLP write into the residual stream ``[n, d_model]``:
    rows of ``W_out`` times the gain of the norm after the MLP (Gemma's post-feed-forward
    norm; none for Llama), times ``sign`` (``-1`` for neurons read on their negative side)."""
    a = model.anatomy
    with torch.no_grad():
        rows = a.W_out(layer)[neurons.long()].float()
        rows = rows * a.norm_gain(a.post_mlp_norm(layer)).float()
    return rows if sign is None else rows * sign[:, None].float()


def vocab_proj(model: Model, directions: torch.Tensor, k: int = 5) -> list[list[int]]:
    """VocabProj: the ``k`` tokens each direction ``[n, d_model]`` promotes most when read
    through the norm-folded unembedding (:meth:`interpbook.anatomy.Anatomy.folded_W_U`)."""
    if directions.dim() != 2 or directions.shape[1] != model.d_model:
        raise ValueError(f"directions must be [n, d_model={model.d_model}]; got {tuple(directions.shape)}.")
    U = model.anatomy.folded_W_U().float()
    return (directions.float().to(U.device) @ U).topk(k, dim=-1).indices.tolist()


@torch.no_grad()
def steering_effect(model: Model, site: tuple[str, int], directions: torch.Tensor, prompts: torch.Tensor,
                    norm: float, *, skip: int = 1, batch_size: int = 8) -> torch.Tensor:
    """Mean change of every token's next-token log-probability ``[n, vocab]`` when each
    direction (rescaled to length ``norm``) is added to ``site`` at positions ``>= skip`` of
    ``prompts [batch, seq]``, averaged over those positions.

    ``batch_size`` directions share one forward pass (each on its own copy of the prompts):
    a small model on a CPU reads all its weights once per pass, whatever the batch."""
    if directions.dim() != 2 or directions.shape[1] != model.d_model:
        raise ValueError(f"directions must be [n, d_model={model.d_model}]; got {tuple(directions.shape)}.")
    if prompts.dim() != 2 or not 0 <= skip < prompts.shape[1]:
        raise ValueError(f"prompts must be [batch, seq] with seq > skip={skip}; got {tuple(prompts.shape)}.")
    unit = directions.float() / directions.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n_prompts = len(prompts)

    def mean_logprobs(ids: torch.Tensor, edits=()) -> torch.Tensor:
        logits = model.run(ids, edits=edits).logits[:, skip:].float()
        return logits.log_softmax(-1).view(-1, n_prompts, *logits.shape[1:]).mean((1, 2))

    clean = mean_logprobs(prompts)[0]
    out = []
    for group in unit.split(batch_size):
        vectors = (norm * group).repeat_interleave(n_prompts, 0).to(model.device)     # one per row

        def add(x, v=vectors):
            return torch.cat([x[:, :skip], x[:, skip:] + v[:, None].to(x)], 1)

        out.append(mean_logprobs(prompts.repeat(len(group), 1), [edit(site, add)]) - clean)
    return torch.cat(out).cpu()


def token_change(effect: torch.Tensor, k: int = 5) -> list[list[int]]:
    """TokenChange: the ``k`` tokens whose log-probability rises most under steering
    (rows of :func:`steering_effect`)."""
    return effect.topk(k, dim=-1).indices.tolist()


def union(*explanations: list[list[int]]) -> list[list[int]]:
    """Ensemble: per feature, the tokens of every explanation (first occurrence order)."""
    return [list(dict.fromkeys(t for e in parts for t in e)) for parts in zip(*explanations)]


# --- scorers ------------------------------------------------------------------------------------
def detection(explanations: list[list[int]], score: Contexts, threshold: torch.Tensor, n: int = 20, *,
              seed: int = 0) -> torch.Tensor:
    """Detection with a rule-based judge: a context "matches" the explanation when it
    contains one of its tokens. Balanced accuracy ``[features]`` on the ``n`` strongest
    activating and ``n`` random non-activating contexts of ``score`` (features with no
    activating context get NaN)."""
    _check_explanations(explanations, score.acts.shape[-1])
    g = torch.Generator().manual_seed(seed)
    out = []
    for expl, (pos, neg) in zip(explanations, _split_labels(score.peak(), threshold, n, g)):
        if len(pos) == 0 or len(neg) == 0:
            out.append(float("nan"))
            continue
        hit = torch.isin(score.ids, torch.tensor(expl, dtype=score.ids.dtype)).any(1)
        out.append(_balanced_accuracy(hit[pos], hit[neg]))
    return torch.tensor(out)


def fuzzing(explanations: list[list[int]], score: Contexts, threshold: torch.Tensor, n: int = 20, *,
            seed: int = 0) -> torch.Tensor:
    """Fuzzing with a rule-based judge: in each of the ``n`` strongest activating contexts,
    highlight the most active token (correctly marked) or a random token that does not fire
    (mis-marked); the judge accepts a highlight when the token is in the explanation.
    Balanced accuracy ``[features]`` (NaN without activating contexts)."""
    _check_explanations(explanations, score.acts.shape[-1])
    g = torch.Generator().manual_seed(seed)
    out = []
    for f, (expl, (pos, _)) in enumerate(zip(explanations, _split_labels(score.peak(), threshold, n, g))):
        acts, ids = score.acts[pos, :, f], score.ids[pos]
        quiet = acts <= threshold[f]
        rows = quiet.any(1).nonzero()[:, 0]
        if len(rows) == 0:
            out.append(float("nan"))
            continue
        fired = ids[rows, acts[rows].argmax(1)]
        noise = torch.rand(quiet[rows].shape, generator=g) * quiet[rows]
        wrong = ids[rows, noise.argmax(1)]
        tokens = torch.tensor(expl, dtype=ids.dtype)
        out.append(_balanced_accuracy(torch.isin(fired, tokens), torch.isin(wrong, tokens)))
    return torch.tensor(out)


def output_score(explanations: list[list[int]], effect: torch.Tensor) -> torch.Tensor:
    """Intervention (output) score ``[features]``: how well an explanation picks out its
    own feature's steering. For feature ``f`` it is the AUROC of "mean log-probability
    gain of ``f``'s explanation tokens" under ``f``'s own steering against the same gain
    under every other feature's steering (rows of :func:`steering_effect` on held-out
    prompts): 1 when the explanation's tokens rise more under its own feature than under
    any other, 0.5 at chance."""
    if effect.dim() != 2 or effect.shape[0] < 2:
        raise ValueError(f"effect must be [features >= 2, vocab]; got {tuple(effect.shape)}.")
    _check_explanations(explanations, effect.shape[0])
    out = []
    for f, expl in enumerate(explanations):
        gain = effect[:, torch.tensor(expl, dtype=torch.long)].mean(1)       # [features]
        others = torch.cat([gain[:f], gain[f + 1:]])
        out.append(float((gain[f] > others).float().mean() + 0.5 * (gain[f] == others).float().mean()))
    return torch.tensor(out)


def _text(model: Model, explanation: list[int]) -> str:
    """An explanation's tokens as a short comma-separated list of words."""
    return ", ".join(model.tokenizer.decode([t]).strip() for t in explanation)


@torch.no_grad()
def _losses(model: Model, prefix: list[int], contexts_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token loss on each context's tokens after the first, with ``prefix`` ids
    before (in batches, so a large vocabulary's logits stay small)."""
    out = []
    for chunk in contexts_ids.split(batch_size):
        ids = torch.cat([torch.tensor(prefix, dtype=chunk.dtype).expand(len(chunk), -1), chunk], 1)
        logits = model.run(ids).logits[:, len(prefix):-1].float()
        targets = chunk[:, 1:].to(logits.device)
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1).cpu())
    return torch.cat(out)


def surprisal(model: Model, explanations: list[list[int]], score: Contexts, threshold: torch.Tensor, n: int = 10,
              *, seed: int = 0) -> torch.Tensor:
    """Surprisal scoring with ``model`` as the base model: prefix each context with
    ``"Text about: <token>, <token>."`` and measure how much the prefix lowers the loss; AUROC
    ``[features]`` of that drop on ``n`` activating vs ``n`` non-activating contexts (NaN
    when either is missing). The loss drop is measured against a neutral prefix of the
    same form (``"Text about: anything."``) so prefix length alone does not count."""
    _check_explanations(explanations, score.acts.shape[-1])
    start = model.tokenizer("")["input_ids"]

    def prefix(words: str) -> list[int]:
        return start + model.tokenizer(f"Text about: {words}.\n", add_special_tokens=False)["input_ids"]

    g = torch.Generator().manual_seed(seed)
    chosen = _split_labels(score.peak(), threshold, n, g)
    used = torch.cat([torch.cat(pair) for pair in chosen]).unique()
    neutral = torch.full((len(score.ids),), float("nan"))
    if len(used):
        neutral[used] = _losses(model, prefix("anything"), score.ids[used])
    out = []
    for expl, (pos, neg) in zip(explanations, chosen):
        if len(pos) == 0 or len(neg) == 0:
            out.append(float("nan"))
            continue
        rows = torch.cat([pos, neg])
        drop = neutral[rows] - _losses(model, prefix(_text(model, expl)), score.ids[rows])
        out.append(float(auroc(drop, torch.arange(len(rows)) < len(pos))))
    return torch.tensor(out)


@torch.no_grad()
def _embed(model: Model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Mean-pooled residual stream after ``layer`` ``[n, d_model]``, unit length; the
    tokenizer's start of text (a BOS, or nothing) is put before ``ids`` and left out of the mean."""
    start = model.tokenizer("")["input_ids"]
    ids = torch.cat([torch.tensor(start, dtype=ids.dtype).expand(len(ids), -1), ids], 1)
    h = model.run(ids, cache=[("resid_post", layer)], stop_early=True).cache["resid_post", layer].float()
    v = h[:, len(start):].mean(1).cpu()
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def embedding(model: Model, explanations: list[list[int]], score: Contexts, threshold: torch.Tensor, n: int = 20,
              *, layer: int | None = None, seed: int = 0) -> torch.Tensor:
    """Embedding scoring with ``model`` as the embedder (mean-pooled residual stream after
    ``layer``, default :func:`~interpbook.sae.sae_layer`): AUROC ``[features]`` of the cosine
    between the explanation (its tokens as text) and ``n`` activating vs ``n`` non-activating
    contexts."""
    _check_explanations(explanations, score.acts.shape[-1])
    layer = sae_layer(model) if layer is None else layer
    g = torch.Generator().manual_seed(seed)
    ctx = _embed(model, score.ids, layer)
    out = []
    for expl, (pos, neg) in zip(explanations, _split_labels(score.peak(), threshold, n, g)):
        if len(pos) == 0 or len(neg) == 0:
            out.append(float("nan"))
            continue
        text = model.tokenizer(" " + " ".join(model.tokenizer.decode([t]).strip() for t in expl),
                               add_special_tokens=False)["input_ids"]
        e = _embed(model, torch.tensor([text]), layer)[0]
        sims = ctx[torch.cat([pos, neg])] @ e
        out.append(float(auroc(sims, torch.arange(len(sims)) < len(pos))))
    return torch.tensor(out)


# --- the model itself as explainer and judge ----------------------------------------------------
def _shown(model: Model, ids: torch.Tensor, mark: int | None = None) -> str:
    pieces = [model.tokenizer.decode([int(t)]) for t in ids]
    if mark is not None:
        pieces[mark] = f"[{pieces[mark]}]"
    return "".join(pieces).replace("\n", " ")


def describe(model: Model, explain: Contexts, feature: int, n: int = 4, max_new_tokens: int = 8) -> str:
    """Ask ``model`` for a short description of ``feature`` from its ``n`` top contexts
    (the most active token bracketed), greedy; the kind of explanation Bills et al. get
    from GPT-4."""
    peak = explain.peak()[:, feature]
    lines = []
    for c in peak.argsort(descending=True)[:n].tolist():
        lines.append("- " + _shown(model, explain.ids[c], int(explain.acts[c, :, feature].argmax())))
    prompt = model.chat_prompt("These texts share a pattern on the [bracketed] word:\n" + "\n".join(lines)
                               + "\nIn a few words, what is the pattern?", "The pattern is")
    return model.generate(prompt, max_new_tokens=max_new_tokens).split("\n")[0].strip()


@torch.no_grad()
def judge_detection(model: Model, description: str, texts: torch.Tensor) -> torch.Tensor:
    """The model as a yes/no judge: log-odds of "Yes" over "No" ``[n]`` that each context
    of ``texts [n, length]`` matches ``description``."""
    prompts = [model.chat_prompt(f"Description: {description}\nText: {_shown(model, t)}\n"
                                 "Does the text match the description? Answer Yes or No.", "Answer:")
               for t in texts]
    yes, no = model.token_id(" Yes"), model.token_id(" No")
    logits = torch.cat([model.logits(prompts[i:i + 4]).float() for i in range(0, len(prompts), 4)])
    return (logits[:, yes] - logits[:, no]).cpu()
