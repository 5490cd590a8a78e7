"""Week 13 exercise checks: right answers pass, the usual slips fail with a message that
names them. The known-answer check runs on a stub model whose top token is known."""

import numpy as np
import pytest
import torch
from test_causal_tracing import CharTokenizer

from interpbook.exercises import CheckFailed
from interpbook.exercises import week13 as w
from interpbook.factual.facts import Fact

FACTS = [Fact(s, "toy", "So {} is", t, ("Q {} A:",)) for s, t in [("ab", "x"), ("cd", "y"), ("ef", "z")]]


class StubModel:
    """Predicts ' ' (the first token of ' ' + target) after prompts containing 'a' or 'e',
    and the target's first letter (no space) after the others."""

    tokenizer = CharTokenizer()

    def logits(self, prompts):
        out = torch.zeros(len(prompts), 100)
        for row, p in enumerate(prompts):
            target = next(f.target for f in FACTS if f.subject in p)
            char = " " if ("a" in p.split()[1] or "e" in p.split()[1]) else target
            out[row, self.tokenizer(char)["input_ids"][0]] = 1.0
        return out


def answered(model, prompts, targets):
    first = [model.tokenizer(" " + t, add_special_tokens=False)["input_ids"][0] for t in targets]
    return (model.logits(prompts).argmax(-1) == torch.tensor(first)).numpy()


def answered_without_space(model, prompts, targets):
    first = [model.tokenizer(t)["input_ids"][0] for t in targets]
    return (model.logits(prompts).argmax(-1) == torch.tensor(first)).numpy()


def test_answered_right_and_slips():
    model = StubModel()
    assert answered(model, [f.prompt for f in FACTS], [f.target for f in FACTS]).tolist() == [True, False, True]
    assert "3 facts" in str(w.check_answered(answered, model, FACTS))
    with pytest.raises(CheckFailed, match="leading space"):
        w.check_answered(answered_without_space, model, FACTS)
    with pytest.raises(CheckFailed, match="1 of 3 answers differ"):
        w.check_answered(lambda m, p, t: np.array([True, True, True]), model, FACTS)
    with pytest.raises(CheckFailed, match="one True/False per prompt"):
        w.check_answered(lambda m, p, t: ..., model, FACTS)


def bootstrap_interval(values, n_boot=2000, level=0.95, seed=0):
    values = np.asarray(values, dtype=float)
    means = values[np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def test_bootstrap_interval_right_and_slips():
    assert "1/sqrt(n)" in str(w.check_bootstrap_interval(bootstrap_interval))

    def of_values(values, n_boot=2000, level=0.95, seed=0):  # quantiles of the values, not of the means
        return tuple(np.quantile(values, [0.02, 0.98]))

    def one_sided(values, n_boot=2000, level=0.95, seed=0):  # the 5% and 95% quantiles for a 95% interval
        low, high = bootstrap_interval(values, n_boot, 0.80, seed)
        return low, high

    with pytest.raises(CheckFailed, match="means"):
        w.check_bootstrap_interval(of_values)
    with pytest.raises(CheckFailed, match="quantiles"):
        w.check_bootstrap_interval(one_sided)
    with pytest.raises(CheckFailed, match="pair"):
        w.check_bootstrap_interval(lambda values, **kw: ...)


def norm_matched(diff, seed):
    direction = torch.randn(diff.shape, generator=torch.Generator().manual_seed(seed), dtype=diff.dtype)
    return direction / direction.norm(dim=-1, keepdim=True) * diff.norm(dim=-1, keepdim=True)


def test_norm_matched_right_and_slips():
    assert "norms match" in str(w.check_norm_matched(norm_matched))
    with pytest.raises(CheckFailed, match="row norms"):
        w.check_norm_matched(lambda diff, seed: torch.randn(diff.shape, generator=torch.Generator().manual_seed(seed)))
    with pytest.raises(CheckFailed, match="points along diff"):
        w.check_norm_matched(lambda diff, seed: diff.clone())
    with pytest.raises(CheckFailed, match="same seed gave different"):
        w.check_norm_matched(lambda diff, seed: norm_matched(diff, int(torch.randint(0, 10**6, ()))))
    with pytest.raises(CheckFailed, match="seeds 0 and 1 gave the same"):
        w.check_norm_matched(lambda diff, seed: norm_matched(diff, 7))
