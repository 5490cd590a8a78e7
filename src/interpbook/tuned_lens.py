"""The tuned lens: the logit lens with one learned affine translator per layer.

Belrose et al. (2023) observed that the logit lens (:func:`interpbook.logit_lens`) reads
the early and middle layers badly because their residual streams are not yet in the
basis the unembedding expects. The *tuned lens* fixes the basis with a translator per
layer, an affine map trained so that the translated state, decoded by the model's own
final norm and unembedding, predicts what the model finally predicts::

    from interpbook.tuned_lens import fit_tuned_lens, pydoc_windows, tuned_lens_logits
    train, test = pydoc_windows(model, n_train=32, n_test=4)
    lens = fit_tuned_lens(model, train)                        # trained once, then cached
    logits = tuned_lens_logits(model, lens, "The capital of France is")   # [layer, 1, vocab]

Training minimises the KL divergence from the model's final next-token distribution to
the translated layer's distribution, summed over positions of ordinary text and
averaged over layers. Everything is sized for a CPU book build (a few hundred Adam steps
on a few thousand tokens of Python's documentation, see :mod:`interpbook.corpus`), with
two shortcuts the paper does not need. The KL is computed over the ``train_vocab``
tokens that carry the most final probability on the training text plus one bucket for
all other tokens, whose lens probability is estimated from a random sample of them (the
full vocabulary of a 262k-token model would cost minutes per step on a CPU). And each
translator starts from a least-squares fit where that is closer than the identity. :func:`compare_lenses` evaluates
both lenses on held-out text over the *full* vocabulary and reports how much of the
final probability the training vocabulary covered.

:func:`fit_tuned_lens` caches the trained translators under ``$INTERPBOOK_CACHE`` keyed on
the model's name, the hyper-parameters and a digest of the training tokens, written
atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .artifacts import cached, tensor_digest
from .corpus import pack, pydoc_passages
from .lm import Model, Prompts
from .sae import collect

__all__ = [
    "TunedLensConfig", "TunedLens", "pydoc_windows", "collect_states", "train_tuned_lens",
    "fit_tuned_lens", "tuned_lens_logits", "LensComparison", "compare_lenses",
]


@dataclass(frozen=True)
class TunedLensConfig:
    """Hyper-parameters of one training run (all of them enter the cache key).

    ``steps`` Adam steps on ``batch_size`` random token positions each (every layer's
    translator sees the same positions), learning rate ``lr`` decayed linearly to zero;
    the KL is taken over the ``train_vocab`` tokens with the most final probability on
    the training text plus one bucket for the rest (whose lens probability is estimated
    from as many randomly drawn other tokens); positions before ``skip`` in every window (the beginning-of-text
    token, where there is one, and the attention sink) are left out.
    """

    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    train_vocab: int = 512
    skip: int = 1
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "train_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"TunedLensConfig.{name} must be at least 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ValueError(f"TunedLensConfig.lr must be positive, got {self.lr}.")
        if self.skip < 0:
            raise ValueError(f"TunedLensConfig.skip must be >= 0, got {self.skip}.")


class TunedLens(nn.Module):
    """Translators ``h -> h + h A_l + b_l`` for layers ``0 .. n_layers - 2``.

    ``A`` and ``b`` start at zero, so an untrained tuned lens *is* the logit lens. The
    last layer needs no translator (its logit lens is the model's output) and keeps the
    identity. ``train_vocab`` holds the token ids the training KL was computed over
    (``None`` for an untrained lens).
    """

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"A tuned lens needs at least two layers, got {n_layers}.")
        self.weight = nn.Parameter(torch.zeros(n_layers - 1, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers - 1, d_model))
        self.train_vocab: torch.Tensor | None = None

    @property
    def n_layers(self) -> int:
        return self.weight.shape[0] + 1

    def _translate_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Translate ``[n_layers - 1, n, d]`` (every layer but the last) in one batched product."""
        return h + torch.baddbmm(self.bias[:, None], h, self.weight)

    def translate(self, resid: torch.Tensor) -> torch.Tensor:
        """Translated residual streams ``[n_layers, ..., d_model]`` (same shape)."""
        if resid.dim() < 2 or resid.shape[0] != self.n_layers or resid.shape[-1] != self.weight.shape[-1]:
            raise ValueError(f"Expected residual streams [n_layers={self.n_layers}, ..., d_model="
                             f"{self.weight.shape[-1]}], got shape {tuple(resid.shape)}.")
        inner = resid[:-1]
        moved = self._translate_hidden(inner.reshape(self.n_layers - 1, -1, resid.shape[-1]))
        return torch.cat([moved.reshape(inner.shape), resid[-1:]])

    def forward(self, model: Model, resid: torch.Tensor) -> torch.Tensor:
        """Logits ``[n_layers, ..., vocab]``: translate, then the model's final norm and unembedding."""
        return model.anatomy.unembed(self.translate(resid))


def _check_fits(model: Model, lens: TunedLens) -> None:
    if (lens.n_layers, lens.weight.shape[-1]) != (model.n_layers, model.d_model):
        raise ValueError(f"This tuned lens has {lens.n_layers} layers of width {lens.weight.shape[-1]}; "
                         f"the model has {model.n_layers} of width {model.d_model}.")


def tuned_lens_logits(model: Model, lens: TunedLens, prompts: Prompts, *, pos: int = -1) -> torch.Tensor:
    """Tuned-lens logits at position ``pos`` of every layer: ``[layer, batch, vocab]``
    (the counterpart of :func:`interpbook.logit_lens`)."""
    _check_fits(model, lens)
    run = model.run(prompts, cache="resid_post", stop_early=True)
    with torch.no_grad():
        return lens(model, run.cache.stack("resid_post")[:, :, pos])


# --- data ------------------------------------------------------------------------------------
def pydoc_windows(model: Model, n_train: int, n_test: int, seq_len: int = 64,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint train and held-out windows ``[n, seq_len]`` of Python's documentation prose.

    Passages are shuffled with ``seed`` and split *before* tokenising, so no passage
    contributes to both sets. Each window starts with the tokens the tokenizer puts in
    front of every text (a beginning-of-text token for Gemma, nothing for SmolLM2).
    """
    import random

    prefix = list(model.tokenizer("")["input_ids"])
    body = seq_len - len(prefix)
    if body < 2:
        raise ValueError(f"seq_len={seq_len} leaves no room after the {len(prefix)} prefix token(s).")
    texts = [p.text for p in pydoc_passages()]
    random.Random(seed).shuffle(texts)
    cut = len(texts) * n_train // (n_train + n_test)
    encode = lambda t: model.tokenizer(t, add_special_tokens=False)["input_ids"]
    sets = []
    for part, n in ((texts[:cut], n_train), (texts[cut:], n_test)):
        windows = pack(encode, part, body, max_tokens=n * body, separator=encode("\n\n"))
        if len(windows) < n:
            raise ValueError(f"Only {len(windows)} windows of {seq_len} tokens fit, {n} asked.")
        sets.append(torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, -1), windows], 1))
    return sets[0], sets[1]


@torch.no_grad()
def collect_states(model: Model, windows: torch.Tensor, skip: int = 1, batch_size: int = 16) -> torch.Tensor:
    """``resid_post`` of every layer at every position ``>= skip``: ``[layer, token, d_model]``."""
    sites = [("resid_post", layer) for layer in range(model.n_layers)]
    return torch.stack(collect(model, windows, sites, skip=skip, batch_size=batch_size))


def _logits_on(model: Model, normed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the tokens ``ids`` only, from final-norm outputs (the model's head
    restricted to those columns, with its soft-capping where it has one)."""
    logits = normed @ model.anatomy.W_U[:, ids]
    if model.anatomy.b_U is not None:
        logits = logits + model.anatomy.b_U[ids]
    return model.anatomy.softcap(logits)


@torch.no_grad()
def _final_targets(model: Model, final: torch.Tensor, k: int, chunk: int = 256):
    """The training vocabulary (the ``k`` tokens with the most final probability on the
    first positions) and, per position, the final probability of each of those tokens
    and of all the rest together: ``(vocab [k], p_vocab [n, k], p_rest [n])``."""
    k = min(k, model.d_vocab - 1)
    mass = torch.zeros(model.d_vocab)
    for start in range(0, min(len(final), 4 * chunk), chunk):
        mass += torch.softmax(model.anatomy.unembed(final[start:start + chunk]).float(), -1).sum(0)
    vocab = mass.topk(k).indices.sort().values
    p_vocab = []
    for start in range(0, len(final), chunk):
        p_vocab.append(torch.softmax(model.anatomy.unembed(final[start:start + chunk]).float(), -1)[:, vocab])
    p_vocab = torch.cat(p_vocab)
    return vocab, p_vocab, (1 - p_vocab.sum(-1)).clamp(min=1e-12)


def _coarse_kl(model: Model, normed: torch.Tensor, vocab: torch.Tensor, p_vocab: torch.Tensor,
               p_rest: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) over the training vocabulary plus one bucket for all other tokens,
    mean over positions: the lens's mass on the other tokens is estimated from the
    sample ``others`` of them (a sampled softmax normaliser), so that the lens cannot
    hide probability outside the vocabulary it is trained on."""
    n_rest = model.d_vocab - len(vocab)
    w_vocab = _logits_on(model, normed, vocab)
    w_rest = torch.logsumexp(_logits_on(model, normed, others), -1) + np.log(n_rest / len(others))
    log_z = torch.logsumexp(torch.cat([w_vocab, w_rest[..., None]], -1), -1)
    log_q_vocab, log_q_rest = w_vocab - log_z[..., None], w_rest - log_z
    kl = (p_vocab * (p_vocab.clamp(min=1e-12).log() - log_q_vocab)).sum(-1)
    return (kl + p_rest * (p_rest.log() - log_q_rest)).mean()


@torch.no_grad()
def _least_squares_start(states: torch.Tensor, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the ridge-regularised affine map (in the translator's residual form)
    from the layer's state to the last layer's state scaled to unit RMS, which is what
    the final norm sees: ``(A [layer-1, d, d], b [layer-1, d])``."""
    final = states[-1]
    target = final / final.pow(2).mean(-1, keepdim=True).sqrt()
    d = states.shape[-1]
    A, b = [], []
    for h in states[:-1]:
        X = torch.cat([h, torch.ones(len(h), 1)], 1)
        G = X.T @ X
        sol = torch.linalg.solve(G + ridge * G.diagonal().mean() * torch.eye(d + 1), X.T @ (target - h))
        A.append(sol[:d])
        b.append(sol[d])
    return torch.stack(A), torch.stack(b)


def train_tuned_lens(model: Model, windows: torch.Tensor, config: TunedLensConfig = TunedLensConfig(),
                     *, progress: bool = False) -> TunedLens:
    """Train translators on ``windows [n, seq_len]`` of token ids (no cache; see
    :func:`fit_tuned_lens`). Seeded: the same inputs give the same lens.

    Each layer starts from whichever is closer to the final distribution on a tenth of
    the positions held out for the choice: the identity (the logit lens, the paper's
    start) or a least-squares map to the last layer's normalised state (a cheap
    closed-form start that lets a few hundred CPU steps suffice); then all translators
    are trained together with Adam on the KL of ``_coarse_kl``.
    """
    states = collect_states(model, windows, config.skip)               # [layer, token, d]
    vocab, p_vocab, p_rest = _final_targets(model, states[-1], config.train_vocab)
    g = torch.Generator().manual_seed(config.seed)
    rest = torch.ones(model.d_vocab, dtype=torch.bool)
    rest[vocab] = False
    rest = rest.nonzero()[:, 0]
    sample_rest = lambda: rest[torch.randint(len(rest), (min(len(rest), config.train_vocab),), generator=g)]
    norm = model.anatomy.final_norm()

    lens = TunedLens(model.n_layers, model.d_model)
    n = states.shape[1]
    fit, check = torch.arange(n) % 10 != 0, torch.arange(n) % 10 == 0
    A, b = _least_squares_start(states[:, fit])
    with torch.no_grad():
        others = sample_rest()
        for layer in range(model.n_layers - 1):
            h = states[layer, check]
            kl = lambda x: _coarse_kl(model, norm(x), vocab, p_vocab[check], p_rest[check], others)
            if kl(h + h @ A[layer] + b[layer]) < kl(h):
                lens.weight[layer], lens.bias[layer] = A[layer], b[layer]

    params = list(lens.parameters())
    opt = torch.optim.Adam(params, lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / config.steps)
    steps = range(config.steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="tuned lens")
    with torch.enable_grad():  # also when the caller turned gradients off
        for _ in steps:
            idx = torch.randint(n, (config.batch_size,), generator=g)
            moved = lens._translate_hidden(states[:-1, idx])
            loss = _coarse_kl(model, norm(moved), vocab, p_vocab[idx], p_rest[idx], sample_rest())
            # gradients for the translators only: the model's own parameters stay untouched
            for p, grad in zip(params, torch.autograd.grad(loss, params)):
                p.grad = grad
            opt.step()
            sched.step()
    lens.requires_grad_(False)
    lens.train_vocab = vocab
    return lens


def _cache_spec(model: Model, windows: torch.Tensor, config: TunedLensConfig) -> dict:
    return {"model": model.name, "n_layers": model.n_layers, "d_model": model.d_model,
            "config": dataclasses.asdict(config), "corpus": tensor_digest(windows.to(torch.int64)), "format": 3}


def fit_tuned_lens(model: Model, windows: torch.Tensor, config: TunedLensConfig = TunedLensConfig(),
                   *, progress: bool = False) -> TunedLens:
    """A tuned lens for ``model`` trained on ``windows``, from the cache when it is there.

    The file ``$INTERPBOOK_CACHE/tuned-lens/<model>-<key>.pt`` is keyed on the model's
    name and shape, every field of ``config`` and a digest of the training tokens (see
    :func:`interpbook.artifacts.cached`: locked, written atomically, digest-checked).
    """
    def train() -> dict:
        trained = train_tuned_lens(model, windows, config, progress=progress)
        return {"state": trained.state_dict(), "train_vocab": trained.train_vocab}

    saved = cached("tuned-lens", model.name, _cache_spec(model, windows, config), train)
    lens = TunedLens(model.n_layers, model.d_model)
    lens.load_state_dict(saved["state"])
    lens.requires_grad_(False)
    lens.train_vocab = saved["train_vocab"]
    return lens


# --- evaluation ---------------------------------------------------------------------------------
@dataclass
class LensComparison:
    """Per-layer agreement of two lenses with the model's final output on held-out text.

    ``kl_*``: mean KL(final || lens) in nats; ``top1_*``: fraction of positions where the
    lens's top-1 token is the model's; ``train_vocab_mass``: mean final probability that
    the tuned lens's training vocabulary covers on this text.
    """

    kl_logit: np.ndarray
    kl_tuned: np.ndarray
    top1_logit: np.ndarray
    top1_tuned: np.ndarray
    train_vocab_mass: float
    n_tokens: int


@torch.no_grad()
def compare_lenses(model: Model, lens: TunedLens, windows: torch.Tensor, skip: int = 1,
                   chunk: int = 128) -> LensComparison:
    """Logit lens vs tuned lens on ``windows`` (full vocabulary), layer by layer."""
    _check_fits(model, lens)
    states = collect_states(model, windows, skip)                     # [layer, token, d]
    n_layers, n = states.shape[:2]
    kl, top1 = np.zeros((2, n_layers)), np.zeros((2, n_layers))
    mass = 0.0
    vocab = getattr(lens, "train_vocab", None)
    for start in range(0, n, chunk):
        h = states[:, start:start + chunk]
        final = torch.log_softmax(model.anatomy.unembed(h[-1]).float(), -1)        # [c, vocab]
        if vocab is not None:
            mass += float(final[:, vocab].exp().sum())
        want = final.argmax(-1)
        for which, decoded in enumerate((h, lens.translate(h))):
            for layer in range(n_layers):
                logp = torch.log_softmax(model.anatomy.unembed(decoded[layer]).float(), -1)
                kl[which, layer] += float((final.exp() * (final - logp)).sum())
                top1[which, layer] += float((logp.argmax(-1) == want).sum())
    return LensComparison(kl[0] / n, kl[1] / n, top1[0] / n, top1[1] / n,
                          mass / n if vocab is not None else float("nan"), n)
