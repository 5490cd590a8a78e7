"""The IOI activation-patching sweeps of ``bench/patching.py`` written in nnsight 0.8 and
TransformerLens 4.x, side by side with interpbook's batched sweep, on the real model.

Two sweeps on the same IOI prompt pairs (``bench/patching.py``'s ``ioi_pairs``): the clean
``resid_pre`` patched into the corrupted run at every ``(layer, position)``, and the clean
output of every head (its ``z``, the input of the output projection) at every ``(layer,
head)``, all positions. Every method scores a patched run with the same function
(``interpbook.patching.logit_diff`` at the last position, averaged over the pairs), so the
grids must agree; the last column is the largest difference from interpbook's grid.

* **interpbook**: ``patching.sweep`` with ``patching.LogitDiff``.
* **nnsight** and **TransformerLens**: ``interpbook.peers`` (shared with the book's appendix
  "Scaling up"), each on its own copy of the weights. nnsight: ``TransformersModel`` around
  the HF model; the clean activations from one trace, then one trace per layer with one
  ``tracer.invoke`` per patch (nnsight runs the invokes of a trace as one batch): what its
  documentation recommends for many patches. TransformerLens: ``TransformerBridge`` booted
  on the HF model (raw weights, no compatibility mode), the clean cache from
  ``run_with_cache``, and the library's own ``generic_activation_patch`` (what its
  ``get_act_patch_resid_pre`` and ``get_act_patch_attn_head_out_all_pos`` run), one forward
  pass per patch.

A peer that is not installed (the ``[scale]`` extra, which ``[book]`` includes) gets a "not
installed" row. Reported: wall and process-CPU seconds (one round; read CPU when other
processes share the cores) and the ratio to interpbook.

Usage: ``python bench/peers.py [--prompts 8] [--threads 1]
[--sweeps resid_pre:pos attn_z:head] [--peers nnsight TransformerLens]``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import interpbook as ib  # noqa: E402
from interpbook import patching, peers  # noqa: E402
from interpbook.models import converted_path  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from patching import ioi_pairs, timed  # noqa: E402  (bench/patching.py)


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def _own_copy(model):
    """A second :class:`interpbook.Model` on its own copy of the weights, so that no peer's
    wrapping can slow down another's model."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(converted_path(model.name), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    return ib.Model(hf, model.tokenizer, name=model.name)


def nnsight_sweep(model, ids, metric, site: str, over: str, layers: list[int]) -> torch.Tensor:
    """``interpbook.peers.nnsight_patch_sweep``: one trace per layer, one invoke per patch."""
    own = _own_copy(model)
    return peers.nnsight_patch_sweep(peers.nnsight_model(own), own, ids["clean"], ids["corrupt"], metric, site, over,
                                     layers)


def transformer_lens_sweep(model, ids, metric, site: str, over: str, layers: list[int]) -> torch.Tensor:
    """``interpbook.peers.transformer_lens_patch_sweep``: the library's ``generic_activation_patch``
    (what its ``get_act_patch_resid_pre`` and ``get_act_patch_attn_head_out_all_pos`` run), one
    forward pass per patch, on a bridge booted on its own copy."""
    bridge = peers.transformer_bridge(model)
    return peers.transformer_lens_patch_sweep(bridge, ids["clean"], ids["corrupt"], metric, site, over, layers)


PEERS = {"nnsight": nnsight_sweep, "TransformerLens": transformer_lens_sweep}
DIST = {"nnsight": "nnsight", "TransformerLens": "transformer-lens"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sweeps", nargs="+", default=["resid_pre:pos", "attn_z:head"])
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ib.load_model("smollm2-135m")
    clean, corrupt, right, wrong = ioi_pairs(model, args.prompts, "s2")
    metric = lambda logits: patching.logit_diff(logits, right, wrong).mean()  # noqa: E731
    ids = {"clean": model.tokenize(clean)["input_ids"], "corrupt": model.tokenize(corrupt)["input_ids"]}
    layers = list(range(model.n_layers))  # every layer: the measured runs in bench/README.md
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} logical CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{model.name}: {args.prompts} IOI pairs x {ids['clean'].shape[1]} tokens (s2 corruption), "
          f"every layer ({len(layers)})\n")
    print("| sweep | method | patches run | wall s | CPU s | CPU ratio to interpbook | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for site, over in (s.split(":") for s in args.sweeps):
        patching.sweep(model, clean, corrupt, site, patching.LogitDiff(right, wrong), over=over, layers=[0])  # warm-up
        ours, wall, cpu = timed(lambda: patching.sweep(model, clean, corrupt, site, patching.LogitDiff(right, wrong),
                                                       over=over, layers=layers))
        label = f"{site} x {over}"
        print(f"| {label} | interpbook {_version('interpbook')} | {ours.numel()} | {wall:.1f} | {cpu:.1f} | 1.0x | |",
              flush=True)
        for name in args.peers:
            if not _version(DIST[name]):
                print(f"| {label} | {name} | | | | not installed | |")
                continue
            grid, pwall, pcpu = timed(lambda: PEERS[name](model, ids, metric, site, over, layers))
            print(f"| {label} | {name} {_version(DIST[name])} | {grid.numel()} | {pwall:.1f} | {pcpu:.1f} | "
                  f"{pcpu / cpu:.1f}x | {float((grid - ours).abs().max()):.1e} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
