"""How interpretable is a direction? Offline scores from top-activating tokens.

Automated interpretability (Bills et al., 2023) asks a language model to explain what makes
a feature fire and scores the explanation by how well it predicts the activations on new
text. A 135M-parameter model is no use as an explainer, so this module scores the simplest
explanation there is: a **token set**. For each direction (an SAE latent, a neuron, a PCA
or ICA component, a random direction):

1. on the *explanation* half of held-out text, the explanation is the set of distinct
   tokens among the ``top`` highest activations;
2. on the *scoring* half, a token is a positive when the activation exceeds ``fraction``
   (one half) of the mean of those top explanation activations, and the explanation
   predicts "positive" for every token in the set;
3. the score is the F1 of that prediction.

A direction that fires on a handful of token identities (a "`␣the` after `of`" latent, a
digit neuron) scores high; one that mixes many contexts (a PCA component) scores low.
Token sets cannot explain context-dependent features, so the score is a lower bound on
interpretability, and it is the same lower bound for every method compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mlp import visible

__all__ = ["orient", "TokenSetScores", "token_set_scores", "top_contexts"]


def orient(acts: torch.Tensor) -> torch.Tensor:
    """Flip the sign of each column of ``acts [n, dirs]`` whose largest magnitude is
    negative, so a direction's "firing" side is positive (PCA, ICA and random directions
    have no preferred sign)."""
    flip = acts.max(0).values < -acts.min(0).values
    return torch.where(flip, -acts, acts)


@dataclass
class TokenSetScores:
    """Per-direction F1 of the token-set explanation, and the explanations themselves."""

    f1: torch.Tensor                 # [dirs]
    explanations: list[list[int]]    # token ids per direction


def token_set_scores(acts: torch.Tensor, token_ids: torch.Tensor, *, top: int = 20,
                     fraction: float = 0.5) -> TokenSetScores:
    """Score every column of ``acts [n_tokens, dirs]`` (activations on consecutive held-out
    tokens ``token_ids [n_tokens]``): explanation from the first half, F1 on the second."""
    if acts.dim() != 2 or token_ids.shape != acts.shape[:1]:
        raise ValueError(f"acts must be [n_tokens, dirs] and token_ids [n_tokens]; got "
                         f"{tuple(acts.shape)} and {tuple(token_ids.shape)}.")
    if not 0 < fraction <= 1 or top < 1 or 2 * top > len(acts):
        raise ValueError(f"Need 0 < fraction <= 1 and 1 <= top <= n_tokens / 2; got fraction={fraction}, "
                         f"top={top}, n_tokens={len(acts)}.")
    half = len(acts) // 2
    explain, score = acts[:half].float(), acts[half:].float()
    explain_ids, score_ids = token_ids[:half], token_ids[half:]
    peaks = explain.topk(top, dim=0)                                      # [top, dirs]
    positive = score > (fraction * peaks.values.mean(0)).clamp_min(0)     # [n, dirs]
    f1s, explanations = [], []
    for d in range(acts.shape[1]):
        chosen = explain_ids[peaks.indices[:, d]].unique()
        predicted = torch.isin(score_ids, chosen)
        tp = (predicted & positive[:, d]).sum()
        f1s.append(float(2 * tp / (predicted.sum() + positive[:, d].sum()).clamp_min(1)))
        explanations.append(chosen.tolist())
    return TokenSetScores(torch.tensor(f1s), explanations)


def top_contexts(tokenizer, windows: torch.Tensor, acts: torch.Tensor, n: int = 3, before: int = 4,
                 *, skip: int = 1) -> list[str]:
    """The ``n`` highest activations of one direction as short strings ``"… a b [c]"``,
    tokens shown with visible leading spaces (``␣``).

    ``acts [n_windows * (seq_len - skip)]`` are activations at positions ``>= skip`` of
    ``windows [n_windows, seq_len]`` (the layout :func:`interpbook.sae.collect` returns).
    """
    per_window = windows.shape[1] - skip
    if acts.shape != (len(windows) * per_window,):
        raise ValueError(f"acts must have one value per position >= skip of windows: "
                         f"{len(windows) * per_window}; got shape {tuple(acts.shape)}.")
    out = []
    for flat in acts.topk(n).indices.tolist():
        w, p = divmod(flat, per_window)
        p += skip
        piece = [visible(tokenizer.decode([int(t)])) for t in windows[w, max(skip, p - before):p + 1]]
        out.append("…" + " ".join(piece[:-1]) + f" [{piece[-1]}]")
    return out
