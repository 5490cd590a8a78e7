"""Checks for the Week 8 exercises (book chapter ``08-describing-features``, page *Exercises*).

Exercise 1 builds a detection scorer step by step (the rule-based judge, balanced
accuracy, choosing firing and quiet contexts) and then uses it to compare SAE latents
with neurons. Exercise 2 writes VocabProj with the final norm folded into the
unembedding. Exercise 3 writes TokenChange with a steering edit. The references are
private to this module (``_reference_*``) and written from lower-level pieces (plain
torch, the anatomy's weights, a tracing edit), not with :mod:`interpbook.autointerp`.
"""

from __future__ import annotations

import torch

from . import CheckFailed, CheckResult, as_array

__all__ = ["check_contains_any", "check_balanced_accuracy", "check_detection_score", "check_vocab_projection",
           "check_steered_tokens"]


def _missing(ex: str, answer: object, what: str) -> None:
    if answer is None or answer is Ellipsis:
        raise CheckFailed(f"{ex}: no {what} yet; replace the `...`")


def _contexts(seed: int = 0, n: int = 60, length: int = 8):
    """Random contexts with a known feature: it fires (activation 2) on tokens 5 and 6, plus noise."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (n, length), generator=g)
    acts = torch.isin(ids, torch.tensor([5, 6])).float() * 2 + torch.rand(n, length, generator=g) * 0.5
    return ids, acts.max(1).values


def _reference_contains_any(ids, tokens):
    return torch.isin(ids, torch.as_tensor(list(tokens), dtype=ids.dtype)).any(1)


def _reference_balanced_accuracy(said_yes_firing, said_yes_quiet):
    return 0.5 * (float(said_yes_firing.float().mean()) + float((~said_yes_quiet).float().mean()))


def _reference_detection(tokens, ids, peak, threshold, n):
    firing = (peak > threshold).nonzero()[:, 0]
    firing = firing[peak[firing].argsort(descending=True)[:n]]
    quiet = (peak <= threshold).nonzero()[:n, 0]
    said = _reference_contains_any(ids, tokens)
    return _reference_balanced_accuracy(said[firing], said[quiet])


def check_contains_any(contains_any) -> CheckResult:
    """Exercise 1a: ``contains_any(ids [n, length], tokens) -> bool [n]``, True where a context
    contains at least one of ``tokens``."""
    ex = "Exercise 1a (the rule-based judge)"
    _missing(ex, contains_any, "function")
    ids, _ = _contexts()
    for tokens in ([5, 6], [7], []):
        got = torch.as_tensor(as_array(contains_any(ids, tokens), "contains_any")).bool()
        want = _reference_contains_any(ids, tokens)
        if got.shape != want.shape:
            raise CheckFailed(f"{ex}: return one bool per context, shape {tuple(want.shape)}; got {tuple(got.shape)}")
        if not torch.equal(got, want):
            if torch.equal(got, torch.isin(ids, torch.as_tensor(tokens, dtype=ids.dtype)).all(1)):
                raise CheckFailed(f"{ex}: a context matches when it contains ANY of the tokens, not all of them")
            raise CheckFailed(f"{ex}: {int((got != want).sum())} of {len(want)} contexts differ for tokens={tokens}")
    return CheckResult(ex, "matches the reference on 60 contexts, including an empty token set")


def check_balanced_accuracy(balanced_accuracy) -> CheckResult:
    """Exercise 1b: ``balanced_accuracy(said_yes_firing, said_yes_quiet)``: the mean of the
    hit rate on firing contexts and the correct-rejection rate on quiet ones."""
    ex = "Exercise 1b (balanced accuracy)"
    _missing(ex, balanced_accuracy, "function")
    cases = [(torch.tensor([True, True, False, True]), torch.tensor([False, True])),
             (torch.ones(3, dtype=torch.bool), torch.ones(7, dtype=torch.bool))]
    for yes_firing, yes_quiet in cases:
        got = float(as_array(balanced_accuracy(yes_firing, yes_quiet), "balanced accuracy"))
        want = _reference_balanced_accuracy(yes_firing, yes_quiet)
        if abs(got - want) > 1e-6:
            plain = float(torch.cat([yes_firing, ~yes_quiet]).float().mean())
            hint = (" (that is plain accuracy; weight the two groups equally)" if abs(got - plain) < 1e-6 else "")
            raise CheckFailed(f"{ex}: expected {want:.3f}, got {got:.3f}{hint}")
    return CheckResult(ex, "a judge that always says yes scores 0.5, as it should")


def check_detection_score(detection_score) -> CheckResult:
    """Exercise 1c: ``detection_score(tokens, ids, peak, threshold, n)``: balanced accuracy
    of the judge on the ``n`` firing contexts with the highest ``peak`` (above
    ``threshold``) and the first ``n`` quiet contexts (peak at most ``threshold``)."""
    ex = "Exercise 1c (detection score)"
    _missing(ex, detection_score, "function")
    ids, peak = _contexts()
    for tokens, threshold, n in (([5, 6], 1.0, 10), ([5, 9], 1.0, 10), ([7], 0.4, 5)):
        got = float(as_array(detection_score(tokens, ids, peak, threshold, n), "detection score"))
        want = _reference_detection(tokens, ids, peak, threshold, n)
        if abs(got - want) > 1e-6:
            raise CheckFailed(f"{ex}: for tokens={tokens}, threshold={threshold}, n={n} expected {want:.3f}, got "
                              f"{got:.3f}. Firing contexts: peak > threshold, the n highest; quiet: the first n "
                              "with peak <= threshold")
    return CheckResult(ex, "the true token set scores 1.0, a wrong one less, as the reference")


def _reference_vocab_projection(model, direction, k):
    a = model.anatomy
    with torch.no_grad():
        gain = a.norm_gain(a.final_norm()).float()
        return (direction.float() * gain) @ a.W_U.float()


def check_vocab_projection(vocab_projection, model, directions: torch.Tensor, k: int = 5) -> CheckResult:
    """Exercise 2: ``vocab_projection(model, direction, k)`` returns the ``k`` token ids a
    residual-stream ``direction [d_model]`` promotes most, read through the final norm's
    gain and the unembedding (in order, highest first)."""
    ex = "Exercise 2 (VocabProj)"
    _missing(ex, vocab_projection, "function")
    for i, d in enumerate(directions):
        got = [int(t) for t in as_array(vocab_projection(model, d, k), "token ids").reshape(-1)]
        want = _reference_vocab_projection(model, d, k).topk(k).indices.tolist()
        if got != want:
            plain = (d.float() @ model.anatomy.W_U.float()).topk(k).indices.tolist()
            hint = ""
            if got == plain:
                hint = " (the final norm's gain is missing: multiply the direction by it first)"
            elif set(got) == set(want):
                hint = " (same tokens, wrong order: highest first)"
            raise CheckFailed(f"{ex}: direction {i}: expected token ids {want}, got {got}{hint}. Use "
                              "model.anatomy.norm_gain(model.anatomy.final_norm()) for the gain: some models "
                              "store it as 1 + weight")
    return CheckResult(ex, f"top-{k} tokens of {len(directions)} directions match the folded unembedding")


def _reference_steered_logprobs(model, site, direction, prompts, norm):
    from ..tracing import edit

    v = norm * direction.float() / direction.float().norm()

    def add(x):
        return torch.cat([x[:, :1], x[:, 1:] + v.to(x.dtype)], 1)

    with torch.no_grad():
        clean = model.run(prompts).logits[:, 1:].float().log_softmax(-1).mean((0, 1))
        steered = model.run(prompts, edits=[edit(site, add)]).logits[:, 1:].float().log_softmax(-1).mean((0, 1))
    return steered - clean


def check_steered_tokens(steered_tokens, model, site, direction: torch.Tensor, prompts: torch.Tensor,
                         norm: float, k: int = 5) -> CheckResult:
    """Exercise 3: ``steered_tokens(model, site, direction, prompts, norm, k)`` adds
    ``direction`` rescaled to length ``norm`` at ``site`` (every position but the first),
    and returns the ``k`` token ids whose next-token log-probability, averaged over those
    positions and the prompts, rises most."""
    ex = "Exercise 3 (TokenChange)"
    _missing(ex, steered_tokens, "function")
    got = [int(t) for t in as_array(steered_tokens(model, site, direction, prompts, norm, k), "token ids").reshape(-1)]
    change = _reference_steered_logprobs(model, site, direction, prompts, norm)
    want = change.topk(k).indices.tolist()
    if got == want:
        return CheckResult(ex, f"the {k} tokens that gain most under steering match")
    if len(got) == k and change[got].min() >= change[want].min() - 1e-4:
        return CheckResult(ex, f"the {k} tokens that gain most match up to ties")
    raise CheckFailed(f"{ex}: expected token ids {want}, got {got}. Rescale the direction to length `norm`, add it "
                      "at positions 1: only, compare log-softmax (not logits) with the unsteered run, and average "
                      "over positions and prompts before taking the top k")
