"""Checks for the Week 10 exercises (book chapter ``10-binding-mechanisms``, page *Exercises*).

Exercise 1 builds the binding-ID mean intervention step by step: the mean slot difference
at every layer, then the intervention itself (logits under the edit). Exercise 2 patches
the last-token residual stream at one layer and classifies the outcome (base,
counterfactual, third value, other). Exercise 3 re-rotates cached keys by a position
offset. The expected values come from lower-level pieces (cached activations, the edits
of :func:`interpbook.binding.binding_edits`, :func:`interpbook.binding.lookback_outcomes`,
:func:`interpbook.binding.rotate_keys`) or from private references here, never from a
public function with the name the reader writes. Every check works on any model with
rotary position embeddings that the anatomy supports.
"""

from __future__ import annotations

import inspect

import torch

from .. import binding as B
from ..tracing import patch, steer
from . import CheckFailed, CheckResult, as_array, check_close

__all__ = ["check_binding_id_difference", "check_binding_intervention", "check_patch_and_classify",
           "rotary_frequencies", "check_rerotate_keys"]


def _missing(ex: str, answer: object, what: str) -> None:
    if answer is None or answer is Ellipsis:
        raise CheckFailed(f"{ex}: no {what} yet; replace the `...`")


def _reference_difference(resid: torch.Tensor, ds: B.BindingDataset, kind: str) -> torch.Tensor:
    return (resid[:, :, ds.positions[kind + "1"]] - resid[:, :, ds.positions[kind + "0"]]).mean(1)


def check_binding_id_difference(binding_id_difference, model, ds: B.BindingDataset) -> CheckResult:
    """Exercise 1a: ``binding_id_difference(model, ds, kind)`` returns ``[layer, d_model]``:
    the mean over contexts of the residual stream entering each layer at the slot-1 token
    minus the slot-0 token of ``kind`` ("E" or "A")."""
    ex = "Exercise 1a (binding-ID difference)"
    _missing(ex, binding_id_difference, "function")
    resid = B._resid(model, ds)
    for kind in ("E", "A"):
        want = _reference_difference(resid, ds, kind)
        got = as_array(binding_id_difference(model, ds, kind), f"binding_id_difference(..., {kind!r})")
        if got.shape != tuple(want.shape):
            raise CheckFailed(f"{ex}: expected one vector per layer, shape {tuple(want.shape)}; got {got.shape}.")
        if torch.allclose(torch.as_tensor(got, dtype=torch.float32), -want, rtol=1e-4, atol=1e-4):
            raise CheckFailed(f"{ex}: the sign is flipped: the difference is slot 1 minus slot 0.")
        check_close(f"{ex}, kind {kind!r}", got, want.numpy(), rtol=1e-4, atol=1e-4)
    return CheckResult(ex, f"{model.n_layers} per-layer differences for entities and attributes match")


def check_binding_intervention(intervene, model, ds: B.BindingDataset) -> CheckResult:
    """Exercise 1b: ``intervene(model, ds, kind, delta)`` returns the last-position logits
    ``[batch, vocab]`` when, at every layer, the slot-0 token's residual stream (entering the
    layer) is replaced by its clean value plus ``delta[layer]`` and the slot-1 token's by its
    clean value minus ``delta[layer]``."""
    ex = "Exercise 1b (mean intervention)"
    _missing(ex, intervene, "function")
    kind = "E"
    resid = B._resid(model, ds)
    delta = _reference_difference(resid, ds, kind)
    want, _ = B.run_last(model, ds.prompts, edits=B.binding_edits(model, ds, resid, kind, delta))
    got = torch.as_tensor(as_array(intervene(model, ds, kind, delta.clone()), "intervene's logits"), dtype=torch.float32)
    if got.shape != want.shape:
        raise CheckFailed(f"{ex}: expected last-position logits of shape {tuple(want.shape)}; got {tuple(got.shape)}.")
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
        p0, p1 = ds.positions["E0"], ds.positions["E1"]
        added = [e for layer in range(model.n_layers)
                 for e in (steer(("resid_pre", layer), delta[layer], pos=p0),
                           steer(("resid_pre", layer), -delta[layer], pos=p1))]
        accumulated, _ = B.run_last(model, ds.prompts, edits=added)
        if torch.allclose(got, accumulated, rtol=1e-3, atol=1e-3):
            raise CheckFailed(f"{ex}: these are the logits of *adding* delta at every layer to the edited stream, so "
                              "the shifts pile up layer after layer. Set each layer's value to the clean one plus "
                              "delta[layer] (patch the clean cache plus the shift).")
    check_close(ex, got.numpy(), want.numpy(), rtol=1e-3, atol=1e-3)
    switched = float((~B.two_way_correct(want, ds)).float().mean())
    return CheckResult(ex, f"logits match; {switched:.2f} of the prompts answer the other slot's city")


def _reference_outcomes(model, base: B.BindingDataset, cf: B.BindingDataset, layer: int) -> torch.Tensor:
    with torch.no_grad():
        value = model.run(cf.prompts, cache=("resid_pre", layer), stop_early=True).cache["resid_pre", layer][:, -1].clone()
    logits, _ = B.run_last(model, base.prompts, edits=[patch(("resid_pre", layer), value, pos=-1)])
    third = base.attr_ids.gather(1, cf.query[:, None])[:, 0]
    return B.lookback_outcomes(logits, base.answers, cf.answers, third)


def check_patch_and_classify(patch_and_classify, model, base: B.BindingDataset, cf: B.BindingDataset) -> CheckResult:
    """Exercise 2: ``patch_and_classify(model, base, cf, layer)`` returns one outcome code per
    base prompt (0 base answer, 1 counterfactual answer, 2 third value, 3 other) after the
    last token's residual stream entering ``layer`` is replaced by the counterfactual's.
    Checked at a quarter, two thirds and nine tenths of the depth."""
    ex = "Exercise 2 (patch the last token and classify)"
    _missing(ex, patch_and_classify, "function")
    summary = []
    for frac in (0.25, 0.67, 0.9):
        layer = min(model.n_layers - 1, round(frac * model.n_layers))
        want = _reference_outcomes(model, base, cf, layer)
        got = as_array(patch_and_classify(model, base, cf, layer), "the outcome codes")
        if got.shape != tuple(want.shape):
            raise CheckFailed(f"{ex}: expected one code per base prompt, shape {tuple(want.shape)}; got {got.shape}.")
        wrong = (torch.as_tensor(got).long() != want).nonzero()[:, 0].tolist()
        if wrong:
            i = wrong[0]
            raise CheckFailed(f"{ex}: at layer {layer}, prompt {i} gets code {int(got[i])} but the patched model's top "
                              f"answer is a {B.OUTCOMES[int(want[i])]!r} outcome (code {int(want[i])}). Is the "
                              "counterfactual's last-token residual patched into the base run at that layer, and the "
                              "third value the base city of the slot the counterfactual asks about?")
        summary.append(f"layer {layer}: " + ", ".join(f"{(want == c).float().mean():.2f} {n}" for c, n in enumerate(B.OUTCOMES)))
    return CheckResult(ex, "; ".join(summary))


def rotary_frequencies(model, layer: int) -> torch.Tensor:
    """The rotary inverse frequencies ``theta_i`` used at ``layer`` (one per pair of rotated
    dimensions), read from the model's own rotary module."""
    rot = B._rotary(model)
    if "layer_type" in inspect.signature(rot.forward).parameters:
        return getattr(rot, f"{model.hf.config.layer_types[layer]}_inv_freq").float()
    return rot.inv_freq.float()


def check_rerotate_keys(rerotate_keys, model, prompts) -> CheckResult:
    """Exercise 3: ``rerotate_keys(keys, delta, inv_freq)`` turns post-rotary keys ``[...,
    pos, d_head]`` by ``delta`` positions (angle ``delta * inv_freq[i]`` on the pair of
    dimensions ``i`` and ``i + d_head/2``), as :func:`interpbook.binding.rotate_keys` does."""
    ex = "Exercise 3 (re-rotating cached keys)"
    _missing(ex, rerotate_keys, "function")
    cache, _ = B.context_cache(model, prompts)
    layer = model.n_layers // 2
    keys = cache.layers[layer].keys
    inv_freq = rotary_frequencies(model, layer)
    for delta in (3, -5):
        want = B.rotate_keys(model, keys, layer, delta)
        got = torch.as_tensor(as_array(rerotate_keys(keys, delta, inv_freq.clone()), "the rotated keys"), dtype=torch.float32)
        if got.shape != want.shape:
            raise CheckFailed(f"{ex}: expected keys of shape {tuple(want.shape)}; got {tuple(got.shape)}.")
        if torch.allclose(got, B.rotate_keys(model, keys, layer, -delta), rtol=1e-4, atol=1e-4):
            raise CheckFailed(f"{ex}: the keys turn the wrong way: moving a key {delta} positions later rotates "
                              "it by +delta * inv_freq.")
        check_close(f"{ex}, delta {delta}", got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    return CheckResult(ex, f"keys of layer {layer} moved by +3 and -5 positions match")
