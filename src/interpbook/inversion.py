"""Language model inversion at small scale: recover a prompt from the next-token distribution.

Morris et al. (2024) show that the probability vector a model outputs after a hidden
prompt leaks that prompt: a T5 inverter trained on 2M prompts recovers Llama-2 7B's
prompts with token F1 78 and 27% exactly. This module reproduces the claim on a scale that
runs in seconds on a CPU:

1. :func:`make_prompts` writes a few thousand prompts from templates with slots (names,
   places, objects, ...) and splits them into train and held-out test prompts;
2. :func:`collect_outputs` runs the model once per batch and keeps, for each prompt, a
   compact view of the next-token log-probabilities (a fixed random projection of the full
   vector, or the top-k) together with the model's greedy continuation text (the baseline's
   input);
3. :class:`Inverter` (an MLP with one softmax head per prompt position, right-aligned)
   is trained on the train prompts by :func:`train_inverter`;
4. :func:`inversion_scores` reports token precision / recall / F1 (bag-of-tokens overlap,
   as in the paper) and exact recovery on the held-out prompts.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .lm import Model

NAMES = ["Alice", "Bob", "Maria", "David", "Sarah", "John", "Emma", "James", "Anna", "Peter",
         "Laura", "Tom", "Julia", "Mark", "Lucy", "Daniel"]
PLACES = ["Paris", "London", "Tokyo", "Berlin", "Rome", "Madrid", "Cairo", "Sydney", "Moscow",
          "Toronto", "Chicago", "Boston", "Dublin", "Vienna", "Athens", "Lisbon"]
OBJECTS = ["book", "car", "dog", "cat", "house", "phone", "guitar", "bicycle", "camera",
           "letter", "painting", "watch", "chair", "garden", "boat", "computer"]
ADJECTIVES = ["red", "old", "new", "small", "big", "beautiful", "broken", "expensive",
              "green", "strange", "famous", "wooden"]
ACTIVITIES = ["cooking", "swimming", "painting", "reading", "running", "singing", "dancing",
              "writing", "fishing", "hiking", "skiing", "gardening"]
TEMPLATES = [
    "{name} lives in {place} and loves {activity}",
    "My {adjective} {object} is in {place}",
    "{name} bought a {adjective} {object} in {place}",
    "The {object} that {name} found was {adjective}",
    "In {place}, {name} enjoys {activity} with a {object}",
    "{name} went to {place} to try {activity}",
]
"""The generator's templates; every slot is filled from the word lists above."""

SLOTS = {"name": NAMES, "place": PLACES, "object": OBJECTS, "adjective": ADJECTIVES, "activity": ACTIVITIES}

__all__ = ["TEMPLATES", "SLOTS", "PromptSet", "make_prompts", "ModelOutputs", "collect_outputs", "Inverter",
           "Vocabulary", "bag_of_tokens", "train_inverter", "predict_tokens", "inversion_scores",
           "position_accuracy", "majority_baseline"]


@dataclass
class PromptSet:
    """Prompts split into ``train`` and held-out ``test`` (no prompt is in both)."""

    train: list[str]
    test: list[str]


def make_prompts(n: int = 3000, test_fraction: float = 0.2, seed: int = 0) -> PromptSet:
    """``n`` distinct prompts from :data:`TEMPLATES`, shuffled and split (seeded)."""
    rng = random.Random(seed)
    pool = []
    for template in TEMPLATES:
        keys = [k for k in SLOTS if "{" + k + "}" in template]
        combos = list(itertools.product(*(SLOTS[k] for k in keys)))
        rng.shuffle(combos)
        pool.append([template.format(**dict(zip(keys, c))) for c in combos])
    per = -(-n // len(TEMPLATES))
    prompts = sorted({p for group in pool for p in group[:per]})
    rng.shuffle(prompts)
    prompts = prompts[:n]
    n_test = int(round(len(prompts) * test_fraction))
    return PromptSet(train=prompts[n_test:], test=prompts[:n_test])


@dataclass
class ModelOutputs:
    """What a user of the model's API sees after each prompt.

    ``features [n, d]``: the compact view of the next-token log-probabilities;
    ``top1 [n]``: the most likely next token; ``continuation``: greedy continuation ids
    ``[n, k]``; ``prompt_ids``: each prompt's token ids (the inverter's targets).
    """

    features: torch.Tensor
    top1: torch.Tensor
    continuation: torch.Tensor
    prompt_ids: list[list[int]]


def _projection(d_vocab: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_vocab, dim, generator=g) / dim ** 0.5


@torch.no_grad()
def collect_outputs(model: Model, prompts: list[str], *, view: str = "projection", dim: int = 1024,
                    top_k: int = 64, floor: float = -20.0, continuation_tokens: int = 8,
                    batch_size: int = 128, seed: int = 0, progress: bool = False) -> ModelOutputs:
    """Run ``model`` on every prompt; keep a compact view of its next-token distribution.

    ``view="projection"``: the log-probability vector, clipped at ``floor`` and centred,
    times a fixed random Gaussian matrix ``[vocab, dim]`` (a Johnson-Lindenstrauss sketch of
    the whole vector). ``view="topk"``: the ``top_k`` log-probabilities scattered into a
    sparse vocab-sized vector is too large, so the features are the top-k log-probs
    followed by the ids as a multi-hot sketch through the same projection.
    One greedy generation per batch gives both the distribution (its first step) and the
    continuation text of ``continuation_tokens`` tokens.
    """
    if view not in ("projection", "topk"):
        raise ValueError(f"view must be 'projection' or 'topk', not {view!r}.")
    proj = _projection(model.d_vocab, dim, seed).to(model.device)
    feats, top1, conts, ids_out = [], [], [], []
    batches = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="model outputs")
    for start in batches:
        chunk = prompts[start:start + batch_size]
        enc = model.tokenize(chunk)
        out = model.hf.generate(**enc, max_new_tokens=continuation_tokens, do_sample=False,
                                output_logits=True, return_dict_in_generate=True,
                                pad_token_id=model.tokenizer.pad_token_id)
        logp = torch.log_softmax(out.logits[0].float(), dim=-1)
        if view == "projection":
            x = logp.clamp(min=floor)
            feats.append((x - x.mean(-1, keepdim=True)) @ proj)
        else:
            vals, idx = logp.topk(top_k, dim=-1)
            hot = torch.zeros_like(logp).scatter_(1, idx, vals.clamp(min=floor) - floor)
            feats.append(torch.cat([vals, hot @ proj], dim=-1))
        top1.append(logp.argmax(-1))
        conts.append(out.sequences[:, enc["input_ids"].shape[1]:])
        for row, mask in zip(enc["input_ids"], enc["attention_mask"]):
            ids_out.append(row[mask.bool()].tolist())
    n_cont = max(c.shape[1] for c in conts)
    pad = model.tokenizer.pad_token_id
    conts = [torch.nn.functional.pad(c, (0, n_cont - c.shape[1]), value=pad) for c in conts]
    return ModelOutputs(torch.cat(feats).cpu(), torch.cat(top1).cpu(), torch.cat(conts).cpu(), ids_out)


class Inverter(nn.Module):
    """Features ``[n, d_in]`` -> logits ``[n, length, n_classes]``, one softmax per prompt
    position counted from the end (position ``length - 1`` is the prompt's last token)."""

    def __init__(self, d_in: int, length: int, n_classes: int, hidden: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.length, self.n_classes = length, n_classes
        self.net = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, length * n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, length, n_classes]`` for features ``x [n, d_in]``."""
        return self.net(x).view(-1, self.length, self.n_classes)


@dataclass
class Vocabulary:
    """The inverter's output classes: class 0 is padding, the rest are token ids."""

    ids: list[int]
    length: int

    def __post_init__(self):
        self.index = {t: i + 1 for i, t in enumerate(self.ids)}

    @classmethod
    def from_prompts(cls, prompt_ids: list[list[int]]) -> "Vocabulary":
        return cls(sorted({t for p in prompt_ids for t in p}), max(len(p) for p in prompt_ids))

    def targets(self, prompt_ids: list[list[int]]) -> torch.Tensor:
        """Right-aligned class targets ``[n, length]`` (0 = padding, -100 = unknown token)."""
        y = torch.zeros(len(prompt_ids), self.length, dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            p = p[-self.length:]
            y[i, self.length - len(p):] = torch.tensor([self.index.get(t, -100) for t in p])
        return y

    def decode(self, classes: torch.Tensor) -> list[list[int]]:
        return [[self.ids[c - 1] for c in row.tolist() if c > 0] for row in classes]


def bag_of_tokens(ids: torch.Tensor, d_vocab: int, pad_id: int | None = None) -> torch.Tensor:
    """Counts of each token id per row ``[n, d_vocab]`` (the continuation baseline's input)."""
    x = torch.zeros(ids.shape[0], d_vocab)
    x.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float))
    if pad_id is not None:
        x[:, pad_id] = 0
    return x


def train_inverter(features: torch.Tensor, prompt_ids: list[list[int]], *, vocab: Vocabulary | None = None,
                   hidden: int = 1024, epochs: int = 60, batch_size: int = 128, lr: float = 2e-3,
                   weight_decay: float = 1e-2, seed: int = 0) -> tuple[Inverter, Vocabulary]:
    """Fit an :class:`Inverter` by cross-entropy per position (Adam, minibatches, seeded)."""
    with torch.enable_grad():  # also when the caller turned gradients off
        return _train(features, prompt_ids, vocab, hidden, epochs, batch_size, lr, weight_decay, seed)


def _train(features, prompt_ids, vocab, hidden, epochs, batch_size, lr, weight_decay, seed):
    torch.manual_seed(seed)
    vocab = vocab or Vocabulary.from_prompts(prompt_ids)
    y = vocab.targets(prompt_ids)
    model = Inverter(features.shape[1], vocab.length, len(vocab.ids) + 1, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(y) // batch_size))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            loss = nn.functional.cross_entropy(model(features[idx]).flatten(0, 1), y[idx].flatten(),
                                               ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, vocab


@torch.no_grad()
def predict_tokens(inverter: Inverter, vocab: Vocabulary, features: torch.Tensor) -> list[list[int]]:
    """The inverter's guess of each prompt's token ids."""
    return vocab.decode(inverter(features).argmax(-1))


def _token_prf(predicted: list[int], reference: list[int]) -> tuple[float, float, float]:
    """Bag-of-tokens precision, recall and F1 of one prediction (multiset overlap)."""
    overlap = sum((Counter(predicted) & Counter(reference)).values())
    p = overlap / len(predicted) if predicted else 0.0
    r = overlap / len(reference) if reference else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def inversion_scores(predicted: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """Mean token precision, recall, F1 (in %) and exact recovery (% of prompts), as floats."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predictions for {len(reference)} prompts.")
    prf = np.array([_token_prf(p, r) for p, r in zip(predicted, reference)])
    exact = np.mean([p == r for p, r in zip(predicted, reference)])
    return {"precision": float(100 * prf[:, 0].mean()), "recall": float(100 * prf[:, 1].mean()),
            "f1": float(100 * prf[:, 2].mean()), "exact": float(100 * exact)}


def position_accuracy(predicted: list[list[int]], reference: list[list[int]], length: int) -> np.ndarray:
    """Accuracy per position counted from the end (index ``length - 1`` = last token)."""
    hits, counts = np.zeros(length), np.zeros(length)
    for p, r in zip(predicted, reference):
        p = [None] * max(0, len(r) - len(p)) + p[-len(r):]  # right-align
        for k, (a, b) in enumerate(zip(p[::-1], r[::-1])):
            if k < length:
                hits[length - 1 - k] += a == b
                counts[length - 1 - k] += 1
    return hits / np.maximum(counts, 1)


def majority_baseline(train_ids: list[list[int]], vocab: Vocabulary, n: int) -> list[list[int]]:
    """Predict, at every position, the training set's most frequent class (no model output)."""
    y = vocab.targets(train_ids)
    mode = torch.tensor([Counter(col.tolist()).most_common(1)[0][0] for col in y.T])
    return vocab.decode(mode.expand(n, -1))
