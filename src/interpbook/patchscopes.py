"""Patchscopes: let the model itself read one of its hidden states.

A *Patchscope* (Ghandeharioun et al., 2024) takes the hidden state ``h`` of a *source*
prompt at layer ``l`` and position ``i``, optionally maps it (``f(h)``), writes it into
the forward pass of a *target* prompt at layer ``l*`` and position ``i*``, and reads what
the target pass produces: its next-token distribution or a generated continuation::

    from interpbook.patchscopes import patchscope, IDENTITY_PROMPT
    logits = patchscope(model, "Amazon's former CEO", source_layer=[4, 8], source_pos=-1,
                        target_prompt=IDENTITY_PROMPT)          # [layer, vocab]
    texts = patchscope(model, "Mount Everest", 3, -1, DESCRIPTION_PROMPT,
                       decode="generate", max_new_tokens=12)    # one string

The logit lens is the special case *target prompt = source prompt, target layer = the
last layer, target position = source position, identity mapping*: after the last block
only the final norm and the unembedding remain, so the patched state is decoded exactly as
the logit lens decodes it (:func:`logit_lens_patchscope`; the tests check the equality on
every architecture).

Everything is batched: the source prompts run once, and all (prompt, layer) pairs are
decoded in one batched target pass (or one batched generation), each row patched with its
own vector by one :func:`interpbook.edit` per target layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import copy
import re

import torch

from .lm import Model
from .tracing import edit

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
"""The paper's few-shot *token identity* target prompt; the patch goes on the final ``?``."""

DESCRIPTION_PROMPT = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South "
    "Korean multinational major appliance and consumer electronics corporation, x"
)
"""The paper's few-shot *entity description* target prompt; the patch goes on the final ``x``."""

SELFIE_INSTRUCTION = "Message: {placeholder}\nWhat is the message above about? Answer in a few words."
"""A SelfIE-style interpretation request (Chen et al., 2024); :func:`interpretation_prompt`
wraps it in the model's chat template and finds the placeholder the state is written to."""

ENTITY_FACTS: dict[str, list[str]] = {
    "Mount Everest": ["himalaya", "nepal", "tibet", "highest + mountain|peak"],
    "Amazon River": ["south america", "brazil", "peru", "rainforest", "longest|largest + river"],
    "Albert Einstein": ["physicist", "relativity", "nobel", "e=mc", "german + scientist"],
    "Leonardo da Vinci": ["renaissance", "mona lisa", "last supper", "polymath",
                          "italian + painter|artist|inventor|engineer|sculptor"],
    "Barack Obama": ["44th", "president + united states|u.s.|american|usa", "first african|first black"],
    "Taylor Swift": ["singer", "songwriter", "musician", "pop star"],
    "Harry Potter": ["wizard", "rowling", "hogwarts", "fantasy + novel|book|series|film"],
    "Eiffel Tower": ["paris", "wrought|lattice", "france|french + tower|landmark|monument"],
    "Pacific Ocean": ["largest|deepest|biggest + ocean", "ocean + asia|americas|australia|oceania"],
    "World War II": ["1939", "1945", "nazi", "hitler", "axis + allies|allied"],
    "New York City": ["most populous", "manhattan", "big apple",
                      "united states|usa|u.s.|american + city|metropolis"],
    "Coca-Cola": ["drink", "beverage", "soda", "bottl"],
}
"""Facts that identify each entity, for scoring generated descriptions with
:func:`states_a_fact`. A fact is words joined by ``+`` (all must appear), each with
alternatives joined by ``|``; the words were chosen so that the name's last token alone
does not give them away (``"mountain"`` is not a fact about Mount Everest; ``"highest"``
together with ``"mountain"`` is)."""

Layers = Union[int, Sequence[int]]
Mapping = Union[Callable[[torch.Tensor], torch.Tensor], None]

__all__ = [
    "IDENTITY_PROMPT", "DESCRIPTION_PROMPT", "source_states", "patchscope",
    "logit_lens_patchscope", "precision_at_1", "ENTITY_FACTS", "first_clause", "states_a_fact",
    "SELFIE_INSTRUCTION", "interpretation_prompt",
]


def _as_list(x) -> tuple[list, bool]:
    """(list of items, whether the input was a single item)."""
    if isinstance(x, (str, int)) or (isinstance(x, torch.Tensor) and x.dim() <= 1):
        return [x], True
    return list(x), False


def _row_positions(mask: torch.Tensor, pos: int | Sequence[int]) -> torch.Tensor:
    """Column index of ``pos`` in each left-padded row: negative positions count from the
    end, non-negative ones from each prompt's first real token."""
    b, n = mask.shape
    pos = [pos] * b if isinstance(pos, int) else list(pos)
    if len(pos) != b:
        raise ValueError(f"source_pos has {len(pos)} entries for {b} source prompts.")
    lengths = mask.sum(-1)
    cols = []
    for row, p in enumerate(pos):
        length = int(lengths[row])
        if not -length <= p < length:
            raise IndexError(f"Position {p} is outside source prompt {row}, which has {length} tokens.")
        cols.append(n + p if p < 0 else n - length + p)
    return torch.tensor(cols, device=mask.device)


def source_states(model: Model, prompts, layers: Layers, pos: int | Sequence[int] = -1,
                  site: str = "resid_post") -> torch.Tensor:
    """Hidden states ``[prompt, layer, d_model]`` of ``site`` at ``pos`` (one pass).

    ``pos`` is one position for every prompt or one per prompt; negative counts from the
    end, non-negative from the prompt's first token (padding is skipped).
    """
    layer_list, _ = _as_list(layers)
    layer_list = [l % model.n_layers for l in layer_list]
    if isinstance(prompts, str):
        prompts = [prompts]
    run = model.run(prompts, cache=[(site, l) for l in sorted(set(layer_list))], stop_early=True)
    cols = _row_positions(run.attention_mask, pos)
    rows = torch.arange(len(cols), device=cols.device)
    return torch.stack([run.cache[site, l][rows, cols] for l in layer_list], dim=1)


def _target_edits(layers: list[int], pos: int, vectors: torch.Tensor, site: str) -> list:
    """One edit per distinct target layer; each writes its rows' vectors at ``pos``
    (of the first pass only, so generated tokens are not patched)."""
    edits = []
    for layer in sorted(set(layers)):
        rows = torch.tensor([r for r, l in enumerate(layers) if l == layer])

        def fn(x, rows=rows):
            out = x.clone()
            out[rows.to(x.device), pos] = vectors[rows].to(x.dtype).to(x.device)
            return out

        edits.append(edit((site, layer), fn, pos=pos))
    return edits


@torch.no_grad()
def patchscope(model: Model, source_prompt, source_layer: Layers, source_pos: int | Sequence[int],
               target_prompt=IDENTITY_PROMPT, target_layer: Layers | None = None, target_pos: int = -1,
               mapping: Mapping = None, decode: str = "next_token", max_new_tokens: int = 20, *,
               target_model: Model | None = None, site: str = "resid_post", return_ids: bool = False,
               batch_size: int = 64):
    """Decode hidden states of ``source_prompt`` by patching them into ``target_prompt``.

    Args:
        model: the source model (and the target model unless ``target_model`` is given).
        source_prompt: a string, or a list of strings decoded in one batch.
        source_layer: a layer or a list of layers of ``site`` to read (negative counts from
            the end).
        source_pos: the position to read; negative from the end, non-negative from the
            prompt's first token; one for all prompts or one per prompt.
        target_prompt: the prompt to patch into (one string or token-id tensor for all rows).
        target_layer: where to write; ``None`` means the same layer as the source (the
            paper's default), an int one layer for all, a list one per source layer.
        target_pos: the position of ``target_prompt`` to overwrite (``-1``: its last token).
        mapping: optional function ``[n, d_source] -> [n, d_target]`` applied to the source
            states first (e.g. an affine map, or a map between two models).
        decode: ``"next_token"`` returns the target's next-token logits after the patch;
            ``"generate"`` continues the target prompt greedily for ``max_new_tokens``
            (the patch acts on the prompt pass; later tokens attend to it).
        target_model: a different model to decode with (cross-model patchscope).
        site: the site read and written (``"resid_post"``, the output of a block).
        return_ids: with ``decode="generate"``, return the new token ids instead of text.
        batch_size: patched rows per target pass (memory only; results do not change). Each
            row copies the target prefix's keys and values; on SmolLM2, 1,440 rows took the
            same time in batches of 64 as of 256, with 0.42 instead of 0.76 GB above the model.

    Returns:
        ``"next_token"``: logits ``[prompt, layer, vocab]``; ``"generate"``: a list (per
        prompt) of lists (per layer) of strings. A single prompt or a single layer drops
        that dimension, so ``patchscope(model, "text", 5, -1)`` is one ``[vocab]`` vector.
    """
    if decode not in ("next_token", "generate"):
        raise ValueError(f"decode must be 'next_token' or 'generate', not {decode!r}.")
    target = target_model or model
    if isinstance(source_prompt, torch.Tensor):  # token ids [pos] or [batch, pos]
        one_prompt = source_prompt.dim() == 1
        prompts = source_prompt[None] if one_prompt else source_prompt
    else:
        prompts, one_prompt = _as_list(source_prompt)
    src_layers, one_layer = _as_list(source_layer)
    if target_layer is None:
        tgt_layers = list(src_layers)
    elif isinstance(target_layer, int):
        tgt_layers = [target_layer] * len(src_layers)
    else:
        tgt_layers = list(target_layer)
        if len(tgt_layers) != len(src_layers):
            raise ValueError(f"target_layer has {len(tgt_layers)} entries for {len(src_layers)} source layers.")
    for l in tgt_layers:
        if not -target.n_layers <= l < target.n_layers:
            raise IndexError(f"Target layer {l} is out of range: the target model has {target.n_layers} layers.")
    tgt_layers = [l % target.n_layers for l in tgt_layers]

    src = source_states(model, prompts, src_layers, source_pos, site)
    n_p, n_l = src.shape[:2]
    vectors = src.reshape(n_p * n_l, -1)
    if mapping is not None:
        vectors = mapping(vectors)
    if vectors.shape[-1] != target.d_model:
        raise ValueError(f"Patched vectors have size {vectors.shape[-1]}, the target model's residual "
                         f"stream {target.d_model}: give a mapping between the two.")
    rows_layers = tgt_layers * n_p  # row r = (prompt r // n_l, layer r % n_l)

    enc = target.tokenize(target_prompt)
    ids = enc["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("target_prompt must be one prompt (it is repeated for every patched state).")
    if not -ids.shape[1] <= target_pos < ids.shape[1]:
        raise IndexError(f"target_pos {target_pos} is outside the target prompt ({ids.shape[1]} tokens).")
    n_rows = n_p * n_l
    # The patch sits at target_pos, so nothing before it depends on the patched state: when
    # it is the last token, run the shared prefix once and reuse its key/value cache.
    prefix = None
    if target_pos % ids.shape[1] == ids.shape[1] - 1 and ids.shape[1] > 1:
        prefix = target.hf(input_ids=ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]),
                           use_cache=True).past_key_values
    results, logits = [], None
    for start in range(0, n_rows, batch_size):
        rows = slice(start, min(start + batch_size, n_rows))
        n = rows.stop - rows.start
        edits = _target_edits(rows_layers[rows], -1 if prefix is not None else target_pos, vectors[rows], site)
        cache, run_ids = None, ids.expand(n, -1)
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(n)
        if decode == "next_token":
            with target.trace(edits=edits):
                out = target.hf(input_ids=run_ids if cache is None else run_ids[:, -1:],
                                attention_mask=torch.ones_like(run_ids), past_key_values=cache,
                                use_cache=cache is not None,
                                logits_to_keep=ids.shape[1] - target_pos % ids.shape[1] if cache is None else 1)
            if logits is None:  # filled batch by batch: no second copy from concatenating
                logits = out.logits.new_empty(n_rows, out.logits.shape[-1])
            logits[rows] = out.logits[:, 0]
        else:
            with target.trace(edits=edits):
                gen = target.hf.generate(input_ids=run_ids, attention_mask=torch.ones_like(run_ids),
                                         past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=target.tokenizer.pad_token_id)
            results += list(gen[:, ids.shape[1]:])

    if decode == "next_token":
        out = logits.reshape(n_p, n_l, -1)
        if one_layer:
            out = out[:, 0]
        return out[0] if one_prompt else out

    items = [r if return_ids else target.tokenizer.decode(r, skip_special_tokens=True) for r in results]
    table = [items[p * n_l:(p + 1) * n_l] for p in range(n_p)]
    if one_layer:
        table = [row[0] for row in table]
    return table[0] if one_prompt else table


def logit_lens_patchscope(model: Model, prompt, layers: Layers | None = None, pos: int = -1) -> torch.Tensor:
    """The logit lens written as a patchscope: ``[layer, vocab]`` for one prompt.

    Source and target prompt are the same, the target layer is the last one and the
    mapping is the identity, so only the final norm and unembedding act on the patched
    state; equal to ``interpbook.logit_lens(model, prompt, pos=pos)[:, 0]``.
    """
    layers = list(range(model.n_layers)) if layers is None else layers
    return patchscope(model, prompt, layers, pos, target_prompt=prompt,
                      target_layer=model.n_layers - 1, target_pos=pos)


def precision_at_1(decoded_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose top-1 token agrees with the reference's top-1 token.

    ``decoded_logits [n, ..., vocab]`` against ``reference_logits [n, vocab]`` (the model's
    own output at the source position): the paper's Precision@1, averaged over ``n``.
    """
    want = reference_logits.argmax(-1)
    got = decoded_logits.argmax(-1)
    while want.dim() < got.dim():
        want = want.unsqueeze(-1)
    return (got == want).float().mean(0)


def first_clause(text: str) -> str:
    """The generated description up to its first comma or line break: the few-shot
    description prompt lists ``name: description`` items separated by commas, so what
    follows the first comma is usually a new, made-up item."""
    return re.split(r"[,\n]", text, maxsplit=1)[0].strip()


def states_a_fact(description: str, facts: Sequence[str]) -> bool:
    """True when ``description`` states at least one of ``facts``.

    A fact such as ``"italian + painter|artist"`` needs every ``+``-separated part, each
    satisfied by any of its ``|``-separated words; a word matches at the start of a word,
    case-insensitively (``"himalaya"`` matches *Himalayan*). Score :func:`first_clause`
    of a generation, not all of it.
    """
    if isinstance(facts, str):
        raise TypeError("facts must be a list of fact strings, not one string.")
    text = description.lower()

    def present(word: str) -> bool:
        return re.search(r"(?<![a-z0-9])" + re.escape(word.strip()), text) is not None

    for fact in facts:
        parts = [p for p in fact.lower().split("+") if p.strip()]
        if not parts:
            raise ValueError(f"Empty fact {fact!r}.")
        if all(any(present(w) for w in part.split("|") if w.strip()) for part in parts):
            return True
    return False


def interpretation_prompt(model: Model, instruction: str = SELFIE_INSTRUCTION, placeholder: str = "X",
                          answer_prefix: str = "The message is about") -> tuple[str, int]:
    """A SelfIE-style target prompt and the position (negative, from the end) of its
    placeholder token, for ``patchscope(..., target_prompt=prompt, target_pos=pos)``.

    ``instruction`` holds ``{placeholder}`` once; it is wrapped with
    :meth:`interpbook.Model.chat_prompt` (plain text for a model without a chat
    template) and the answer is begun with ``answer_prefix``.
    """
    if instruction.count("{placeholder}") != 1:
        raise ValueError("instruction must contain '{placeholder}' exactly once.")
    text = model.chat_prompt(instruction.format(placeholder=placeholder), answer_prefix=answer_prefix)
    ids = model.tokenize(text)["input_ids"][0].tolist()
    hits = [i for i, t in enumerate(ids) if model.tokenizer.decode([t]).strip() == placeholder]
    if len(hits) != 1:
        raise ValueError(f"The placeholder {placeholder!r} is {len(hits)} tokens of the prompt, not exactly one; "
                         "choose a placeholder that is one token and appears nowhere else.")
    return text, hits[0] - len(ids)
