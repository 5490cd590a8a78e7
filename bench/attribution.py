"""Attribution patching vs activation patching of every attention head, side by side.

On IOI prompts and their ABC corruptions (``interpbook.circuits.ioi_dataset``), the effect
of patching each head's corrupted output (``attn_z``) into the clean run, on the mean
logit difference, is computed three ways:

* **attribution patching**: one clean forward pass with gradients, one backward pass and
  one corrupted forward pass; the effect of head ``h`` is ``(z_corrupt - z_clean) . dm/dz``
  summed over prompts, positions and the head's dimensions;
* **attribution patching at the midpoint**: the same product with the gradient taken at the
  run whose embeddings lie halfway between corrupt and clean (integrated gradients with one
  midpoint step; one more forward pass for ``z_clean``, batched with the corrupted one);
* **activation patching, batched**: ``interpbook.patching.sweep`` over ``(layer, head)``;
* **activation patching, naive** (``--naive``): ``interpbook.patching.sweep_naive``, one
  forward pass per head.

Reported: wall and process-CPU seconds, activation patching's CPU time over each method's, the
Pearson correlation of each estimate with activation patching's per-head effects and how many
of the top-10 heads (by |effect|) they share. Then the
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
from interpbook.tracing import patch  # noqa: E402


def timed(fn):
    """``fn()``, its wall seconds and its process-CPU seconds."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def attribution_patching(model, ds, alpha: float = 1.0) -> torch.Tensor:
    """First-order effect of patching each head's ABC output into the clean run ``[layer, head]``:
    ``(z_corrupt - z_clean) . dm/dz``, the gradient taken at the clean run (``alpha=1``, the usual
    attribution patching: that run also gives ``z_clean``) or at the run whose embeddings are
    ``alpha`` of the way from corrupt to clean (``alpha=0.5``: integrated gradients with one
    midpoint step, one more forward pass for ``z_clean``)."""
    both = list(ds.corrupt) + (list(ds.prompts) if alpha != 1.0 else [])
    with torch.no_grad():  # corrupt (and clean) in one pass
        cache = model.run(both, cache=["attn_z", ("resid_pre", 0)]).cache
    n = len(ds)
    part = lambda key, i: cache[key][i * n:(i + 1) * n]
    edits = [] if alpha == 1.0 else [patch(("resid_pre", 0), part(("resid_pre", 0), 0).lerp(part(("resid_pre", 0), 1), alpha))]
    run = model.run(ds.prompts, cache="attn_z", grad=True, edits=edits, last_only=True)
    zs = [run.cache["attn_z", layer] for layer in range(model.n_layers)]
    grads = torch.autograd.grad(ds.metric(run.last_logits), zs)
    clean = [z.detach() for z in zs] if alpha == 1.0 else [part(("attn_z", layer), 1) for layer in range(model.n_layers)]
    return torch.stack([((part(("attn_z", layer), 0) - c) * g).sum((0, 1, 3))
                        for layer, (c, g) in enumerate(zip(clean, grads))])


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

    attribution_patching(model, ds.select(slice(0, 2)))  # warm-up
    attr, w_attr, c_attr = timed(lambda: attribution_patching(model, ds))
    mid, w_mid, c_mid = timed(lambda: attribution_patching(model, ds, alpha=0.5))
    act, w_act, c_act = timed(lambda: patching.sweep(model, ds.corrupt, ds.prompts, "attn_z", ds.metric,
                                                     over="head") - clean)
    rows.append(("attribution patching (1 fwd, 1 fwd+bwd)", w_attr, c_attr, agreement(attr, act)))
    rows.append(("attribution patching at the midpoint (1-step IG: 1 fwd of 2n rows, 1 fwd+bwd)", w_mid, c_mid,
                 agreement(mid, act)))
    rows.append(("activation patching, batched sweep", w_act, c_act, None))
    if args.naive:
        naive, w_naive, c_naive = timed(lambda: patching.sweep_naive(model, ds.corrupt, ds.prompts, "attn_z",
                                                                     ds.metric, over="head") - clean)
        rows.append(("activation patching, one pass per head", w_naive, c_naive, None))
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
    print("| method | wall s | CPU s | activation patching's CPU s / this | Pearson r with activation patching | "
          "top-10 heads shared |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, w, c, agree in rows:
        corr = "" if agree is None else f"{agree[0]:.3f}"
        share = "" if agree is None else f"{agree[1]}/10"
        print(f"| {name} | {w:.2f} | {c:.2f} | {c_act / c:.1f}x | {corr} | {share} |")
    print("\n| edge attribution | wall s | CPU s |")
    print("|---|---|---|")
    print(f"| EAP (2 recording passes + 1 fwd/bwd) | {w_eap:.2f} | {c_eap:.2f} |")
    print(f"| EAP-IG, 1 step | {w_ig1:.2f} | {c_ig1:.2f} |")
    print(f"| EAP-IG, {args.steps} steps | {w_ign:.2f} | {c_ign:.2f} |")
    print(f"| EAP-IG cost per extra step | {(w_ign - w_ig1) / max(1, args.steps - 1):.2f} | "
          f"{(c_ign - c_ig1) / max(1, args.steps - 1):.2f} |")


if __name__ == "__main__":
    main()
