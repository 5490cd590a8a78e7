"""Check for the exercise of the appendix "Scaling up": causal tracing written in nnsight.

The reader's function runs the restored runs of causal tracing (Meng et al. 2022) with
nnsight: noise on the subject's token embeddings, the clean residual stream after one layer
put back at one position. The reference is interpbook's own
:func:`interpbook.factual.causal_tracing.restored_probs` with the same noise draws, so
the two must agree to float precision on any model the anatomy supports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import peers
from ..factual import causal_tracing as CT
from ..factual.facts import Fact, object_token, subject_positions
from . import CheckFailed, CheckResult, check_close

__all__ = ["check_nnsight_causal_tracing"]


def check_nnsight_causal_tracing(restored_probs, model, fact: Fact, *, noise: float, layers: Sequence[int],
                                 n_samples: int = 3, seed: int = 0) -> CheckResult:
    """``restored_probs(lm, embed, blocks, input_ids, subject, target, draws, layers, pos)``
    returns, for each of ``layers``, the probability of token ``target`` at the last position
    averaged over the noise samples, when ``draws`` ``[samples, len(subject), d_model]`` is
    added to the embeddings at the ``subject`` positions and the output of decoder block
    ``layer`` is set back to its clean value at position ``pos`` (the last subject token).
    ``lm`` is nnsight's model, ``embed`` the envoy of the token embedding and ``blocks`` the
    envoys of the decoder blocks. Compared with interpbook's causal tracing (tolerance 1e-4)."""
    ex = "Exercise (causal tracing in nnsight)"
    if restored_probs is None or restored_probs is Ellipsis:
        raise CheckFailed(f"{ex}: no function yet; replace the `...`")
    layers = [int(layer) for layer in layers]
    lm = peers.nnsight_model(model)
    embed = peers.envoy(lm, model, model.anatomy.embedding())
    blocks = [peers.envoy(lm, model, block) for block in model.anatomy.layers()]
    subject = subject_positions(model.tokenizer, fact)
    target = object_token(model.tokenizer, fact.target)
    draws = torch.randn(n_samples, len(subject), model.d_model, generator=torch.Generator().manual_seed(seed)) * noise
    draws = draws.to(model.device)  # the same draws as trace_fact's, where the model runs
    input_ids = model.tokenize(fact.prompt)["input_ids"]
    pos = subject[-1]
    with torch.no_grad():
        clean = model.run(fact.prompt, cache=[("resid_post", layer) for layer in layers]).cache
        expected = CT.restored_probs(model, fact.prompt, target, subject, draws,
                                     [("resid_post", [layer], pos) for layer in layers], clean)
    got = restored_probs(lm, embed, blocks, input_ids, subject, target, draws.clone(), layers, pos)
    if got is None:
        raise CheckFailed(f"{ex}: the function returned None; return one probability per layer.")
    result = check_close(ex, torch.as_tensor(got), expected, rtol=0, atol=1e-4)
    return CheckResult(ex, f"{result.message}: the same restored probabilities as interpbook's causal tracing "
                           f"at {len(layers)} layers")
