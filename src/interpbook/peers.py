"""The book's patching experiments written in nnsight and TransformerLens.

Both libraries wrap a model interpbook has already loaded (no download, no network):
nnsight's :func:`nnsight_model` wraps ``model.hf`` itself (it only hooks it while tracing);
TransformerLens's :func:`transformer_bridge` boots a ``TransformerBridge`` around a copy
of it (the bridge replaces the model's modules with its own components). The sweeps here
do what :func:`interpbook.patching.sweep` does, the way each library's documentation
does it, so the appendix "Scaling up" and ``bench/peers.py`` can check that the three give
the same numbers. The sites a sweep writes are found through :mod:`interpbook.anatomy`,
so the code runs on every architecture the anatomy knows.
"""

from __future__ import annotations

import copy
import functools
from unittest import mock
from collections.abc import Callable, Sequence

import torch

from .lm import Model

__all__ = ["PeerUnavailable", "nnsight_model", "transformer_bridge", "envoy", "nnsight_patch_sweep",
           "transformer_lens_patch_sweep", "transformer_lens_restored_probs", "PATCHABLE"]

#: The sites the sweeps patch, and what a unit of the sweep is there.
PATCHABLE = {("resid_pre", "pos"), ("attn_z", "head")}

Metric = Callable[[torch.Tensor], torch.Tensor]


class PeerUnavailable(RuntimeError):
    """A peer library cannot run this model (not installed, or an architecture it lacks)."""


def nnsight_model(model: Model):
    """nnsight's ``TransformersModel`` around ``model.hf`` and its tokenizer (no copy)."""
    try:
        from nnsight import TransformersModel
    except ImportError as exc:
        raise PeerUnavailable(f"nnsight is not installed ({exc}): pip install 'interpbook[scale]'.") from exc
    return TransformersModel(model.hf, tokenizer=model.tokenizer)


def transformer_bridge(model: Model):
    """TransformerLens's ``TransformerBridge`` booted on a copy of ``model.hf``, raw weights
    (no compatibility mode: its activations equal the HF model's). Raises
    :class:`PeerUnavailable` with TransformerLens's reason when it cannot bridge the model."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as exc:
        raise PeerUnavailable(f"TransformerLens is not installed ({exc}): pip install 'interpbook[scale]'.") from exc
    hf = copy.deepcopy(model.hf)
    if not getattr(hf.config, "architectures", None):  # a model built from a config does not name its class
        hf.config.architectures = [type(hf).__name__]
    try:
        return TransformerBridge.boot_transformers(hf.config.name_or_path, hf_model=hf, tokenizer=model.tokenizer,
                                                   device=str(model.device), dtype=hf.dtype)
    except (ValueError, NotImplementedError) as exc:
        raise PeerUnavailable(f"TransformerLens {_version('transformer-lens')} cannot bridge "
                              f"{type(model.hf).__name__}: {exc}") from exc


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _check(model: Model, site: str, over: str, layers: Sequence[int]) -> None:
    if (site, over) not in PATCHABLE:
        raise ValueError(f"The peers' sweeps patch {sorted(PATCHABLE)} (site, over); got {(site, over)}.")
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad or not layers:
        raise ValueError(f"layers must be a non-empty list in 0..{model.n_layers - 1}; got {list(layers)}.")


def envoy(lm, model: Model, module: torch.nn.Module):
    """nnsight's envoy (its proxy in a trace) for ``module``, a module of ``model.hf``."""
    name = next(n for n, m in model.hf.named_modules() if m is module)
    return functools.reduce(lambda e, part: e[int(part)] if part.isdigit() else getattr(e, part), name.split("."), lm)


def nnsight_patch_sweep(lm, model: Model, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, metric: Metric,
                        site: str, over: str, layers: Sequence[int]) -> torch.Tensor:
    """:func:`interpbook.patching.sweep` in nnsight: the clean activations from one trace,
    then one trace per layer with one ``tracer.invoke`` per patch (nnsight runs the
    invokes of a trace as one batch). ``resid_pre`` is the decoder block's input; ``attn_z``
    is the output projection's input, ``[batch, pos, heads * d_head]``. Returns
    ``[len(layers), units]``, ``metric`` of each patched run's last-position logits."""
    _check(model, site, over, layers)
    inputs = {layer: envoy(lm, model, model.anatomy.hook_point(site, layer).module) for layer in layers}
    d_head, n_pos = model.d_head, clean_ids.shape[1]
    units = range(n_pos) if over == "pos" else range(model.n_heads)
    where = [(slice(None), u) if over == "pos" else (slice(None), slice(None), slice(u * d_head, (u + 1) * d_head))
             for u in units]
    clean, grid = {}, []  # made before the traces: nnsight runs a trace's body in a frame of its own
    with torch.no_grad():
        with lm.trace(clean_ids):
            for layer in layers:
                clean[layer] = inputs[layer].input.save()
        for layer in layers:
            logits = []
            with lm.trace() as tracer:
                for at in where:
                    with tracer.invoke(corrupt_ids):
                        inputs[layer].input[at] = clean[layer][at]
                        logits.append(lm.output.logits[:, -1].save())  # after any final softcapping
            grid.append([float(metric(x)) for x in logits])
    return torch.tensor(grid)


def transformer_lens_patch_sweep(bridge, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor, metric: Metric,
                                 site: str, over: str, layers: Sequence[int]) -> torch.Tensor:
    """The same sweep with TransformerLens's own ``generic_activation_patch`` (one forward
    pass per patch), restricted to ``layers`` by its ``index_df``; the clean cache from
    ``run_with_cache``. Returns ``[len(layers), units]``."""
    import pandas as pd
    from transformer_lens import patching as tl_patching

    if (site, over) not in PATCHABLE:
        raise ValueError(f"The peers' sweeps patch {sorted(PATCHABLE)} (site, over); got {(site, over)}.")
    n_units = clean_ids.shape[1] if over == "pos" else bridge.cfg.n_heads
    index = pd.DataFrame([(layer, u) for layer in layers for u in range(n_units)], columns=["layer", over])
    name, setter = {"resid_pre": ("resid_pre", tl_patching.layer_pos_patch_setter),
                    "attn_z": ("z", tl_patching.layer_head_vector_patch_setter)}[site]
    quiet = mock.patch.object(tl_patching, "tqdm", lambda cells: cells)  # its progress bar would print into a page
    with torch.no_grad(), quiet:
        _, cache = bridge.run_with_cache(clean_ids)
        flat = tl_patching.generic_activation_patch(
            bridge, corrupt_ids, cache, lambda logits: metric(logits[:, -1]).mean(), setter, name, index_df=index)
    return flat.view(len(layers), n_units).float().cpu()


def transformer_lens_restored_probs(bridge, input_ids: torch.Tensor, subject: Sequence[int], target: int,
                                    noise: torch.Tensor, layers: Sequence[int], pos: int) -> torch.Tensor:
    """Causal tracing's restored runs in TransformerLens: ``noise`` ``[samples, len(subject),
    d_model]`` added to the subject's embeddings (``hook_embed``, one row per sample), the
    clean residual stream after ``layer`` (``hook_resid_post``) put back at ``pos``; the
    target's probability averaged over the samples, one per layer ``[len(layers)]``."""
    subject = list(subject)
    rows = input_ids.repeat(noise.shape[0], 1)

    def corrupt(x, hook):
        x[:, subject] += noise.to(x)
        return x

    with torch.no_grad():
        _, clean = bridge.run_with_cache(input_ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        probs = []
        for layer in layers:
            name = f"blocks.{layer}.hook_resid_post"

            def restore(x, hook, name=name):
                x[:, pos] = clean[name][0, pos]
                return x

            logits = bridge.run_with_hooks(rows, fwd_hooks=[("hook_embed", corrupt), (name, restore)])
            probs.append(logits[:, -1].float().softmax(-1)[:, target].mean())
    return torch.stack(probs).cpu()
