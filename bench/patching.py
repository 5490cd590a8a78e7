"""Batched activation-patching sweep vs the one-forward-per-patch loop, on the real model.

Two sweeps on IOI-style prompt pairs: ``resid_pre`` over ``(layer, position)`` and
``attn_z`` over ``(layer, head)``. The corruption is ``s2`` (the corrupted prompt repeats the
other name at S2, so the answer flips and the pair shares every token before S2) or ``abc``
(all three names replaced by other names, so the pair differs from the first name on). Each
sweep is run by ``interpbook.patching.sweep`` (many patched copies of the corrupted batch in one
forward pass, ``rows=`` edits; each copy starts at its patched layer and at the first position
its patch changes, from the corrupted run's residual stream and key/value cache) and by
``interpbook.patching.sweep_naive`` (one forward pass per patch, the last-position logits
over the whole vocabulary, as a reader's loop would score them; the batched sweep is given
``patching.LogitDiff``, which lets it unembed only the answer and wrong ids), and the two
result grids are compared (max |diff|). Reported: wall and process-CPU seconds of each
(medians over ``--rounds``, the two alternating in order), and their ratios (CPU ratios are the least disturbed when other processes share the cores).

Usage: ``python bench/patching.py [--model NAME] [--prompts 8] [--layer-step 1] [--rounds 1]
[--corruption s2] [--batch-size 64] [--threads N] [--sweeps resid_pre:pos attn_z:head]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import platform
import time
from datetime import datetime, timezone

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import interpbook as ib  # noqa: E402
from interpbook import patching  # noqa: E402

NAMES = [" Mary", " John", " Tom", " James", " Anna", " David", " Sarah", " Paul", " Emma", " Mark"]
TEMPLATE = "When{a} and{b} went to the store,{s} gave a drink to"


def ioi_pairs(model, n: int, corruption: str = "s2"):
    """``n`` clean/corrupted prompt pairs with single-token names, and the answer ids."""
    names = [x for x in NAMES if len(model.tokenizer(x, add_special_tokens=False)["input_ids"]) == 1]
    clean, corrupt, right, wrong = [], [], [], []
    for i in range(n):
        a, b = names[(2 * i) % len(names)], names[(2 * i + 1) % len(names)]
        clean.append(TEMPLATE.format(a=a, b=b, s=b))
        if corruption == "s2":
            corrupt.append(TEMPLATE.format(a=a, b=b, s=a))
        else:
            c, d = names[(2 * i + 2) % len(names)], names[(2 * i + 3) % len(names)]
            corrupt.append(TEMPLATE.format(a=c, b=d, s=c))
        right.append(model.token_id(a))
        wrong.append(model.token_id(b))
    return clean, corrupt, right, wrong


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name (default: INTERPBOOK_MODEL or smollm2-135m)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds (medians are reported)")
    parser.add_argument("--corruption", choices=["s2", "abc"], default="s2")
    parser.add_argument("--layer-step", type=int, default=1, help="sweep every n-th layer (1: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batched forward pass")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sweeps", nargs="+", default=["resid_pre:pos", "attn_z:head"],
                        help="site:over pairs to time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = ib.load_model(args.model)
    clean, corrupt, right, wrong = ioi_pairs(model, args.prompts, args.corruption)
    n_tokens = model.tokenize(clean)["input_ids"].shape[1]

    def metric(logits):  # what a reader's loop scores: last-position logits over the vocabulary
        return patching.logit_diff(logits, right, wrong)

    columns = patching.LogitDiff(right, wrong)  # the same metric; the sweep unembeds only its ids

    layers = list(range(0, model.n_layers, args.layer_step))
    load = os.getloadavg()[0]
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} logical CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f}")
    print(f"{model.name}: {args.prompts} prompt pairs x {n_tokens} tokens ({args.corruption} corruption), "
          f"{len(layers)} layers, batch size {args.batch_size} rows, {args.rounds} round(s)\n")
    print("| sweep | patches | naive s (wall / CPU) | batched s (wall / CPU) | speed-up wall | speed-up CPU | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for site, over in (s.split(":") for s in args.sweeps):
        common = dict(over=over, layers=layers)
        patching.sweep(model, clean, corrupt, site, metric, layers=layers[:1], over=over)  # warm-up
        times = {"fast": [], "slow": []}
        runs = {"fast": lambda: patching.sweep(model, clean, corrupt, site, columns, batch_size=args.batch_size,
                                               **common),
                "slow": lambda: patching.sweep_naive(model, clean, corrupt, site, metric, **common)}
        for r in range(args.rounds):
            for name in (["fast", "slow"] if r % 2 == 0 else ["slow", "fast"]):
                out, wall, cpu = timed(runs[name])
                times[name].append((wall, cpu))
                if name == "fast":
                    fast = out
                else:
                    slow = out
        (fw, fc), (sw, sc) = ([statistics.median(x) for x in zip(*times[k])] for k in ("fast", "slow"))
        diff = float((fast - slow).abs().max())
        print(f"| {site} x {over} | {fast.numel()} | {sw:.1f} / {sc:.1f} | {fw:.1f} / {fc:.1f} | "
              f"{sw / fw:.1f}x | {sc / fc:.1f}x | {diff:.1e} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
