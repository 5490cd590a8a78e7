"""Week 8 exercise checks: right answers pass, usual slips fail with a message."""

import pytest
import torch

from interpbook.exercises import CheckFailed
from interpbook.exercises import week08 as w
from interpbook.tracing import edit
from tiny_models import random_ids, tiny_model


def contains_any(ids, tokens):
    return torch.isin(ids, torch.tensor(list(tokens), dtype=ids.dtype)).any(1)


def balanced_accuracy(yes_firing, yes_quiet):
    return 0.5 * (yes_firing.float().mean() + (~yes_quiet).float().mean())


def detection_score(tokens, ids, peak, threshold, n):
    firing = (peak > threshold).nonzero()[:, 0]
    firing = firing[peak[firing].argsort(descending=True)[:n]]
    quiet = (peak <= threshold).nonzero()[:n, 0]
    said = contains_any(ids, tokens)
    return balanced_accuracy(said[firing], said[quiet])


def test_contains_any():
    w.check_contains_any(contains_any)
    with pytest.raises(CheckFailed, match="ANY"):
        w.check_contains_any(lambda ids, tokens: torch.isin(ids, torch.tensor(tokens, dtype=ids.dtype)).all(1))


def test_balanced_accuracy():
    w.check_balanced_accuracy(balanced_accuracy)
    with pytest.raises(CheckFailed, match="plain accuracy"):
        w.check_balanced_accuracy(lambda a, b: torch.cat([a, ~b]).float().mean())


def test_detection_score():
    w.check_detection_score(detection_score)

    def all_firing(tokens, ids, peak, threshold, n):  # every firing context instead of the n strongest
        said = contains_any(ids, tokens)
        return balanced_accuracy(said[peak > threshold], said[(peak <= threshold).nonzero()[:n, 0]])

    with pytest.raises(CheckFailed, match="n highest"):
        w.check_detection_score(all_firing)
    with pytest.raises(CheckFailed, match="no function"):
        w.check_detection_score(...)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_vocab_projection(family):
    model = tiny_model(family)
    a = model.anatomy
    dirs = torch.randn(3, model.d_model, generator=torch.Generator().manual_seed(0))

    def vocab_projection(model, direction, k):
        gain = a.norm_gain(a.final_norm())
        return ((direction * gain) @ a.W_U).topk(k).indices

    w.check_vocab_projection(vocab_projection, model, dirs)
    with pytest.raises(CheckFailed, match="gain"):
        w.check_vocab_projection(lambda m, d, k: (d @ a.W_U).topk(k).indices, model, dirs)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_steered_tokens(family):
    model = tiny_model(family)
    site, prompts = ("resid_post", 1), random_ids(2, 6)
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))

    def steered_tokens(model, site, direction, prompts, norm, k, rescale=True):
        v = norm * direction / direction.norm() if rescale else 40 * direction
        clean = model.run(prompts).logits[:, 1:].log_softmax(-1).mean((0, 1))
        e = edit(site, lambda x: torch.cat([x[:, :1], x[:, 1:] + v], 1))
        steered = model.run(prompts, edits=[e]).logits[:, 1:].log_softmax(-1).mean((0, 1))
        return (steered - clean).topk(k).indices

    w.check_steered_tokens(steered_tokens, model, site, direction, prompts, norm=4.0)

    def raw_direction(model, site, direction, prompts, norm, k):   # forgets to rescale
        return steered_tokens(model, site, direction, prompts, norm, k, rescale=False)

    with pytest.raises(CheckFailed, match="Rescale"):
        w.check_steered_tokens(raw_direction, model, site, direction, prompts, norm=0.5)
