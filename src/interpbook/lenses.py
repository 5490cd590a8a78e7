"""Reading the residual stream in the vocabulary: the logit lens and direct logit attribution.

nostalgebraist's logit lens decodes an intermediate residual stream with the model's own
final norm and unembedding, as if the remaining layers were skipped. At the last layer it
is exactly the model's output, which the tests check.

Direct logit attribution (DLA) splits the model's logits into the shares of the parts that
wrote the final residual stream (embedding, each attention and MLP output, a head, a
neuron's ``m_i v_i``). The final norm is linear once its scale is frozen at the value it had
in the real run, so the shares are in real logit units and add up to the logits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .anatomy import norm_as_linear, norm_scale
from .lm import Model, Prompts

__all__ = ["logit_lens", "answer_rank", "top_tokens", "final_norm_scale", "direct_logit_attribution"]

_LENS_SITES = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def logit_lens(model: Model, prompts: Prompts, *, pos: int = -1, site: str = "resid_post") -> torch.Tensor:
    """Logits read off ``site`` at every layer, at position ``pos``: ``[layer, batch, vocab]``."""
    with torch.no_grad():
        return model.anatomy.unembed(_lens_states(model, prompts, pos, site))


def _lens_states(model: Model, prompts: Prompts, pos: int, site: str) -> torch.Tensor:
    if site not in _LENS_SITES or site == "embed":
        raise ValueError(
            f"The logit lens reads a residual-stream site [batch, pos, d_model] at every layer, not {site!r}; "
            f"use one of {', '.join(s for s in _LENS_SITES if s != 'embed')}.")
    run = model.run(prompts, cache=site, last_only=True)   # the cached states are all the lens needs
    return run.cache.stack(site)[:, :, pos]                                  # [layer, batch, d_model]


@torch.no_grad()
def answer_rank(model: Model, prompts: Prompts, answers: Sequence[int] | torch.Tensor, *, pos: int = -1,
                site: str = "resid_post") -> torch.Tensor:
    """Rank of each prompt's answer token under the logit lens at every layer ``[layer, batch]``:
    how many tokens get a strictly higher lens logit (0: the answer is the lens's top-1).
    Computed a layer at a time, so memory stays at one ``[batch, vocab]`` slice (the full
    ``logit_lens`` of many prompts with a large vocabulary takes gigabytes)."""
    answers = torch.as_tensor(answers)
    states = _lens_states(model, prompts, pos, site)
    if answers.shape != (states.shape[1],):
        raise ValueError(f"answers must hold one token id per prompt ({states.shape[1]}); got shape "
                         f"{tuple(answers.shape)}.")
    ranks = []
    for h in states:
        logits = model.anatomy.unembed(h)                                     # [batch, vocab]
        ranks.append((logits > logits.gather(1, answers[:, None].to(logits.device))).sum(1))
    return torch.stack(ranks).cpu()


def top_tokens(model: Model, logits: torch.Tensor, k: int = 5) -> list[list[str]]:
    """The ``k`` highest-scoring tokens (as strings) for each row of ``logits [..., vocab]``."""
    idx = logits.topk(k, dim=-1).indices.reshape(-1, k)
    return [[model.tokenizer.decode([int(i)]) for i in row] for row in idx]


def final_norm_scale(model: Model, final_resid: torch.Tensor) -> torch.Tensor:
    """The factor the final norm multiplies the residual stream by ``[...]``, for
    ``final_resid [..., d_model]`` (the residual entering the final norm):
    ``1 / sqrt(mean(x^2) + eps)`` for RMSNorm, ``1 / std(x)`` for LayerNorm."""
    _check_d_model(model, final_resid, "final_resid")
    return norm_scale(model.anatomy.final_norm(), final_resid)


def direct_logit_attribution(model: Model, components: torch.Tensor, final_resid: torch.Tensor,
                             tokens: int | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Each component's direct contribution to the logits, in real logit units.

    ``components [..., d_model]`` are vectors added to the residual stream (``embed``,
    ``attn_out``, ``mlp_out``, one head's output ``z_h W_O[h]``, one neuron's ``m_i v_i``);
    ``final_resid [..., d_model]`` is the residual entering the final norm at the same
    positions (``resid_post`` of the last layer), whose norm scale is frozen, so that
    ``centred(c) * scale * gain @ W_U`` is linear in ``c``. Returns ``[..., vocab]``, or
    ``[..., n]`` for a list of token ids, or ``[...]`` for a single id.

    Components of a complete decomposition of ``final_resid`` sum to the model's logits before
    any final softcapping, minus the constant ``bias @ W_U + b_U`` of a LayerNorm/unembedding
    bias. Extra dimensions of ``components`` go first (e.g. ``[head, batch, d_model]``
    against ``final_resid [batch, d_model]``). The scale is treated as a constant: gradients
    flow to the components only.
    """
    _check_d_model(model, components, "components")
    _check_d_model(model, final_resid, "final_resid")
    a = model.anatomy
    W_U = a.W_U
    single = isinstance(tokens, int)
    if tokens is not None:
        ids = torch.as_tensor([tokens] if single else tokens, dtype=torch.long, device=W_U.device)
        if ids.dim() != 1 or ids.numel() == 0 or ids.min() < 0 or ids.max() >= a.d_vocab:
            raise ValueError(f"tokens must be token ids in 0..{a.d_vocab - 1} (one id or a 1-D list); got {tokens!r}.")
        W_U = W_U[:, ids]
    x = norm_as_linear(a.final_norm(), components.to(W_U.device), final_resid.to(W_U.device))
    out = x @ W_U.detach().float()
    return out[..., 0] if single else out


def _check_d_model(model: Model, t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[-1] != model.d_model:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a tensor [..., d_model={model.d_model}] of residual-stream "
                         f"vectors; got {shape}.")
