"""Cost of caching every residual stream, side by side in one run on SmolLM2-135M.

Methods (same left-padded batch of token ids, same weights, ``torch.inference_mode()``):

* ``raw HF forward``      ``model.hf(**inputs, use_cache=False)``: the baseline, nothing recorded.
* ``interpbook``          ``model.run(tokens, cache="resid_post")``: the 30 ``resid_post``.
* ``nnsight``             ``NNsight(hf)``; ``.save()`` of every decoder layer's output in ``trace``.
* ``TransformerLens``     ``TransformerBridge.boot_transformers(<local dir>)``;
                          ``run_with_cache(..., names_filter=<the 30 blocks.*.hook_resid_post>)``.

Each peer wraps its own copy of the same float32 weights (loaded from the directory that
``interpbook.load_model()`` converts once), so no peer's wrapping can slow down another's model.
Timings: warm-up calls, then ``--rounds`` rounds in which every method runs once, the order
rotated and reversed from round to round; median and IQR per method, the ratio of medians to
the raw forward, and the median of the per-round ratios (robust to load drifting during the
run), and the ratio of median process CPU times (user+sys of all threads: less sensitive
to other processes competing for the cores than wall time). Memory: one fresh subprocess per method (see ``measure_memory``). Before timing, every
method's residual streams are compared with interpbook's (max abs difference) and the raw
forward's logits with interpbook's, so that all rows do the same work.

Usage: ``python bench/tracing.py [--batch 8] [--seq 32] [--rounds 20] [--quick] [--no-memory]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

TEXT = (
    "Mechanistic interpretability tries to reverse engineer the computations a neural network "
    "has learned. A transformer reads a sequence of tokens, turns each into a vector, and then "
    "a stack of blocks adds the outputs of attention and of a small feed-forward network to this "
    "running sum, which is called the residual stream. Attention heads move information between "
    "positions; the feed-forward layers act on each position alone and are thought to store much "
    "of what the model knows. To study a model we record these vectors while it runs, compare "
    "them across prompts, project them onto the vocabulary with the unembedding, and edit them to "
    "see which parts of the computation matter for a given behaviour. The capital of France is "
    "Paris, the Eiffel Tower stands on the Champ de Mars, and a model that completes such facts "
    "must retrieve them from somewhere in its weights. Careful experiments, honest baselines and "
    "small models that fit on a laptop make these questions something a student can test."
)

METHODS = ["raw HF forward", "interpbook", "nnsight", "TransformerLens"]
MiB = 2**20


# --- setup ------------------------------------------------------------------------------
def load():
    import interpbook
    from interpbook.models import converted_path

    model = interpbook.load_model()
    return model, converted_path("smollm2-135m")


def make_tokens(model, batch: int, seq: int, seed: int = 0) -> dict:
    """``batch`` windows of the fixed text, seeded, of ``seq - 0..seq/4`` tokens, left-padded."""
    ids = model.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    while len(ids) < seq + 1:
        ids = ids + ids
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        n = seq if i == 0 else seq - int(torch.randint(0, seq // 4 + 1, (1,), generator=g))
        start = int(torch.randint(0, len(ids) - n + 1, (1,), generator=g))
        rows.append(ids[start:start + n])
    pad = model.tokenizer.pad_token_id
    input_ids = torch.full((batch, seq), pad, dtype=torch.long)
    mask = torch.zeros((batch, seq), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, seq - len(r):] = torch.tensor(r)
        mask[i, seq - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@dataclass
class Method:
    name: str
    call: Callable | None = None             # () -> whatever the user gets back
    resid: Callable | None = None            # result -> [layer, batch, pos, d_model]
    logits: Callable | None = None           # result -> logits (raw row only)
    status: str = "ok"                       # "ok", "not installed", "failed: ..."
    modules: list = field(default_factory=list)  # torch modules whose weights the method reads
    version: str = ""
    times: list = field(default_factory=list)  # wall-clock seconds per call
    cpu: list = field(default_factory=list)    # process CPU seconds (all threads) per call


def _hf_copy(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def setup(name: str, model, path, tokens: dict) -> Method:
    inputs = model.forward_inputs(tokens)  # input_ids, attention_mask, position_ids (skip padding)
    n = model.n_layers
    m = Method(name)
    try:
        if name == "raw HF forward":
            m.version = f"(transformers {_version('transformers')})"
            m.modules = [model.hf]
            m.call = lambda: model.hf(**inputs, use_cache=False)
            m.logits = lambda out: out.logits
        elif name == "interpbook":
            m.version = _version("interpbook")
            m.modules = [model.hf]
            m.call = lambda: model.run(tokens, cache="resid_post")
            m.resid = lambda run: run.cache.stack("resid_post")
            m.logits = lambda run: run.logits
        elif name == "nnsight":
            try:
                from nnsight import NNsight
            except ImportError:
                m.status = "not installed"
                return m
            m.version = _version("nnsight")
            hf = _hf_copy(path)
            m.modules = [hf]
            wrapped = NNsight(hf)

            def call():
                saved = []
                with wrapped.trace(**inputs, use_cache=False):
                    for layer in wrapped.model.layers:
                        saved.append(layer.output.save())
                return saved

            m.call = call
            m.resid = lambda saved: torch.stack([s[0] if isinstance(s, tuple) else s for s in saved])
        elif name == "TransformerLens":
            try:
                from transformer_lens.model_bridge import TransformerBridge
            except ImportError:
                m.status = "not installed"
                return m
            m.version = f"{_version('transformer-lens')} (TransformerBridge)"
            bridge = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
            m.modules = [bridge]
            names = {f"blocks.{i}.hook_resid_post" for i in range(n)}
            missing = names - set(bridge.hook_dict)
            if missing:
                raise RuntimeError(f"bridge has no hook {sorted(missing)[0]}")

            def call():
                return bridge.run_with_cache(
                    inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    position_ids=inputs["position_ids"], names_filter=lambda h: h in names)

            m.call = call
            m.resid = lambda out: torch.stack([out[1][f"blocks.{i}.hook_resid_post"] for i in range(n)])
        else:
            raise ValueError(name)
    except Exception as e:  # a broken peer must not sink the whole benchmark
        m.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        m.call = None
    return m


def run_method(m: Method):
    with torch.inference_mode():
        return m.call()


# --- memory -----------------------------------------------------------------------------
def _proc_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def memory_child(name: str, batch: int, seq: int, threads: int) -> dict:
    """Runs in a fresh process: load, set up ``name``, one warm-up call, then one measured call.

    ``before``: RSS once everything is loaded and set up and the method's weights are paged
    in (the safetensors are memory-mapped, so a first forward would otherwise count the
    weights themselves), before the first call. ``peak``:
    high-water RSS during the measured (second) call (Linux VmHWM, reset through
    /proc/self/clear_refs after the warm-up) minus ``before``: the extra memory a call needs
    at its worst, outputs and anything the method keeps between calls included. ``held``: RSS
    after the call with its result still alive, minus ``before``. ``cache``: bytes of the
    residual-stream tensors the method hands back.
    The parent starts this process with a fixed glibc mmap threshold so freed tensor memory
    goes back to the OS and RSS follows live memory.
    """
    torch.set_num_threads(threads)
    model, path = load()
    tokens = make_tokens(model, batch, seq)
    m = setup(name, model, path, tokens)
    if m.call is None:
        return {"status": m.status}
    with torch.inference_mode():  # safetensors are mmapped: page the weights in first
        for mod in m.modules:
            for t in [*mod.parameters(), *mod.buffers()]:
                t.sum()
    gc.collect()
    before = _proc_kib("VmRSS")
    out = run_method(m)  # warm-up (lazy initialisation; its peak is not counted)
    del out
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm_ok = True
    except OSError:
        hwm_ok = False
    out = run_method(m)
    peak = _proc_kib("VmHWM") if hwm_ok else None
    held = _proc_kib("VmRSS")
    cache = m.resid(out).numel() * 4 if m.resid else 0  # stacked copy's size = bytes held (fp32)
    return {"status": "ok", "peak": None if peak is None else (peak - before) * 1024,
            "held": (held - before) * 1024, "cache": cache}


def measure_memory(name: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", name, "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        last = [line for line in p.stdout.splitlines() if line.startswith("{")]
        if p.returncode or not last:
            return {"status": "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1][:80]}
        return json.loads(last[-1])
    except Exception as e:
        return {"status": f"failed: {e}"}


# --- report -----------------------------------------------------------------------------
def quartiles(xs):
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[1], q[2]


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, Python {platform.python_version()}"


def mb(x):
    return "n/a" if x is None else f"{x / MiB:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="batch 4 x 16 tokens, 5 rounds, 1 warm-up")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    ap.add_argument("--_memory", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.rounds, args.warmup = 4, 16, 5, 1

    if args._memory:
        print(json.dumps(memory_child(args._memory, args.batch, args.seq, args.threads)))
        return 0

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, path = load()
    tokens = make_tokens(model, args.batch, args.seq)
    real = int(tokens["attention_mask"].sum())
    print(f"# interpbook tracing benchmark — {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"machine: {machine()}")
    print(f"torch.set_num_threads({args.threads}); load average {os.getloadavg()[0]:.2f} at start")
    print(f"model: {model!r}")
    print(f"batch {args.batch} x {args.seq} positions, left-padded ({real} real tokens), float32, "
          f"inference_mode; {args.warmup} warm-up + {args.rounds} timed rounds")

    methods = [setup(name, model, path, tokens) for name in METHODS]
    live = [m for m in methods if m.call is not None]

    # correctness: everyone records the same residual streams
    check = {}
    ref = run_method(methods[1]) if methods[1].call else None
    for m in live:
        if ref is None:
            check[m.name] = "n/a"
            continue
        out = run_method(m)
        if m.resid:
            d = (m.resid(out) - methods[1].resid(ref)).abs().max().item()
            check[m.name] = f"resid {d:.1e}"
        else:
            d = (m.logits(out) - methods[1].logits(ref)).abs().max().item()
            check[m.name] = f"logits {d:.1e}"
        del out
    shape = tuple(methods[1].resid(ref).shape) if ref is not None else None
    del ref
    print(f"recorded per method: resid_post at every layer, stacked {shape} "
          "(nothing for the raw forward: its row checks logits)")

    for _ in range(args.warmup):
        for m in live:
            run_method(m)
    for r in range(args.rounds):
        order = live[r % len(live):] + live[:r % len(live)]
        if r % 2:
            order = order[::-1]
        for m in order:
            gc.collect()
            c, t = time.process_time(), time.perf_counter()
            out = run_method(m)
            m.times.append(time.perf_counter() - t)
            m.cpu.append(time.process_time() - c)
            del out
    load_end = os.getloadavg()[0]

    mem = {}
    if not args.no_memory:
        for m in methods:
            mem[m.name] = measure_memory(m.name, args) if m.call else {"status": m.status}

    raw = methods[0]
    raw_med = statistics.median(raw.times) if raw.times else None
    print()
    print("| method | median ms | IQR ms | x raw (medians) | x raw (paired) | CPU x raw | peak extra MiB | held MiB | cache MiB | check vs interpbook |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in methods:
        label = f"{m.name} {m.version}".strip()
        if m.call is None:
            print(f"| {label} | {m.status} | | | | | | | | |")
            continue
        q1, med, q3 = quartiles(m.times)
        ratio = f"{med / raw_med:.2f}" if raw_med else "n/a"
        paired = f"{statistics.median(t / b for t, b in zip(m.times, raw.times)):.2f}" if raw.times else "n/a"
        cpu = f"{statistics.median(m.cpu) / statistics.median(raw.cpu):.2f}" if raw.cpu else "n/a"
        mm = mem.get(m.name, {})
        if mm.get("status", "ok") == "ok" and mm:
            mcols = f"{mb(mm['peak'])} | {mb(mm['held'])} | {mb(mm['cache'])}"
        else:
            mcols = f"{mm.get('status', 'skipped')} | | "
        print(f"| {label} | {med * 1e3:.0f} | {(q3 - q1) * 1e3:.0f} | {ratio} | {paired} | {cpu} | {mcols} | {check[m.name]} |")
    print()
    print(f"load average {load_end:.2f} at the end of timing; total wall time {time.perf_counter() - t0:.0f} s")
    ib = methods[1]
    if ib.times and raw_med:
        r = statistics.median(ib.times) / raw_med
        peers = [statistics.median(m.times) for m in methods[2:] if m.times]
        faster = all(statistics.median(ib.times) < p for p in peers)
        print(f"target interpbook <= 1.10x raw: {'met' if r <= 1.10 else 'MISSED'} ({r:.2f}x); "
              f"faster than {'all' if faster else 'NOT all'} {len(peers)} measured peer(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
