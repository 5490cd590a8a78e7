"""The IOI activation-patching sweeps of ``bench/patching.py`` written in nnsight 0.8 and
TransformerLens 4.x, side by side with interpbook's batched sweep, on the real model.

Two sweeps on the same IOI prompt pairs (``bench/patching.py``'s ``ioi_pairs``): the clean
``resid_pre`` patched into the corrupted run at every ``(layer, position)``, and the clean
output of every head (its ``z``, the input of the output projection) at every ``(layer,
head)``, all positions. Every method scores a patched run with the same function
(``interpbook.patching.logit_diff`` at the last position, averaged over the pairs), so the
grids must agree; the last column is the largest difference from interpbook's grid.

* **interpbook**: ``patching.sweep`` with ``patching.LogitDiff``.
* **nnsight**: ``LanguageModel(hf)`` (plain ``NNsight`` cannot batch invokes) on its own copy of the weights; the clean activations from one
  trace, then one trace per layer with one ``tracer.invoke`` per patch (nnsight runs the
  invokes of a trace as one batch): what its documentation recommends for many patches.
* **TransformerLens**: ``TransformerBridge.boot_transformers`` on its own copy, compatibility
  mode, clean cache from ``run_with_cache``, and the library's own sweeps
  ``transformer_lens.patching.get_act_patch_resid_pre`` and
  ``get_act_patch_attn_head_out_all_pos`` (one forward pass per patch).

A peer that is not installed (the ``[bench]`` extra; install it into a separate virtual
environment, it must not change the book's one) gets a "not installed" row. Reported: wall
and process-CPU seconds (one round; read CPU when other processes share the cores) and the
ratio to interpbook.

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
from interpbook import patching  # noqa: E402
from interpbook.models import converted_path  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from patching import ioi_pairs, timed  # noqa: E402  (bench/patching.py)


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


def _hf_copy(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def nnsight_sweep(path, ids, right, wrong, site: str, layers: list[int]) -> torch.Tensor:
    """One trace per layer, one invoke per patch; clean activations from one trace."""
    from nnsight import LanguageModel
    from transformers import AutoTokenizer

    hf = _hf_copy(path)
    lm = LanguageModel(hf, tokenizer=AutoTokenizer.from_pretrained(path))
    blocks = lm.model.layers
    n_heads = hf.config.num_attention_heads
    d_head = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // n_heads

    def read(layer):  # resid_pre = the decoder block's input; z = the output projection's input
        return blocks[layer].input if site == "resid_pre" else blocks[layer].self_attn.o_proj.input

    with torch.no_grad():
        clean = []
        with lm.trace(ids["clean"]):
            for layer in layers:
                clean.append(read(layer).save())
        grid = []
        for li, layer in enumerate(layers):
            units = range(ids["clean"].shape[1]) if site == "resid_pre" else range(n_heads)
            saved = []
            with lm.trace() as tracer:
                for u in units:
                    with tracer.invoke(ids["corrupt"]):
                        where = (slice(None), u) if site == "resid_pre" else \
                            (slice(None), slice(None), slice(u * d_head, (u + 1) * d_head))
                        read(layer)[where] = clean[li][where]
                        saved.append(lm.lm_head.output[:, -1].save())
            grid.append([float(patching.logit_diff(s, right, wrong).mean()) for s in saved])
    return torch.tensor(grid)


def transformer_lens_sweep(path, ids, right, wrong, site: str, layers: list[int]) -> torch.Tensor:
    """The library's own sweeps (every layer: they take no subset), one forward pass per patch."""
    from transformer_lens import patching as tl_patching
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode()

    def metric(logits):
        return patching.logit_diff(logits, right, wrong).mean()

    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids["clean"])
        if site == "resid_pre":
            grid = tl_patching.get_act_patch_resid_pre(bridge, ids["corrupt"], cache, metric)
        else:
            grid = tl_patching.get_act_patch_attn_head_out_all_pos(bridge, ids["corrupt"], cache, metric)
    return grid[layers].float()


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
    path = converted_path("smollm2-135m")
    clean, corrupt, right, wrong = ioi_pairs(model, args.prompts, "s2")
    ids = {"clean": model.tokenize(clean)["input_ids"], "corrupt": model.tokenize(corrupt)["input_ids"]}
    layers = list(range(model.n_layers))  # TransformerLens's sweeps take no layer subset
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
            grid, pwall, pcpu = timed(lambda: PEERS[name](path, ids, right, wrong, site, layers))
            print(f"| {label} | {name} {_version(DIST[name])} | {grid.numel()} | {pwall:.1f} | {pcpu:.1f} | "
                  f"{pcpu / cpu:.1f}x | {float((grid - ours).abs().max()):.1e} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
