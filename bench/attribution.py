"""Attribution patching vs activation patching of every attention head, side by side.

On IOI prompts and their ABC corruptions (``interpbook.circuits.ioi_dataset``), the effect
of patching each head's corrupted output (``attn_z``) into the clean run, on the mean
logit difference, is computed three ways:

* **attribution patching**: one clean forward pass with gradients, one backward pass and
  one corrupted forward pass; the effect of head ``h`` is ``(z_corrupt - z_clean) . dm/dz``
  summed over prompts, positions and the head's dimensions;
* **activation patching, batched**: ``interpbook.patching.sweep`` over ``(layer, head)``;
* **activation patching, naive** (``--naive``): ``interpbook.patching.sweep_naive``, one
  forward pass per head.

Reported: wall and process-CPU seconds, the time ratios, the Pearson correlation of the
per-head effects and how many of the top-10 heads (by |effect|) the two share. Then the
cost of edge attribution (``interpbook.edge_attribution``) with EAP and with EAP-IG at 1
and ``--steps`` steps, and the cost per extra IG step.

Usage: ``python bench/attribution.py [--model NAME] [--prompts 8] [--steps 5] [--naive] [--threads 1]``
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import interpbook as ib  # noqa: E402
from interpbook import circuits as C  # noqa: E402
from interpbook import edge_attribution as EA  # noqa: E402
from interpbook import patching  # noqa: E402


def timed(fn):
    """``fn()``, its wall seconds and its process-CPU seconds."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def attribution_patching(model, ds) -> torch.Tensor:
    """First-order effect of patching each head's ABC output into the clean run ``[layer, head]``."""
    with torch.no_grad():
        corrupt = model.run(ds.corrupt, cache="attn_z").cache
    run = model.run(ds.prompts, cache="attn_z", grad=True)
    zs = [run.cache["attn_z", layer] for layer in range(model.n_layers)]
    grads = torch.autograd.grad(ds.metric(run.last_logits), zs)
    return torch.stack([((corrupt["attn_z", layer] - z.detach()) * g).sum((0, 1, 3))
                        for layer, (z, g) in enumerate(zip(zs, grads))])


def agreement(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> tuple[float, int]:
    """Pearson correlation of two effect maps and the size of the overlap of their top-k by |effect|."""
    r = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
    top = lambda m: set(m.flatten().abs().topk(k).indices.tolist())
    return r, len(top(a) & top(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--naive", action="store_true", help="also time one forward pass per head")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = ib.load_model(args.model)
    ds = C.ioi_dataset(model, args.prompts, seed=0)
    clean = float(ds.metric(model.logits(ds.prompts)))
    rows = []

    attr, w_attr, c_attr = timed(lambda: attribution_patching(model, ds))
    rows.append(("attribution patching (1 fwd+bwd, 1 fwd)", w_attr, c_attr, None))
    act, w_act, c_act = timed(lambda: patching.sweep(model, ds.corrupt, ds.prompts, "attn_z", ds.metric,
                                                     over="head") - clean)
    r, shared = agreement(attr, act)
    rows.append(("activation patching, batched sweep", w_act, c_act, (r, shared)))
    if args.naive:
        naive, w_naive, c_naive = timed(lambda: patching.sweep_naive(model, ds.corrupt, ds.prompts, "attn_z",
                                                                     ds.metric, over="head") - clean)
        rows.append(("activation patching, one pass per head", w_naive, c_naive, agreement(attr, naive)))
        print(f"batched vs naive sweep: max |diff| {float((act - naive).abs().max()):.2e}")

    graph = EA.EdgeGraph.of(model)
    eap = lambda method, steps=1: EA.edge_attribution(model, ds.prompts, ds.corrupt, ds.metric, graph=graph,
                                                      method=method, steps=steps)
    _, w_eap, c_eap = timed(lambda: eap("eap"))
    _, w_ig1, c_ig1 = timed(lambda: eap("eap-ig", 1))
    _, w_ign, c_ign = timed(lambda: eap("eap-ig", args.steps))

    print(f"\n{model.name}, {len(ds)} IOI prompts (ABC corruption), {model.n_layers * model.n_heads} heads, "
          f"{graph.n_edges} edges; torch threads {args.threads}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print("| method | wall s | CPU s | wall ratio to attribution | corr. with attribution | top-10 shared |")
    print("|---|---|---|---|---|---|")
    for name, w, c, agree in rows:
        corr = "" if agree is None else f"{agree[0]:.3f}"
        share = "" if agree is None else f"{agree[1]}/10"
        print(f"| {name} | {w:.2f} | {c:.2f} | {w / w_attr:.1f}x | {corr} | {share} |")
    print("\n| edge attribution | wall s | CPU s |")
    print("|---|---|---|")
    print(f"| EAP (2 recording passes + 1 fwd/bwd) | {w_eap:.2f} | {c_eap:.2f} |")
    print(f"| EAP-IG, 1 step | {w_ig1:.2f} | {c_ig1:.2f} |")
    print(f"| EAP-IG, {args.steps} steps | {w_ign:.2f} | {c_ign:.2f} |")
    print(f"| EAP-IG cost per extra step | {(w_ign - w_ig1) / max(1, args.steps - 1):.2f} | "
          f"{(c_ign - c_ig1) / max(1, args.steps - 1):.2f} |")


if __name__ == "__main__":
    main()
