"""CounterFact-style evaluation of model edits (Meng et al., 2022), built offline.

A :class:`CounterFactCase` asks to rewrite a fact the model knows (``Fact: Lyon is a city
in the country of`` -> ``France``) into a counterfactual one (-> ``Japan``, another object
of the same relation), and carries the prompts that test the edit:

- **efficacy**: on the fact's own prompt, the new object beats the true one;
- **paraphrase**: the same on other wordings of the fact (one is a question);
- **neighbourhood** (specificity): on prompts about *other* subjects with the same true
  object (other French cities), the true object still beats the new one;
- **fluency**: the n-gram entropy of a short greedy generation from the fact's prompt
  (repetitive text has low entropy; ROME's paper uses the same measure on longer text).

"Beats" compares the log-probabilities of the objects' first tokens (the objects of a
case are chosen so that their first tokens differ); the paper compares whole-object
probabilities. :func:`evaluate_case` scores one case under whatever edit is active, and
:func:`evaluate_edits` applies each case's edit at each layer and returns one row per
(layer, case).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from . import rome
from .facts import Fact, neighbours, object_token

__all__ = ["CounterFactCase", "counterfact_cases", "n_gram_entropy", "evaluate_case", "evaluate_edits"]


@dataclass(frozen=True)
class CounterFactCase:
    """Rewrite ``fact`` to ``new_object``; ``neighbours`` are facts about other subjects that
    share the fact's true object (they should keep it)."""

    fact: Fact
    new_object: str
    neighbours: tuple[Fact, ...]

    @property
    def request(self) -> rome.EditRequest:
        """The edit request for this case (the fact's prompt, continued by the new object with its space)."""
        return rome.EditRequest(self.fact.prompt, self.fact.subject, " " + self.new_object)


def counterfact_cases(model, known: Sequence[Fact], pool: Sequence[Fact], n: int, *, n_neighbours: int = 3,
                      seed: int = 0) -> list[CounterFactCase]:
    """Up to ``n`` cases from the facts the model knows (``known``), each with a new object
    drawn from the other objects of its relation in ``known`` (first token different from
    the true one) and up to ``n_neighbours`` neighbours from ``pool`` (facts of the same
    relation with the same object). Facts without a neighbour are skipped: they cannot
    test specificity."""
    if n < 1:
        raise ValueError(f"n must be positive; got {n}.")
    rng = random.Random(seed)
    tok = model.tokenizer
    objects: dict[str, list[str]] = {}
    for f in known:
        objects.setdefault(f.relation, [])
        if f.target not in objects[f.relation]:
            objects[f.relation].append(f.target)
    cases = []
    for f in rng.sample(list(known), len(known)):
        near = neighbours(f, pool, n_neighbours, seed=seed)
        first = object_token(tok, f.target)
        others = [o for o in objects[f.relation] if object_token(tok, o) != first]
        if not near or not others:
            continue
        cases.append(CounterFactCase(f, rng.choice(others), tuple(near)))
        if len(cases) == n:
            break
    if not cases:
        raise ValueError("No known fact has a neighbour (another subject with the same object) and another "
                         "object to switch to; use relations with shared objects (e.g. city_country).")
    return cases


def n_gram_entropy(tokens: Sequence, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted mean of the entropies (bits) of the n-gram frequency distributions of
    ``tokens`` for each ``n`` (ROME's fluency measure, with its weights). Text stuck in a
    loop repeats n-grams and scores low."""
    if len(ns) != len(weights):
        raise ValueError("ns and weights need the same length.")
    total = 0.0
    for n, w in zip(ns, weights):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        count = sum(grams.values())
        h = -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0
        total += w * h
    return total / len(ns)


@torch.no_grad()
def evaluate_case(model, case: CounterFactCase, *, gen_tokens: int = 16) -> dict:
    """The margin log p(new) - log p(true) on the fact's prompt (first tokens), efficacy
    (0/1: the margin is positive), paraphrase and neighbourhood scores (fractions of prompts) and
    fluency (n-gram entropy of a greedy ``gen_tokens``-token continuation of the fact's
    prompt; 0 skips it) under the model as it is now (edited or not)."""
    f = case.fact
    prompts = [f.prompt, *f.paraphrase_prompts, *[g.prompt for g in case.neighbours]]
    logp = torch.log_softmax(model.logits(prompts).float(), -1)
    new, true = object_token(model.tokenizer, case.new_object), object_token(model.tokenizer, f.target)
    new_wins = (logp[:, new] > logp[:, true]).float()
    n_para = len(f.paraphrases)
    row = {"subject": f.subject, "true": f.target, "new": case.new_object,
           "margin": float(logp[0, new] - logp[0, true]),
           "efficacy": float(new_wins[0]),
           "paraphrase": float(new_wins[1:1 + n_para].mean()) if n_para else math.nan,
           "neighbourhood": float(1 - new_wins[1 + n_para:].mean())}
    if gen_tokens:
        ids = model.tokenizer(model.generate(f.prompt, gen_tokens), add_special_tokens=False)["input_ids"]
        row["fluency"] = n_gram_entropy(ids)
    return row


def evaluate_edits(model, cases: Sequence[CounterFactCase], edits: dict[int, Sequence[rome.RomeEdit]], *,
                   gen_tokens: int = 16):
    """One row per (layer, case): the case's scores with its edit at that layer applied
    (``edits[layer][i]`` belongs to ``cases[i]``, e.g. from
    :func:`interpbook.factual.rome.rome_edits`), plus rows with ``layer = -1`` for the
    unedited model. Edits are applied one at a time. Returns a pandas DataFrame."""
    import pandas as pd

    cases = list(cases)
    for layer, es in edits.items():
        if len(es) != len(cases):
            raise ValueError(f"layer {layer} has {len(es)} edits for {len(cases)} cases; give one edit per case.")
    rows = [{"layer": -1, **evaluate_case(model, c, gen_tokens=gen_tokens)} for c in cases]
    for layer, es in edits.items():
        for c, e in zip(cases, es):
            with rome.edited(model, e):
                rows.append({"layer": layer, **evaluate_case(model, c, gen_tokens=gen_tokens), "nll": e.nll[-1]})
    return pd.DataFrame(rows)
