"""Single neurons that regulate confidence, and neurons that never fire.

Book chapter ``06-neurons``, page *Confidence regulation neurons* (Stolfo et al., 2024),
plus the dead-neuron count of the bonus paper (Voita et al., 2024).

* **Entropy neurons** write into directions the unembedding barely reads (the bottom
  singular directions of the norm-folded unembedding, :func:`unembedding_spectrum`,
  :func:`null_space_fraction`). Their direct effect on the logits is small, but they change
  the residual stream's norm, hence the final norm's scale, hence the entropy of every
  prediction. :func:`entropy_effects` measures both: the *total* effect of mean-ablating a
  neuron, and the *direct* effect, the same change read with the final norm's scale frozen.
* **Token-frequency neurons** write along the direction whose unembedding is the tokens'
  log-frequency (:func:`unigram_log_frequencies`, :func:`frequency_correlations`), moving
  the prediction towards or away from the unigram distribution.
* **Dead neurons** (:func:`dead_fraction`): for a gated MLP, a neuron whose gate never
  opens (pre-activation never above 0) on a corpus.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from .anatomy import norm_as_linear
from .lm import Model

__all__ = [
    "with_bos", "entropy", "unembedding_spectrum", "null_space_fraction", "output_norms",
    "mean_activations", "EntropyEffect", "entropy_effects", "unigram_log_frequencies",
    "frequency_correlations", "best_direction_correlation", "gate_preactivation_max",
    "dead_fraction",
]


def with_bos(model: Model, windows: torch.Tensor) -> torch.Tensor:
    """``windows [n, seq]`` with the model's BOS token prepended when its tokenizer adds one
    (Gemma does, SmolLM2 does not), so packed text looks like what the model was trained on."""
    tok = model.tokenizer
    bos = getattr(tok, "bos_token_id", None)
    if bos is None or tok("a")["input_ids"][:1] != [bos]:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], 1)


def _n_bos(model: Model, windows: torch.Tensor) -> int:
    return int(with_bos(model, windows[:1, :1]).shape[1] - 1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the softmax of ``logits [..., vocab]``: ``[...]``."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def unembedding_spectrum(model: Model) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and left singular vectors ``[d_model, d_model]`` (as
    columns) of the norm-folded unembedding ``diag(g) W_U``.

    Computed from the ``d_model x d_model`` Gram matrix, which is cheap also for a vocabulary
    of a quarter million tokens."""
    W = model.anatomy.folded_W_U().float()
    gram = W @ W.T
    evals, evecs = torch.linalg.eigh(gram.double())
    order = evals.argsort(descending=True)
    return evals[order].clamp(min=0).sqrt().float(), evecs[:, order].float()


def _bottom_k(model: Model, k: int | None) -> int:
    k = max(1, round(0.01 * model.d_model)) if k is None else k
    if not 1 <= k < model.d_model:
        raise ValueError(f"k (the number of bottom singular directions) must be in 1..{model.d_model - 1}; got {k}")
    return k


@torch.no_grad()
def null_space_fraction(model: Model, layer: int, k: int | None = None, *,
                        vectors: torch.Tensor | None = None) -> torch.Tensor:
    """For each neuron of ``layer``: the share of its output weight's squared norm that lies
    in the ``k`` bottom singular directions of the folded unembedding (the "null space"
    the unembedding barely reads): ``[d_mlp]`` in [0, 1].

    ``k`` defaults to 1% of ``d_model``, the paper's choice. Pass ``vectors [n, d_model]``
    instead of a layer's ``W_out`` rows to score other directions (e.g. random ones)."""
    k = _bottom_k(model, k)
    _, U = unembedding_spectrum(model)
    V = model.anatomy.W_out(layer).detach().float() if vectors is None else vectors.float()
    bottom = V @ U[:, -k:]
    return bottom.pow(2).sum(-1) / V.pow(2).sum(-1).clamp(min=1e-12)


def output_norms(model: Model, layer: int) -> torch.Tensor:
    """The norm of each neuron's output weight (its row of ``W_out``): ``[d_mlp]``."""
    return model.anatomy.W_out(layer).detach().float().norm(dim=-1)


@torch.no_grad()
def mean_activations(model: Model, windows: torch.Tensor, layer: int, *, batch_size: int = 16) -> torch.Tensor:
    """The mean ``mlp_act`` of every neuron of ``layer`` over all positions of ``windows``
    (after any BOS token): ``[d_mlp]``, the value mean-ablation sets a neuron to."""
    n_bos = _n_bos(model, windows)
    total, count = torch.zeros(model.d_mlp), 0
    for b in range(0, len(windows), batch_size):
        ids = with_bos(model, windows[b:b + batch_size])
        act = model.run(ids, cache=("mlp_act", layer), stop_early=True).cache["mlp_act", layer][:, n_bos:]
        total += act.float().sum((0, 1)).cpu()
        count += act.shape[0] * act.shape[1]
    return total / count


@dataclasses.dataclass(frozen=True)
class EntropyEffect:
    """Mean absolute change in the entropy of the next-token prediction (nats) when a
    neuron is mean-ablated: ``total`` through the whole model, ``direct`` with the final
    norm's scale frozen at its clean value. ``ratio = total / direct``."""

    layer: int
    neuron: int
    total: float
    direct: float

    @property
    def ratio(self) -> float:
        return self.total / max(self.direct, 1e-12)


def _mlp_out(model: Model, layer: int, act: torch.Tensor) -> torch.Tensor:
    """What the MLP of ``layer`` adds to the residual stream for neuron activations ``act``."""
    a = model.anatomy
    out = act @ a.W_out(layer) + (0 if a.b_out(layer) is None else a.b_out(layer))
    return a.post_mlp_norm(layer)(out)


@torch.no_grad()
def entropy_effects(model: Model, windows: torch.Tensor, neurons: Sequence[int], *,
                    means: torch.Tensor | None = None, batch_size: int = 8) -> list[EntropyEffect]:
    """Total and direct effect on the prediction's entropy of mean-ablating each of
    ``neurons`` of the last layer, over every position of ``windows`` (after any BOS).

    *Total*: the neuron's activation is set to ``means[neuron]`` (its mean over ``windows``
    by default), the MLP output and the final residual stream change by ``delta``, and the
    logits are recomputed through the final norm. Nothing but the final norm follows the
    last MLP, so this is exactly the ablated model's output. *Direct*: ``delta`` passes
    through the final norm *with the clean run's scale frozen* and is added to the clean
    normed stream. An ordinary neuron's two effects agree; an entropy neuron acts mostly
    through the norm's scale, so ``total >> direct``."""
    layer = model.n_layers - 1
    bad = [n for n in neurons if not 0 <= int(n) < model.d_mlp]
    if bad or not len(neurons):
        raise ValueError(f"give one or more neuron indices in 0..{model.d_mlp - 1}; got {list(neurons)}")
    a = model.anatomy
    norm = a.final_norm()
    n_bos = _n_bos(model, windows)
    means = mean_activations(model, windows, layer) if means is None else means
    sites = [("resid_mid", layer), ("resid_post", layer)]
    total = torch.zeros(len(neurons))
    direct = torch.zeros(len(neurons))
    count = 0
    for b in range(0, len(windows), batch_size):
        run = model.run(with_bos(model, windows[b:b + batch_size]), cache=sites)
        resid = run.cache["resid_post", layer][:, n_bos:].float()
        act = a.mlp_act_from(layer, a.ln2(layer)(run.cache["resid_mid", layer][:, n_bos:])).float()
        clean_out = _mlp_out(model, layer, act)
        normed = norm(resid)
        H_clean = entropy(run.logits[:, n_bos:])
        for j, n in enumerate(int(n) for n in neurons):
            ablated = act.clone()
            ablated[..., n] = means[n]
            delta = _mlp_out(model, layer, ablated) - clean_out
            H_total = entropy(a.unembed(resid + delta))
            H_direct = entropy(a.logits_from_normed(normed + norm_as_linear(norm, delta, resid)))
            total[j] += (H_total - H_clean).abs().sum().cpu()
            direct[j] += (H_direct - H_clean).abs().sum().cpu()
        count += resid.shape[0] * resid.shape[1]
    return [EntropyEffect(layer, int(n), float(t / count), float(d / count))
            for n, t, d in zip(neurons, total, direct)]


# --- token frequency --------------------------------------------------------------------------
_SPACE_MARKERS = ("\u0120", "\u2581")  # byte-level BPE's "G-dot" and SentencePiece's "lower one-eighth block"


def unigram_log_frequencies(model: Model, *, lang: str = "en", min_zipf: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_ids, log_freq)``: the tokens that are a whole word after a leading space
    (ASCII letters only) with a known frequency in ``wordfreq``, and the natural log of that
    frequency. Word pieces and other tokens are left out rather than guessed."""
    try:
        from wordfreq import word_frequency
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("Token frequencies come from the wordfreq package: pip install wordfreq==3.1.1") from exc
    pieces = model.tokenizer.convert_ids_to_tokens(list(range(model.d_vocab)))
    ids, logf = [], []
    floor = 10 ** (min_zipf - 9)
    for i, piece in enumerate(pieces):
        if not piece or piece[0] not in _SPACE_MARKERS:
            continue
        word = piece[1:]
        if not (word.isascii() and word.isalpha()):
            continue
        f = word_frequency(word.lower(), lang)
        if f >= floor:
            ids.append(i)
            logf.append(np.log(f))
    if len(ids) < 100:
        raise ValueError(f"Only {len(ids)} tokens of {model.name} are words with a known frequency; too few to correlate.")
    return torch.tensor(ids), torch.tensor(logf, dtype=torch.float32)


@torch.no_grad()
def _logit_gram(model: Model, token_ids: torch.Tensor, log_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(G, g, |f|)`` for correlations over ``token_ids``: with ``W`` the folded
    unembedding's columns of those tokens, centred over the tokens, and ``f`` the centred
    log-frequencies, ``G = W W^T`` and ``g = W f``."""
    a = model.anatomy
    W = (a.norm_gain(a.final_norm())[:, None] * a.W_U[:, token_ids]).float()  # folded, only these columns
    W = W - W.mean(1, keepdim=True)
    f = log_freq.float() - log_freq.float().mean()
    return (W @ W.T).double(), (W @ f).double(), float(f.norm())


@torch.no_grad()
def frequency_correlations(model: Model, vectors: torch.Tensor, token_ids: torch.Tensor,
                           log_freq: torch.Tensor) -> torch.Tensor:
    """Pearson correlation, over ``token_ids``, between the logits each of ``vectors
    [n, d_model]`` writes (through the norm-folded unembedding) and the tokens' log
    frequency: ``[n]``. A token-frequency neuron's output weight scores near +-1."""
    G, g, fn = _logit_gram(model, token_ids, log_freq)
    V = vectors.double()
    num = V @ g
    den = torch.einsum("nd,de,ne->n", V, G, V).clamp(min=1e-24).sqrt() * fn
    return (num / den).float()


@torch.no_grad()
def best_direction_correlation(model: Model, token_ids: torch.Tensor, log_freq: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The highest correlation any residual direction reaches (the least-squares fit of the
    log-frequencies by the unembedding), and that direction ``[d_model]``: the ceiling
    against which neurons' correlations are read."""
    G, g, fn = _logit_gram(model, token_ids, log_freq)
    u = torch.linalg.lstsq(G, g[:, None]).solution[:, 0]
    r = float((u @ g) / (torch.sqrt(u @ G @ u) * fn))
    return r, (u / u.norm()).float()


# --- dead neurons ------------------------------------------------------------------------------
@torch.no_grad()
def gate_preactivation_max(model: Model, windows: torch.Tensor, *, batch_size: int = 16) -> torch.Tensor:
    """The largest gate pre-activation ``x . w_gate`` of every neuron of every layer over
    ``windows`` (after any BOS token): ``[n_layers, d_mlp]``. For an ungated MLP the
    input pre-activation ``x . w_in + b_in`` takes its place."""
    a = model.anatomy
    n_bos = _n_bos(model, windows)
    into = "resid_pre" if a.parallel_residual else "resid_mid"  # what the MLP's norm reads
    sites = [(into, layer) for layer in range(model.n_layers)]
    best = torch.full((model.n_layers, model.d_mlp), -torch.inf)
    for b in range(0, len(windows), batch_size):
        run = model.run(with_bos(model, windows[b:b + batch_size]), cache=sites, stop_early=True)
        for layer in range(model.n_layers):
            x = a.ln2(layer)(run.cache[into, layer][:, n_bos:])
            if a.gated:
                pre = x @ a.W_gate(layer)
            else:
                pre = x @ a.W_in(layer) + (0 if a.b_in(layer) is None else a.b_in(layer))
            best[layer] = torch.maximum(best[layer], pre.float().amax((0, 1)).cpu())
    return best


def dead_fraction(preact_max: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Per layer, the fraction of neurons whose gate never opened: maximum pre-activation
    at most ``threshold`` (``[n_layers]`` from :func:`gate_preactivation_max`'s output)."""
    return (preact_max <= threshold).float().mean(-1)
