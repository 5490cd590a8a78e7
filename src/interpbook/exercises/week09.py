"""Checks for the Week 9 exercises (book chapter ``09-circuit-discovery``, page *Exercises*).

Exercise 1 patches the residual stream of one layer position by position (logit
difference). Exercise 2 computes attribution patching of every head by hand (one forward
and backward pass) and compares it with activation patching. Exercise 3 finds a name-mover
head. Exercise 4 evaluates the faithfulness of a circuit of heads by mean ablation. The
expected values come from lower-level pieces (:func:`interpbook.patching.sweep`,
:func:`interpbook.circuits.direct_effects`, :func:`interpbook.circuits.circuit_logit_diffs`)
or from private references here, never from a public function with the name the reader
writes. Every check works on any model the anatomy supports.
"""

from __future__ import annotations

import torch

from .. import circuits as C
from .. import patching
from . import CheckFailed, CheckResult, as_array, check_close

__all__ = ["check_layer_patching", "check_head_attribution", "check_name_mover", "check_circuit_faithfulness"]


def _missing(ex: str, answer: object, what: str) -> None:
    if answer is None or answer is Ellipsis:
        raise CheckFailed(f"{ex}: no {what} yet; replace the `...`")


def _one_template(ds: C.IOIDataset, n: int = 3) -> C.IOIDataset:
    """A few prompts of the first template: equal lengths, so positions line up."""
    return ds.select((ds.template == ds.template[0]).nonzero()[:n, 0])


def check_layer_patching(patch_one_layer, model, ds: C.IOIDataset) -> CheckResult:
    """Exercise 1: ``patch_one_layer(model, clean, corrupt, layer, metric)`` returns
    ``[pos]``: ``metric`` of the corrupted run with the residual stream entering ``layer``
    at one position replaced by the clean run's, for every position."""
    ex = "Exercise 1 (patching one layer)"
    _missing(ex, patch_one_layer, "function")
    one = _one_template(ds)
    layer = round(0.6 * model.n_layers)
    got = patch_one_layer(model, one.prompts, one.corrupt, layer, one.metric)
    want = patching.sweep(model, one.prompts, one.corrupt, "resid_pre", one.metric, layers=[layer])[0]
    arr = as_array(got, "patch_one_layer's result")
    if arr.shape != tuple(want.shape):
        raise CheckFailed(f"{ex}: expected one number per position, shape {tuple(want.shape)}; got {arr.shape}.")
    if abs(arr[-1] - float(want[-1])) > 1e-3 * max(1.0, abs(float(want[-1]))) and abs(arr[-1] - float(want[0])) < 1e-3:
        raise CheckFailed(f"{ex}: the last position gives the unpatched score: is the clean value patched at `pos=p` "
                          "into the corrupted run (not the other way round)?")
    check_close(ex, arr, want.numpy(), rtol=1e-3, atol=1e-3)
    return CheckResult(ex, f"the per-position scores at layer {layer} match activation patching")


def _reference_attribution(model, clean, corrupt, metric) -> torch.Tensor:
    with torch.no_grad():
        z_corrupt = model.run(corrupt, cache="attn_z").cache
    run = model.run(clean, cache="attn_z", grad=True)
    zs = [run.cache["attn_z", layer] for layer in range(model.n_layers)]
    grads = torch.autograd.grad(metric(run.last_logits), zs)
    return torch.stack([((z_corrupt["attn_z", layer] - z.detach()) * g).sum((0, 1, 3))
                        for layer, (z, g) in enumerate(zip(zs, grads))])


def check_head_attribution(head_attribution, model, ds: C.IOIDataset) -> CheckResult:
    """Exercise 2a: ``head_attribution(model, clean, corrupt, metric)`` returns ``[layer,
    head]``: ``(z_corrupt - z_clean) . d metric / d z`` at the clean run, summed over
    prompts, positions and the head's dimensions (``attn_z``)."""
    ex = "Exercise 2a (attribution patching of every head)"
    _missing(ex, head_attribution, "function")
    sub = ds.select(slice(0, 4))
    got = head_attribution(model, sub.prompts, sub.corrupt, sub.metric)
    want = _reference_attribution(model, sub.prompts, sub.corrupt, sub.metric)
    arr = as_array(got, "head_attribution's result")
    if arr.shape == tuple(want.shape) and torch.allclose(torch.as_tensor(arr, dtype=torch.float32), -want,
                                                           rtol=1e-3, atol=1e-4):
        raise CheckFailed(f"{ex}: every score has the wrong sign: the difference is corrupt minus clean.")
    check_close(ex, arr, want.numpy(), rtol=1e-3, atol=1e-4)
    return CheckResult(ex, f"scores of all {model.n_layers * model.n_heads} heads match from one backward pass")


def check_name_mover(head, model, ds: C.IOIDataset) -> CheckResult:
    """Exercise 3: ``head = (layer, head)`` is a name mover: from the last token it attends
    more to the indirect object than to the subject (S2), and its ABC output patched
    straight into the logits (:func:`interpbook.circuits.direct_effects`) lowers the logit
    difference by at least half as much as the strongest such head's does."""
    ex = "Exercise 3 (a name-mover head)"
    _missing(ex, head, "head")
    layer, h = C._checked_heads(model, [head])[0]
    to_io, to_s = C.attention_to(model, ds, "io"), C.attention_to(model, ds, "s2")
    prefers_io = to_io > to_s
    if not bool(prefers_io[layer, h]):
        raise CheckFailed(f"{ex}: head {layer}.{h} attends {float(to_io[layer, h]):.2f} to IO and "
                          f"{float(to_s[layer, h]):.2f} to S2 from the last token: a name mover attends to the name "
                          "it copies, the indirect object.")
    direct = C.direct_effects(model, ds)
    best = float(direct[prefers_io].min())
    if not float(direct[layer, h]) <= 0.5 * min(best, 0.0) or float(direct[layer, h]) >= 0:
        raise CheckFailed(f"{ex}: head {layer}.{h} changes the logit difference by {float(direct[layer, h]):+.2f} "
                          f"(relative) through its direct path; the strongest IO-attending head does {best:+.2f}. "
                          "A name mover writes the answer straight into the logits.")
    return CheckResult(ex, f"head {layer}.{h}: direct effect {float(direct[layer, h]):+.2f}, attention to IO "
                       f"{float(to_io[layer, h]):.2f} vs S2 {float(to_s[layer, h]):.2f}")


def check_circuit_faithfulness(value, model, ds: C.IOIDataset, circuit) -> CheckResult:
    """Exercise 4: ``value`` is the normalised faithfulness ``(F(C) - F(0)) / (F(M) - F(0))``
    of ``circuit`` (a list of ``(layer, head)``) with every other head mean-ablated to its
    per-template ABC mean (``F(0)``: every head ablated)."""
    ex = "Exercise 4 (faithfulness of a circuit)"
    _missing(ex, value, "number")
    means = C.template_means(model, ds)
    every = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    f_c, f_0, f_m = C.circuit_logit_diffs(model, ds, [list(circuit), [], every], means).tolist()
    want = C.faithfulness(f_c, f_m, f_0)
    got = float(as_array(value, "faithfulness"))
    if abs(got - f_c / f_m) < 1e-3 and abs(want - f_c / f_m) > 1e-3:
        raise CheckFailed(f"{ex}: {got:.3f} is F(C)/F(M); normalise with the all-ablated run: (F(C) - F(0)) / "
                          "(F(M) - F(0)).")
    check_close(ex, got, want, rtol=1e-3, atol=1e-3)
    return CheckResult(ex, f"faithfulness {want:.2f} of {len(circuit)} heads")
