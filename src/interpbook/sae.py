"""Sparse autoencoders (SAEs) and transcoders on a model's activations.

An SAE rewrites an activation ``x [d_in]`` as a sparse, non-negative combination of
``d_sae`` learned directions (Cunningham et al., 2023; Bricken et al., 2023):

    z = act((x - b_dec) @ W_enc + b_enc)        # latents  [d_sae], mostly zero
    x_hat = z @ W_dec + b_dec                    # reconstruction [d_in]

``act`` is a ReLU trained with an L1 penalty on ``z`` (the original recipe) or TopK, which
keeps the ``k`` largest pre-activations (Gao et al., 2024). Decoder rows have unit norm, so
a latent's activation is its size along its direction. Names and shapes follow SAELens
(``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``), so a reader can
load the weights there. A *transcoder* (Dunefsky et al., 2024) is the same module trained
to map an MLP's input to its output (``apply_b_dec_to_input=False``, ``d_out`` the output
width).

:func:`load_or_train` collects activations of ``(site, layer)``, trains with a seeded
generator, and caches the result through :mod:`interpbook.artifacts`, so later chapters
reuse the same SAE. :func:`splice` puts the reconstruction into the forward pass as a
tracing edit, for the *loss recovered* measure.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .artifacts import cached, tensor_digest
from .corpus import docstring_passages, pack, pydoc_passages
from .lm import Model
from .models import cache_dir
from .tracing import Edit, edit

__all__ = ["SAE", "SAEConfig", "train_sae", "collect", "TrainedSAE", "load_or_train", "evaluate",
           "next_token_loss", "loss_recovered", "splice", "fvu",
           "LAYER_FRACTION", "SAE_CONFIG", "sae_layer", "shared_windows", "shared_sae"]


class SAE(nn.Module):
    """A sparse autoencoder (or, with ``d_out``/``apply_b_dec_to_input=False``, a transcoder)."""

    def __init__(self, d_in: int, d_sae: int, activation: str = "topk", k: int | None = None, *,
                 d_out: int | None = None, apply_b_dec_to_input: bool = True, seed: int = 0):
        super().__init__()
        if activation not in ("topk", "relu"):
            raise ValueError(f"activation must be 'topk' or 'relu'; got {activation!r}.")
        if activation == "topk" and (k is None or not 0 < k <= d_sae):
            raise ValueError(f"A TopK SAE needs 0 < k <= d_sae={d_sae}; got k={k}.")
        if activation == "relu" and k is not None:
            raise ValueError("k is for activation='topk'; a ReLU SAE's sparsity comes from its L1 penalty.")
        d_out = d_in if d_out is None else d_out
        if apply_b_dec_to_input and d_out != d_in:
            raise ValueError(f"Subtracting b_dec from the input needs d_out == d_in; got {d_out} != {d_in}.")
        self.d_in, self.d_sae, self.d_out, self.activation, self.k = d_in, d_sae, d_out, activation, k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_sae, d_out, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # encoder starts as the decoder's transpose (Gao et al.), rescaled to the input width
        W_enc = W_dec.T.clone() if d_out == d_in else torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_out))

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"This SAE reads vectors of width d_in={self.d_in}; got shape {tuple(x.shape)}.")

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc`` (the ``- b_dec`` only for an autoencoder)."""
        self._check(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` (TopK: at most ``k`` non-zero per vector)."""
        pre = self.pre_activations(x)
        if self.activation == "relu":
            return torch.relu(pre)
        values, index = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, torch.relu(values))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ W_dec + b_dec``: back to activation space ``[..., d_out]``."""
        if z.shape[-1] != self.d_sae:
            raise ValueError(f"This SAE has d_sae={self.d_sae} latents; got shape {tuple(z.shape)}.")
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``decode(encode(x))`` ``[..., d_out]``."""
        if self.activation == "relu":
            return self.decode(self.encode(x))
        # TopK: decode only the k chosen rows (k * d_out per vector instead of d_sae * d_out)
        values, index = self.pre_activations(x).topk(self.k, dim=-1)
        return torch.einsum("...k,...kd->...d", torch.relu(values), self.W_dec[index]) + self.b_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (the constraint SAELens and the papers keep)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_scales(self, c_in: float, c_out: float) -> None:
        """Turn an SAE trained on ``c_in * x -> c_out * y`` into one on raw ``x -> y`` with
        the same unit-norm decoder (latents are divided by ``c_out``)."""
        self.W_enc *= c_in / c_out
        self.b_enc /= c_out
        self.b_dec /= c_out


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: ``|x - x_hat|^2 / |x - mean(x)|^2`` over a batch."""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@dataclass(frozen=True)
class SAEConfig:
    """Hyper-parameters of one training run (every field enters the cache key)."""

    expansion: int = 4           # d_sae = expansion * d_in
    activation: str = "topk"
    k: int | None = 32
    l1_coeff: float = 0.0        # ReLU SAEs: lambda in |x - x_hat|^2 + lambda |z|_1 (inputs at norm sqrt(d_in))
    lr: float = 1e-3
    steps: int = 300
    batch_size: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.expansion < 1 or self.lr <= 0:
            raise ValueError(f"steps, batch_size, expansion and lr must be positive; got {self}.")
        if self.activation == "relu" and self.l1_coeff <= 0:
            raise ValueError("A ReLU SAE needs l1_coeff > 0 (its only source of sparsity).")


def _mean_norm_scale(x: torch.Tensor) -> float:
    """The factor that makes the mean vector norm ``sqrt(width)`` (Gao et al.; SAELens)."""
    return float(x.shape[-1] ** 0.5 / x.norm(dim=-1).mean())


def train_sae(inputs: torch.Tensor, config: SAEConfig = SAEConfig(), targets: torch.Tensor | None = None,
              ) -> tuple[SAE, dict[str, list[float]]]:
    """Train an SAE on ``inputs [n, d_in]`` (a transcoder when ``targets [n, d_out]`` are given).

    Adam on the mean squared error (plus the L1 penalty for ReLU), inputs and targets scaled
    to mean norm ``sqrt(width)`` during training and the scales folded back at the end,
    decoder rows renormalised after every step. Deterministic for a fixed seed and thread
    count. Returns the SAE and its history: per-step training ``fvu`` and ``l0``.
    """
    if inputs.dim() != 2 or (targets is not None and (targets.dim() != 2 or len(targets) != len(inputs))):
        raise ValueError(f"inputs must be [n, d_in] (targets [n, d_out], same n); got {tuple(inputs.shape)}"
                         + ("" if targets is None else f" and {tuple(targets.shape)}") + ".")
    transcoder = targets is not None
    targets = inputs if targets is None else targets
    c_in, c_out = _mean_norm_scale(inputs), _mean_norm_scale(targets)
    x_all, y_all = inputs.float() * c_in, targets.float() * c_out
    sae = SAE(inputs.shape[1], config.expansion * inputs.shape[1], config.activation, config.k,
              d_out=targets.shape[1], apply_b_dec_to_input=not transcoder, seed=config.seed)
    with torch.no_grad():
        sae.b_dec.copy_(y_all.mean(0))     # start the decoder bias at the data mean
    opt = torch.optim.Adam(sae.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    history: dict[str, list[float]] = {"fvu": [], "l0": []}
    order = torch.randperm(len(x_all), generator=g)
    for step in range(config.steps):
        start = (step * config.batch_size) % len(order)
        if start + config.batch_size > len(order):
            order, start = torch.randperm(len(x_all), generator=g), 0
        idx = order[start:start + config.batch_size]
        x, y = x_all[idx], y_all[idx]
        if config.activation == "topk":
            y_hat, l0, sparsity = sae(x), float(config.k), 0.0
        else:
            z = sae.encode(x)
            y_hat, l0, sparsity = sae.decode(z), float((z > 0).sum(-1).float().mean().detach()), z.sum(-1).mean()
        err = (y_hat - y).pow(2).sum(-1).mean()
        loss = (err + config.l1_coeff * sparsity) / y.shape[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.normalize_decoder()
        history["fvu"].append(float(err.detach() / (y - y.mean(0)).pow(2).sum(-1).mean()))
        history["l0"].append(l0)
    sae.fold_scales(c_in, c_out)
    sae.requires_grad_(False)
    return sae, history


@torch.no_grad()
def collect(model: Model, windows: torch.Tensor, sites: Sequence[tuple[str, int]], *, skip: int = 1,
            batch_size: int = 16) -> list[torch.Tensor]:
    """Activations of each of ``sites`` at every position ``>= skip`` of ``windows [n, seq_len]``,
    from one forward pass per batch: one ``[n * (seq_len - skip), width]`` tensor per site."""
    if windows.dim() != 2 or not 0 <= skip < windows.shape[1]:
        raise ValueError(f"windows must be [n, seq_len] with seq_len > skip={skip}; got {tuple(windows.shape)}.")
    sites = [tuple(s) for s in sites]
    out: list[list[torch.Tensor]] = [[] for _ in sites]
    for start in range(0, len(windows), batch_size):
        cache = model.run(windows[start:start + batch_size], cache=sites, stop_early=True).cache
        for parts, site in zip(out, sites):
            parts.append(cache[site][:, skip:].flatten(0, 1).float())
    return [torch.cat(parts) for parts in out]


_LAYER_SITES = ("resid_mid", "mlp_out", "resid_post")
_LAST_COLLECTED: dict[tuple, dict[str, torch.Tensor]] = {}


def _layer_activations(model: Model, windows: torch.Tensor, layer: int, skip: int, corpus: str
                       ) -> dict[str, torch.Tensor]:
    """``resid_mid``, ``mlp_out`` and ``resid_post`` of ``layer`` from one pass over ``windows``.

    The last result is kept in memory, so training several SAEs and a transcoder on the
    same layer and tokens (a cold cache) reads the model once."""
    key = (model.name, id(model), layer, skip, corpus)
    if key not in _LAST_COLLECTED:
        _LAST_COLLECTED.clear()
        acts = collect(model, windows, [(name, layer) for name in _LAYER_SITES], skip=skip)
        _LAST_COLLECTED[key] = dict(zip(_LAYER_SITES, acts))
    return _LAST_COLLECTED[key]


@dataclass
class TrainedSAE:
    """An SAE, its training history, and where it reads (and, for a transcoder, writes)."""

    sae: SAE
    history: dict[str, list[float]]
    site: tuple[str, int]
    out_site: tuple[str, int] | None = None


def load_or_train(model: Model, layer: int, windows: torch.Tensor, configs: SAEConfig | Sequence[SAEConfig] = SAEConfig(),
                  *, site: str = "resid_post", transcoder: bool = False, skip: int = 1):
    """The SAE of ``(site, layer)`` trained on ``windows``, from the cache when it is there
    (a list of them for a list of ``configs``; activations are collected once, on a miss).

    With ``transcoder=True`` it maps the MLP's normalised input (the model's own MLP norm
    applied to ``resid_mid``) to ``mlp_out`` at ``layer`` instead. Cached under
    ``$INTERPBOOK_CACHE/sae/`` keyed on the model's name and shape, ``layer``, the site,
    every field of the config, ``skip`` and a digest of the token ids (see
    :func:`interpbook.artifacts.cached`).
    """
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"layer {layer} is outside 0..{model.n_layers - 1} for {model.name}.")
    if site not in _LAYER_SITES:
        raise ValueError(f"SAEs here read one of {_LAYER_SITES}; got site={site!r}.")
    single = isinstance(configs, SAEConfig)
    configs = [configs] if single else list(configs)
    in_site = ("resid_mid", layer) if transcoder else (site, layer)
    out_site = ("mlp_out", layer) if transcoder else None
    corpus = tensor_digest(windows.to(torch.int64))

    def activations() -> tuple[torch.Tensor, torch.Tensor | None]:
        acts = _layer_activations(model, windows, layer, skip, corpus)
        if transcoder:
            with torch.no_grad():
                return model.anatomy.ln2(layer)(acts["resid_mid"]), acts["mlp_out"]
        return acts[site], None

    def trainer(config: SAEConfig):
        def train() -> dict:
            x, y = activations()
            with torch.enable_grad():
                sae, history = train_sae(x, config, y)
            return {"state": sae.state_dict(), "d_out": sae.d_out, "history": history}
        return train

    results = []
    for config in configs:
        spec = {"model": model.name, "n_layers": model.n_layers, "d_model": model.d_model, "site": list(in_site),
                "transcoder": transcoder, "skip": skip, "config": dataclasses.asdict(config), "corpus": corpus,
                "format": 1}
        saved = cached("sae", model.name, spec, trainer(config))
        d_in, d_sae = saved["state"]["W_enc"].shape
        sae = SAE(d_in, d_sae, config.activation, config.k, d_out=saved["d_out"], apply_b_dec_to_input=not transcoder)
        sae.load_state_dict(saved["state"])
        sae.requires_grad_(False)
        results.append(TrainedSAE(sae, saved["history"], in_site, out_site))
    return results[0] if single else results


@torch.no_grad()
def evaluate(sae: SAE, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out quality: ``fvu`` of the output (against ``y`` for a transcoder), mean ``l0``
    (latents active per token), and the fraction of ``dead`` latents (never active on ``x``)."""
    z = sae.encode(x)
    active = z > 0
    return {"fvu": fvu(x if y is None else y, sae.decode(z)), "l0": float(active.sum(-1).float().mean()),
            "dead": float((~active.any(0)).float().mean())}


@torch.no_grad()
def next_token_loss(model: Model, windows: torch.Tensor, edits: Sequence[Edit] = (), *, skip: int = 1) -> float:
    """Mean next-token cross-entropy (nats) over positions ``>= skip`` of ``windows``, with
    ``edits`` applied; batches keep ``batch * seq_len * vocab`` near 2^24 logits."""
    batch = max(1, 2 ** 24 // (windows.shape[1] * model.d_vocab))
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch]
        logits = model.run(ids, edits=edits).logits[:, skip:-1].float()
        targets = ids[:, skip + 1:].to(logits.device)
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return total / count


def loss_recovered(model: Model, sae: SAE, site: tuple[str, int], windows: torch.Tensor, *,
                   mean: torch.Tensor | None = None, clean: float | None = None, skip: int = 1) -> dict[str, float]:
    """Next-token loss with the SAE spliced in, against the clean run and ablations.

    ``recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)``: 1 when splicing
    costs nothing, 0 when it is as bad as the ablation. Zero ablation (SAELens's "CE loss
    score") replaces ``site`` at positions ``>= skip`` by zeros; with ``mean`` given, mean
    ablation (replacing it by ``mean``) is reported too. Pass ``clean`` (the unedited
    loss) to skip recomputing it for a second SAE.
    """
    def ablation(fill) -> Edit:
        return edit(site, lambda x: torch.cat([x[:, :skip], fill(x[:, skip:])], 1))

    ce = {"clean": next_token_loss(model, windows, skip=skip) if clean is None else clean,
          "spliced": next_token_loss(model, windows, [splice(sae, site, skip=skip)], skip=skip)}
    ablations = {"zero": ablation(torch.zeros_like)}
    if mean is not None:
        ablations["mean"] = ablation(lambda x: mean.to(x).expand_as(x))
    for name, e in ablations.items():
        ce[f"{name}-ablated"] = next_token_loss(model, windows, [e], skip=skip)
        ce[f"recovered ({name})"] = (ce[f"{name}-ablated"] - ce["spliced"]) / (ce[f"{name}-ablated"] - ce["clean"])
    return ce


def splice(sae: SAE, site: tuple[str, int], *, skip: int = 1) -> Edit:
    """A tracing edit that replaces ``site`` by the SAE's reconstruction at positions ``>= skip``
    (the positions it was trained on): ``model.run(ids, edits=[splice(sae, ("resid_post", L))])``."""
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :skip], sae(x[:, skip:]).to(x)], 1)

    return edit(site, reconstruct)


# --- the book's SAE, shared by weeks 7 and 8 ------------------------------------------------
#: Depth of the SAE's residual-stream layer as a fraction of the model's layers (weeks 7 and 8).
LAYER_FRACTION = 0.5
#: The TopK SAE of weeks 7 and 8 (one spec, so both pages get the same cache entry).
SAE_CONFIG = SAEConfig(expansion=4, activation="topk", k=32, lr=2e-3, steps=240, batch_size=256)
_PACKAGES = ("transformers", "torch")


def sae_layer(model: Model) -> int:
    """The SAE's layer: :data:`LAYER_FRACTION` of the model's depth, rounded."""
    return round(LAYER_FRACTION * model.n_layers)


def shared_windows(model: Model, heldout_tokens: int = 8_192, seq_len: int = 64) -> dict[str, torch.Tensor]:
    """The book's SAE corpus: docstrings of two installed packages and pydoc prose, shuffled
    and split by passage (3/4 train) before packing into windows: ``"train"`` (the SAE's
    training data, so the cache key is the same on every page) and ``"heldout"``
    (``heldout_tokens`` of the held-out passages)."""
    texts = [p.text for p in docstring_passages(_PACKAGES, max_words=12_000)]
    texts += [p.text for p in pydoc_passages()]
    random.Random(0).shuffle(texts)

    def encode(text):
        return model.tokenizer(text, add_special_tokens=False)["input_ids"]

    start = model.tokenizer("")["input_ids"]
    cut = 3 * len(texts) // 4
    common = dict(separator=encode("\n\n"), prefix=start)
    return {"train": pack(encode, texts[:cut], seq_len, max_tokens=8_192, **common),
            "heldout": pack(encode, texts[cut:], seq_len, max_tokens=heldout_tokens, **common)}


def shared_sae(model: Model, train_windows: torch.Tensor) -> tuple[TrainedSAE, bool]:
    """The week-7 TopK SAE at :func:`sae_layer` and whether it had to be trained now
    (``False``: it came from the cache, as it does after the week-7 page has run)."""
    folder = cache_dir() / "sae"
    before = set(folder.glob("*.pt")) if folder.exists() else set()
    trained = load_or_train(model, sae_layer(model), train_windows, SAE_CONFIG)
    return trained, bool(set(folder.glob("*.pt")) - before)
