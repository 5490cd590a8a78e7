"""The :class:`Model` the chapters work with: a Hugging Face causal LM, its tokenizer and
its anatomy, with tokenisation helpers and traced forward passes."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from .anatomy import Anatomy, anatomy_for
from .tracing import ActivationCache, Edit, SiteSpec, Trace, remember_source

Prompts = str | Sequence[str] | torch.Tensor | dict


def _describe(x) -> str:
    return f"{type(x).__name__} {x!r}"[:80]


@dataclass
class Run:
    """The result of :meth:`Model.run`: logits ``[batch, pos, vocab]`` (None when the pass
    stopped early), the recorded activations, and the tokens that went in (left-padded)."""

    logits: torch.Tensor | None
    cache: ActivationCache
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def last_logits(self) -> torch.Tensor:
        """Logits at each prompt's final token ``[batch, vocab]`` (left padding puts it at -1)."""
        if self.logits is None:
            raise ValueError("This run has no logits: it was made with stop_early=True, which ends the forward "
                             "pass after the last recorded layer. Run without stop_early to get logits.")
        return self.logits[:, -1]


class Model:
    """A causal LM ready for interpretability work.

    ``hf`` is the native Hugging Face model (its forward pass is never re-implemented),
    ``tokenizer`` pads on the left so that position -1 is every prompt's last token, and
    ``anatomy`` names sites and weights (:mod:`interpbook.anatomy`).
    """

    def __init__(self, hf, tokenizer, name: str | None = None):
        self.hf = hf
        self.tokenizer = tokenizer
        self.name = name or hf.config.name_or_path
        self.anatomy: Anatomy = anatomy_for(hf)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"

    def __repr__(self) -> str:
        a = self.anatomy
        return (f"Model({self.name!r}: {a.family}, {a.n_layers} layers, d_model={a.d_model}, "
                f"{a.n_heads} heads ({a.n_kv_heads} KV) of {a.d_head}, d_mlp={a.d_mlp}, vocab={a.d_vocab})")

    # shortcuts to the shapes every chapter quotes
    n_layers = property(lambda self: self.anatomy.n_layers)
    n_heads = property(lambda self: self.anatomy.n_heads)
    d_model = property(lambda self: self.anatomy.d_model)
    d_head = property(lambda self: self.anatomy.d_head)
    d_mlp = property(lambda self: self.anatomy.d_mlp)
    d_vocab = property(lambda self: self.anatomy.d_vocab)

    @property
    def device(self) -> torch.device:
        """The device inputs go to, the one the token embedding runs on. Under an
        accelerate device map that is its hook's execution device (offloaded weights sit on
        ``meta`` between passes), else the embedding's own device."""
        embed = self.hf.get_input_embeddings()
        hook = getattr(embed, "_hf_hook", None)
        where = getattr(hook, "execution_device", None)
        if where is None:
            return embed.weight.device
        return torch.device(where) if not isinstance(where, int) else torch.device("cuda", where)

    # --- tokens ------------------------------------------------------------------------
    def tokenize(self, prompts: Prompts) -> dict:
        """``input_ids`` and ``attention_mask`` for one prompt or a batch (left-padded)."""
        if isinstance(prompts, dict):
            if "input_ids" not in prompts:
                raise ValueError("A dict of inputs needs 'input_ids' (and optionally 'attention_mask').")
            ids, mask = torch.as_tensor(prompts["input_ids"]), prompts.get("attention_mask")
        elif isinstance(prompts, torch.Tensor):
            ids, mask = prompts, None
        else:
            if isinstance(prompts, str):
                prompts = [prompts]
            if (not isinstance(prompts, Sequence) or not prompts
                    or not all(isinstance(p, str) for p in prompts)):
                raise TypeError("Prompts must be a string, a non-empty list of strings, a tensor of token ids "
                                f"or a dict with input_ids; got {_describe(prompts)}.")
            empty = [i for i, p in enumerate(prompts) if not p]
            if empty:
                raise ValueError(f"Prompt {empty[0]} is the empty string: it has no token to predict from "
                                 "(in a batch it would be all padding). Remove it or give it some text.")
            enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"Token ids must be [batch, pos] with at least one position; got shape {tuple(ids.shape)}.")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"Token ids must be integers; got a {ids.dtype} tensor.")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.d_vocab):
            raise ValueError(f"Token id {int(ids.max()) if int(ids.max()) >= self.d_vocab else int(ids.min())} is "
                             f"outside this model's vocabulary (ids 0..{self.d_vocab - 1}); were the ids made by "
                             "another tokenizer?")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}; "
                             "they must match.")
        limit = getattr(self.hf.config, "max_position_embeddings", None)
        if limit and ids.shape[1] > limit:
            raise ValueError(f"The prompts are {ids.shape[1]} tokens long but {self.name} has "
                             f"max_position_embeddings={limit}: positions past it are outside what the model "
                             f"was built for. Shorten them to at most {limit} tokens.")
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def to_str_tokens(self, text: str) -> list[str]:
        """The tokens of ``text`` as strings (how the model sees it)."""
        ids = self.tokenizer(text)["input_ids"]
        return [self.tokenizer.decode([i]) for i in ids]

    def token_id(self, text: str) -> int:
        """The id of ``text`` when it is exactly one token (e.g. ``" Paris"``), else an error."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise ValueError(
                f"{text!r} is {len(ids)} tokens {pieces}, not one. Use a single-token string "
                "(mind the leading space: ' Paris' vs 'Paris') or compare the first token.")
        return ids[0]

    def chat_prompt(self, user: str, answer_prefix: str = "") -> str:
        """``user`` wrapped in the model's chat template, with the assistant's answer begun
        by ``answer_prefix`` (useful for instruction-tuned models such as SmolLM2)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return f"{user}\n{answer_prefix}"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return text + answer_prefix

    # --- forward passes ----------------------------------------------------------------
    def trace(self, *, cache: SiteSpec | None = None, edits: Sequence[Edit] = (),
              stop_early: bool = False, grad: bool = False, attention_mask: torch.Tensor | None = None) -> Trace:
        """A :class:`~interpbook.tracing.Trace` on this model, for forward passes you make
        (with ``grad``, enable gradients around them)."""
        return Trace(self.anatomy, cache=cache, edits=edits, stop_early=stop_early, grad=grad,
                     attention_mask=attention_mask)

    def forward_inputs(self, prompts: Prompts) -> dict:
        """Keyword arguments for ``self.hf``: tokens, mask, and positions that skip padding."""
        enc = self.tokenize(prompts)
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return {**enc, "position_ids": positions}

    def run(self, prompts: Prompts, *, cache: SiteSpec | None = None, edits: Sequence[Edit] = (),
            stop_early: bool = False, grad: bool = False, last_only: bool = False) -> Run:
        """One forward pass: record ``cache`` sites, apply ``edits``, return a :class:`Run`.
        With ``last_only``, only the last position is unembedded (``logits`` is
        ``[batch, 1, vocab]``): all a next-token metric needs, and much cheaper with a
        large vocabulary.

        ``model.run("The Eiffel Tower is in", cache="resid_post").cache["resid_post", 5]``
        """
        inputs = self.forward_inputs(prompts)
        tr = self.trace(cache=cache, edits=edits, stop_early=stop_early, grad=grad,
                        attention_mask=inputs["attention_mask"])
        logits = None
        with torch.set_grad_enabled(grad), tr:
            logits = self.hf(**inputs, use_cache=False, logits_to_keep=1 if last_only else 0).logits
        remember_source(tr.cache, inputs["attention_mask"])
        return Run(logits, tr.cache, inputs["input_ids"], inputs["attention_mask"])

    def logits(self, prompts: Prompts, **kwargs) -> torch.Tensor:
        """Next-token logits at the last position ``[batch, vocab]`` (only that position is
        unembedded)."""
        return self.run(prompts, last_only=True, **kwargs).last_logits

    def forward_last(self, inputs: dict) -> torch.Tensor:
        """Last-position logits ``[batch, vocab]`` of one forward pass on ready ``inputs``
        (``forward_inputs``, maybe repeated), under whatever trace or mask edit the caller
        has entered."""
        return self.hf(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]

    def prefix_cache(self, inputs: dict, end: int, *, edits: Sequence[Edit] = ()) -> tuple[object, dict]:
        """Split ready ``inputs`` (:meth:`forward_inputs`) at position ``end``: the keys and
        values of the positions before it (one no-grad pass under ``edits``) and the inputs
        of the positions from ``end`` on, for :meth:`forward_last_from`. Runs that differ
        only from ``end`` on can share the first part: attention is causal, so nothing done
        at later positions changes earlier ones."""
        n = inputs["input_ids"].shape[1]
        if not 0 < end < n:
            raise ValueError(f"end must split the {n} positions into two non-empty parts (0 < end < {n}); "
                             f"got {end}.")
        with torch.no_grad(), self.trace(edits=edits):
            past = self.hf(**{k: v[:, :end] for k, v in inputs.items()}, use_cache=True,
                           logits_to_keep=1).past_key_values
        rest = {"input_ids": inputs["input_ids"][:, end:], "position_ids": inputs["position_ids"][:, end:],
                "attention_mask": inputs["attention_mask"]}
        return past, rest

    def forward_last_from(self, past, rows: torch.Tensor, rest: dict) -> torch.Tensor:
        """Last-position logits ``[len(rows), vocab]`` of ``rest`` (from :meth:`prefix_cache`,
        one row per entry of ``rows``) run on top of the rows ``rows`` of the cache ``past``
        (copied, so ``past`` serves again), under whatever trace the caller has entered.
        Positions in edits count from the first position of ``rest``."""
        if rest["input_ids"].shape[0] != len(rows):
            raise ValueError(f"rest has {rest['input_ids'].shape[0]} rows but {len(rows)} cache rows were chosen; "
                             "repeat rest to one row per chosen cache row.")
        past = copy.deepcopy(past)
        past.batch_select_indices(rows)
        return self.hf(**rest, past_key_values=past, use_cache=True, logits_to_keep=1).logits[:, -1]

    def generate(self, prompt: str, max_new_tokens: int = 20, *, edits: Sequence[Edit] = (),
                 do_sample: bool = False, temperature: float = 1.0, seed: int | None = 0) -> str:
        """Continue ``prompt`` (greedy by default, or sampled with ``temperature``) and return
        only the new text. Edits that name positions act on the prompt pass only."""
        inputs = self.forward_inputs(prompt)
        inputs.pop("position_ids")
        if seed is not None:
            torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
        with torch.no_grad(), self.trace(edits=edits):
            out = self.hf.generate(**inputs, max_new_tokens=max_new_tokens,
                                   pad_token_id=self.tokenizer.pad_token_id, **sampling)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
