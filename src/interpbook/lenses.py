"""Reading the residual stream in the vocabulary: the logit lens.

nostalgebraist's logit lens decodes an intermediate residual stream with the model's own
final norm and unembedding, as if the remaining layers were skipped. At the last layer it
is exactly the model's output, which the tests check.
"""

from __future__ import annotations

import torch

from .lm import Model, Prompts


def logit_lens(model: Model, prompts: Prompts, *, pos: int = -1, site: str = "resid_post") -> torch.Tensor:
    """Logits read off ``site`` at every layer, at position ``pos``: ``[layer, batch, vocab]``."""
    run = model.run(prompts, cache=site)
    with torch.no_grad():
        return model.anatomy.unembed(run.cache.stack(site)[:, :, pos])


def top_tokens(model: Model, logits: torch.Tensor, k: int = 5) -> list[list[str]]:
    """The ``k`` highest-scoring tokens (as strings) for each row of ``logits [..., vocab]``."""
    idx = logits.topk(k, dim=-1).indices.reshape(-1, k)
    return [[model.tokenizer.decode([int(i)]) for i in row] for row in idx]
