"""One vocabulary for the parts of a transformer, whatever the architecture.

Every chapter names activations by canonical *sites*, addressed as ``(site, layer)``:

================  ===========================================================  ==========================
site              what it is                                                   shape
================  ===========================================================  ==========================
``embed``         token embeddings (no layer)                                  [batch, pos, d_model]
``resid_pre``     residual stream entering block ``layer``                     [batch, pos, d_model]
``attn_out``      what attention adds to the residual stream                   [batch, pos, d_model]
``resid_mid``     residual stream between attention and MLP                    [batch, pos, d_model]
``mlp_out``       what the MLP adds to the residual stream                     [batch, pos, d_model]
``resid_post``    residual stream leaving block ``layer``                      [batch, pos, d_model]
``mlp_act``       neuron activations (``act(gate) * up`` for gated MLPs)       [batch, pos, d_mlp]
``attn_z``        per-head outputs before the output projection                [batch, pos, head, d_head]
``attn_pattern``  attention weights (recorded, not edited)                     [batch, head, query, key]
``q, k, v``       projections before rotary embedding (k, v: per KV head)      [batch, pos, head, d_head]
``final_norm``    the final normalisation's output (no layer)                  [batch, pos, d_model]
================  ===========================================================  ==========================

Weight views (:class:`Anatomy`) follow the same convention for every family: ``W_Q``,
``W_K``, ``W_V`` are ``[head, d_model, d_head]`` (grouped-query K/V expanded to every query
head), ``W_O`` is ``[head, d_head, d_model]``, ``W_in``/``W_gate`` are ``[d_model, d_mlp]``,
``W_out`` is ``[d_mlp, d_model]``, ``W_E`` is ``[vocab, d_model]``, ``W_U`` is
``[d_model, vocab]``. A row vector times a matrix is the model's computation: ``x @ W``.

Adapters exist for the Llama family (SmolLM2, Llama, Qwen2, Mistral), Gemma 3, GPT-2 and
GPT-NeoX. The hooks sit on the native Hugging Face modules, so the model's own forward pass
runs unchanged.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

SITES = (
    "embed", "resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post",
    "mlp_act", "attn_z", "attn_pattern", "q", "k", "v", "final_norm",
)
LAYERLESS_SITES = ("embed", "final_norm")
HEAD_SITES = ("attn_z", "attn_pattern", "q", "k", "v")


@dataclass(frozen=True)
class HookPoint:
    """Where a site lives on the native model and how to read or write it there.

    ``side`` is ``"in"`` (the module's first input) or ``"out"`` (its output; ``index``
    picks an element when the output is a tuple). ``read`` turns the raw tensor into the
    canonical shape; ``write(raw, value)`` returns a raw tensor holding the canonical value.
    """

    module: nn.Module
    side: str
    index: int | None = None
    read: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    write: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda raw, value: value
    editable: bool = True


def split_heads(n_heads: int) -> tuple[Callable, Callable]:
    """read/write pair for a [batch, pos, heads*d_head] tensor viewed per head."""

    def read(t):
        return t.view(*t.shape[:-1], n_heads, t.shape[-1] // n_heads)

    def write(raw, value):
        return value.reshape(raw.shape)

    return read, write


def fused_part(part: int, n_parts: int, n_heads: int, interleaved: bool) -> tuple[Callable, Callable]:
    """read/write pair for one of q, k, v inside a fused projection output.

    GPT-2 lays the output out as [q | k | v] (``interleaved=False``); GPT-NeoX as
    per-head [q_h k_h v_h] blocks (``interleaved=True``).
    """

    def view(t):
        if interleaved:
            return t.view(*t.shape[:-1], n_heads, n_parts, t.shape[-1] // (n_heads * n_parts))
        return t.view(*t.shape[:-1], n_parts, n_heads, t.shape[-1] // (n_heads * n_parts))

    def read(t):
        return view(t)[..., :, part, :] if interleaved else view(t)[..., part, :, :]

    def write(raw, value):
        out = raw.clone()
        target = view(out)
        if interleaved:
            target[..., :, part, :] = value
        else:
            target[..., part, :, :] = value
        return out

    return read, write


class Anatomy:
    """Architecture adapter: canonical sites and weight views for one model family.

    Subclasses name the native modules; everything else is shared.
    """

    family = "base"

    def __init__(self, hf: nn.Module):
        self.hf = hf
        cfg = hf.config
        self.n_layers: int = cfg.num_hidden_layers
        self.n_heads: int = cfg.num_attention_heads
        self.d_model: int = cfg.hidden_size
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_head: int = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        self.d_vocab: int = cfg.vocab_size

    # --- native modules, named by subclasses -------------------------------------------
    def layers(self) -> nn.ModuleList: raise NotImplementedError
    def embedding(self) -> nn.Embedding: raise NotImplementedError
    def final_norm(self) -> nn.Module: raise NotImplementedError
    def attn(self, layer: int) -> nn.Module: raise NotImplementedError
    def mlp(self, layer: int) -> nn.Module: raise NotImplementedError
    def ln1(self, layer: int) -> nn.Module: raise NotImplementedError
    def ln2(self, layer: int) -> nn.Module:
        """Norm in front of the MLP; its input is ``resid_mid`` in sequential blocks."""
        raise NotImplementedError
    def o_proj(self, layer: int) -> nn.Module: raise NotImplementedError
    def down_proj(self, layer: int) -> nn.Module: raise NotImplementedError
    def act_fn(self, layer: int) -> Callable: raise NotImplementedError

    @property
    def d_mlp(self) -> int:
        return self.W_out(0).shape[0]

    @property
    def parallel_residual(self) -> bool:
        """True when attention and MLP both read ``resid_pre`` (no ``resid_mid`` exists)."""
        return False

    @property
    def gated(self) -> bool:
        return False

    # --- sites -------------------------------------------------------------------------
    def hook_point(self, site: str, layer: int | None) -> HookPoint:
        """The native module and side that carry ``(site, layer)``."""
        if site == "embed":
            return HookPoint(self.embedding(), "out")
        if site == "final_norm":
            return HookPoint(self.final_norm(), "out")
        if site == "resid_pre":
            return HookPoint(self.layers()[layer], "in")
        if site == "resid_post":
            return HookPoint(self.layers()[layer], "out", index=0)
        if site == "attn_out":
            return self.attn_out_point(layer)
        if site == "mlp_out":
            return self.mlp_out_point(layer)
        if site == "resid_mid":
            # Read at the MLP norm's input; writing there would miss the residual branch, so
            # edits of resid_mid are made through attn_out (see tracing.Trace).
            return HookPoint(self.ln2(layer), "in", editable=False)
        if site == "mlp_act":
            return HookPoint(self.down_proj(layer), "in")
        if site == "attn_z":
            read, write = split_heads(self.n_heads)
            return HookPoint(self.o_proj(layer), "in", read=read, write=write)
        if site == "attn_pattern":
            return HookPoint(self.attn(layer), "out", index=1, editable=False)
        if site in ("q", "k", "v"):
            return self.qkv_point(site, layer)
        raise KeyError(site)

    def post_attn_norm(self, layer: int) -> nn.Module:
        """Norm applied to the attention output before it joins the residual (Gemma)."""
        return nn.Identity()

    def post_mlp_norm(self, layer: int) -> nn.Module:
        """Norm applied to the MLP output before it joins the residual (Gemma)."""
        return nn.Identity()

    def attn_out_point(self, layer: int) -> HookPoint:
        return HookPoint(self.attn(layer), "out", index=0)

    def mlp_out_point(self, layer: int) -> HookPoint:
        return HookPoint(self.mlp(layer), "out")

    def qkv_point(self, site: str, layer: int) -> HookPoint:
        raise NotImplementedError

    # --- weight views ------------------------------------------------------------------
    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding matrix [vocab, d_model] (before any embedding scale)."""
        return self.embedding().weight

    @property
    def embed_scale(self) -> float:
        """How much the model scales token embeddings (sqrt(d_model) for Gemma, 1 elsewhere)."""
        return 1.0

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding matrix [d_model, vocab]."""
        return self.hf.get_output_embeddings().weight.T

    @property
    def b_U(self) -> torch.Tensor | None:
        return self.hf.get_output_embeddings().bias

    def _per_head_in(self, weight: torch.Tensor, n: int) -> torch.Tensor:
        """nn.Linear weight [n*d_head, d_model] -> [n, d_model, d_head]."""
        return weight.view(n, self.d_head, self.d_model).transpose(1, 2)

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """Repeat per-KV-head tensors so that query head h sees KV head h // group."""
        return t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    def W_Q(self, layer: int) -> torch.Tensor: raise NotImplementedError
    def W_K(self, layer: int) -> torch.Tensor: raise NotImplementedError
    def W_V(self, layer: int) -> torch.Tensor: raise NotImplementedError
    def b_Q(self, layer: int) -> torch.Tensor | None: return None
    def b_K(self, layer: int) -> torch.Tensor | None: return None
    def b_V(self, layer: int) -> torch.Tensor | None: return None

    def W_O(self, layer: int) -> torch.Tensor:
        """[head, d_head, d_model]"""
        w = self.o_proj(layer).weight  # [d_model, heads*d_head] for nn.Linear
        return w.T.reshape(self.n_heads, self.d_head, self.d_model)

    def b_O(self, layer: int) -> torch.Tensor | None:
        return self.o_proj(layer).bias

    def W_in(self, layer: int) -> torch.Tensor: raise NotImplementedError
    def W_gate(self, layer: int) -> torch.Tensor | None: return None
    def b_in(self, layer: int) -> torch.Tensor | None: return None
    def W_out(self, layer: int) -> torch.Tensor: raise NotImplementedError
    def b_out(self, layer: int) -> torch.Tensor | None: return None

    # --- small computations every chapter needs -----------------------------------------
    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a residual-stream vector: final norm, then unembedding."""
        return self.logits_from_normed(self.final_norm()(resid))

    def logits_from_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits from the final norm's output, as the model's head computes them."""
        return self.softcap(self.hf.get_output_embeddings()(normed))

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's final logit soft-capping (``cap * tanh(logits / cap)``; Gemma), if any."""
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    # --- norm folding -------------------------------------------------------------------
    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """The per-dimension gain ``g`` of a normalisation module ``[d_model]``, the diagonal
        that norm folding multiplies into the next weight matrix (see :func:`norm_gain`)."""
        return norm_gain(norm, self.d_model)

    def folded_W_U(self) -> torch.Tensor:
        """The unembedding with the final norm's gain folded in, ``diag(g) W_U`` ``[d_model, vocab]``.

        A residual vector reaches the logits as ``(centred(x) * scale(x)) @ folded_W_U`` plus
        constant biases, where ``scale`` is shared by everything in the residual stream at that
        position (see :func:`interpbook.lenses.direct_logit_attribution`)."""
        with torch.no_grad():
            return self.norm_gain(self.final_norm())[:, None] * self.W_U

    def mlp_act_from(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Neuron activations for an already-normalised MLP input ``x`` [.., d_model]."""
        act = self.act_fn(layer)
        pre = x @ self.W_in(layer) + (0 if self.b_in(layer) is None else self.b_in(layer))
        if self.gated:
            return act(x @ self.W_gate(layer)) * pre
        return act(pre)


def norm_kind(norm: nn.Module) -> str:
    """``"layernorm"`` (centre, divide by the standard deviation), ``"rmsnorm"`` (divide by
    the root mean square; Llama's gain ``g``, Gemma's ``1 + g``) or ``"identity"``."""
    if isinstance(norm, nn.Identity):
        return "identity"
    if isinstance(norm, nn.LayerNorm):
        return "layernorm"
    if isinstance(norm, nn.RMSNorm) or (
            hasattr(norm, "weight") and (hasattr(norm, "variance_epsilon") or hasattr(norm, "eps"))):
        return "rmsnorm"
    raise TypeError(
        f"{type(norm).__name__} is not a normalisation interpbook knows how to fold: expected "
        "nn.LayerNorm, an RMSNorm (a module with `weight` and `eps`/`variance_epsilon`) or nn.Identity.")


def norm_eps(norm: nn.Module) -> float:
    """The epsilon a normalisation adds under its square root (0 for ``nn.Identity``)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0))
    if eps is None:  # torch.nn.RMSNorm's default: the dtype's machine epsilon
        eps = torch.finfo(norm.weight.dtype if norm.weight is not None else torch.float32).eps
    return float(eps)


def norm_gain(norm: nn.Module, d_model: int) -> torch.Tensor:
    """The per-dimension gain of a normalisation module ``[d_model]``.

    LayerNorm: its ``weight`` (centring and bias are not part of the gain). RMSNorm: read off
    the module itself by normalising a vector of ones (RMS 1), so Llama's ``g`` and Gemma's
    ``1 + g`` both come out right without knowing the parameterisation; the ``eps`` under the
    square root is divided back out. Identity: ones."""
    kind = norm_kind(norm)
    if kind == "identity":
        return torch.ones(d_model)
    if kind == "layernorm":
        return norm.weight.detach() if norm.weight is not None else torch.ones(d_model)
    w = norm.weight
    ones = torch.ones(1, d_model, dtype=torch.float32 if w is None else w.dtype,
                      device=None if w is None else w.device)
    with torch.no_grad():
        return norm(ones)[0] * (1.0 + norm_eps(norm)) ** 0.5


def norm_scale(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The factor a normalisation divides ``x [..., d_model]`` by, inverted: ``[...]``.

    ``1 / sqrt(mean(x^2) + eps)`` for RMSNorm, ``1 / sqrt(var(x) + eps)`` for LayerNorm,
    1 for Identity. Together with :func:`norm_gain` and centring,
    ``norm(x) = centred(x) * scale(x) * gain + bias``."""
    kind = norm_kind(norm)
    x = x.detach().float()
    if kind == "identity":
        return torch.ones(x.shape[:-1], device=x.device)
    spread = x.var(-1, unbiased=False) if kind == "layernorm" else x.pow(2).mean(-1)
    return torch.rsqrt(spread + norm_eps(norm))


def norm_as_linear(norm: nn.Module, components: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply ``norm`` to each of ``components [..., d_model]`` as the linear map it is once
    its scale is frozen at ``x`` (the full input the components sum to), without the bias.

    ``norm(x) = sum_c norm_as_linear(norm, c, x) + bias`` whenever ``sum_c c = x``. The
    components broadcast against ``x``: put extra leading dimensions first, e.g.
    ``[n_components, batch, pos, d_model]`` against ``x [batch, pos, d_model]``."""
    if components.shape[-1] != x.shape[-1]:
        raise ValueError(f"Components end in {components.shape[-1]} dimensions but the normalised "
                         f"input ends in {x.shape[-1]}: both must be d_model vectors.")
    d = x.shape[-1]
    gain = norm_gain(norm, d).to(device=components.device, dtype=torch.float32)
    c = components.float()
    if norm_kind(norm) == "layernorm":
        c = c - c.mean(-1, keepdim=True)
    scale = norm_scale(norm, x)[..., None]
    try:
        torch.broadcast_shapes(c.shape, scale.shape)
    except RuntimeError:
        raise ValueError(
            f"Components of shape {tuple(components.shape)} do not line up with the normalised input "
            f"of shape {tuple(x.shape)}: the input's dimensions must match the components' last ones "
            "(put extra dimensions such as heads or neurons first).") from None
    return c * scale * gain


class LlamaAnatomy(Anatomy):
    """Llama, SmolLM2, Qwen2, Mistral: pre-norm blocks, RMSNorm, gated MLP, GQA."""

    family = "llama"

    def _base(self): return self.hf.model
    def layers(self): return self._base().layers
    def embedding(self): return self._base().embed_tokens
    def final_norm(self): return self._base().norm
    def attn(self, layer): return self.layers()[layer].self_attn
    def mlp(self, layer): return self.layers()[layer].mlp
    def ln1(self, layer): return self.layers()[layer].input_layernorm
    def ln2(self, layer): return self.layers()[layer].post_attention_layernorm
    def o_proj(self, layer): return self.attn(layer).o_proj
    def down_proj(self, layer): return self.mlp(layer).down_proj
    def act_fn(self, layer): return self.mlp(layer).act_fn

    @property
    def gated(self): return True

    def qkv_point(self, site, layer):
        proj = getattr(self.attn(layer), f"{site}_proj")
        read, write = split_heads(self.n_heads if site == "q" else self.n_kv_heads)
        return HookPoint(proj, "out", read=read, write=write)

    def _proj(self, layer, name):
        return getattr(self.attn(layer), f"{name}_proj")

    def W_Q(self, layer):
        return self._per_head_in(self._proj(layer, "q").weight, self.n_heads)

    def W_K(self, layer):
        return self.expand_kv(self._per_head_in(self._proj(layer, "k").weight, self.n_kv_heads))

    def W_V(self, layer):
        return self.expand_kv(self._per_head_in(self._proj(layer, "v").weight, self.n_kv_heads))

    def _bias(self, layer, name, n):
        b = self._proj(layer, name).bias
        return None if b is None else b.view(n, self.d_head)

    def b_Q(self, layer): return self._bias(layer, "q", self.n_heads)

    def b_K(self, layer):
        b = self._bias(layer, "k", self.n_kv_heads)
        return None if b is None else self.expand_kv(b)

    def b_V(self, layer):
        b = self._bias(layer, "v", self.n_kv_heads)
        return None if b is None else self.expand_kv(b)

    def W_in(self, layer): return self.mlp(layer).up_proj.weight.T
    def W_gate(self, layer): return self.mlp(layer).gate_proj.weight.T
    def b_in(self, layer): return self.mlp(layer).up_proj.bias
    def W_out(self, layer): return self.mlp(layer).down_proj.weight.T
    def b_out(self, layer): return self.mlp(layer).down_proj.bias


class Gemma3Anatomy(LlamaAnatomy):
    """Gemma 3: like Llama, plus norms after attention and MLP, scaled embeddings, and
    RMSNorm on queries and keys. ``attn_out``/``mlp_out`` are taken after the post-norms,
    i.e. exactly what is added to the residual stream."""

    family = "gemma3"

    def ln2(self, layer): return self.layers()[layer].pre_feedforward_layernorm
    def post_attn_norm(self, layer): return self.layers()[layer].post_attention_layernorm
    def post_mlp_norm(self, layer): return self.layers()[layer].post_feedforward_layernorm

    def attn_out_point(self, layer):
        return HookPoint(self.post_attn_norm(layer), "out")

    def mlp_out_point(self, layer):
        return HookPoint(self.post_mlp_norm(layer), "out")

    @property
    def embed_scale(self):
        return float(self.embedding().scalar_embed_scale)


class FusedQKVAnatomy(Anatomy):
    """Families whose Q, K and V come out of one projection; subclasses slice it."""

    def _qkv_weight(self, layer: int, part: int) -> torch.Tensor: raise NotImplementedError
    def _qkv_bias(self, layer: int, part: int) -> torch.Tensor: raise NotImplementedError

    def W_Q(self, layer): return self._qkv_weight(layer, 0)
    def W_K(self, layer): return self._qkv_weight(layer, 1)
    def W_V(self, layer): return self._qkv_weight(layer, 2)
    def b_Q(self, layer): return self._qkv_bias(layer, 0)
    def b_K(self, layer): return self._qkv_bias(layer, 1)
    def b_V(self, layer): return self._qkv_bias(layer, 2)


class GPT2Anatomy(FusedQKVAnatomy):
    """GPT-2: LayerNorm, learned positions, fused QKV in Conv1D (weights stored [in, out])."""

    family = "gpt2"

    def layers(self): return self.hf.transformer.h
    def embedding(self): return self.hf.transformer.wte
    def final_norm(self): return self.hf.transformer.ln_f
    def attn(self, layer): return self.layers()[layer].attn
    def mlp(self, layer): return self.layers()[layer].mlp
    def ln1(self, layer): return self.layers()[layer].ln_1
    def ln2(self, layer): return self.layers()[layer].ln_2
    def o_proj(self, layer): return self.attn(layer).c_proj
    def down_proj(self, layer): return self.mlp(layer).c_proj
    def act_fn(self, layer): return self.mlp(layer).act

    def qkv_point(self, site, layer):
        read, write = fused_part("qkv".index(site), 3, self.n_heads, interleaved=False)
        return HookPoint(self.attn(layer).c_attn, "out", read=read, write=write)

    def _qkv_weight(self, layer, part):
        w = self.attn(layer).c_attn.weight  # [d_model, 3*d_model]
        return w[:, part * self.d_model:(part + 1) * self.d_model].view(
            self.d_model, self.n_heads, self.d_head).transpose(0, 1)

    def _qkv_bias(self, layer, part):
        b = self.attn(layer).c_attn.bias
        return b[part * self.d_model:(part + 1) * self.d_model].view(self.n_heads, self.d_head)

    def W_O(self, layer):
        return self.o_proj(layer).weight.view(self.n_heads, self.d_head, self.d_model)

    def W_in(self, layer): return self.mlp(layer).c_fc.weight
    def b_in(self, layer): return self.mlp(layer).c_fc.bias
    def W_out(self, layer): return self.mlp(layer).c_proj.weight
    def b_out(self, layer): return self.mlp(layer).c_proj.bias


class NeoXAnatomy(FusedQKVAnatomy):
    """GPT-NeoX / Pythia: LayerNorm, partial rotary, per-head fused QKV, and (usually)
    parallel attention and MLP, in which case there is no ``resid_mid``."""

    family = "gpt_neox"

    def layers(self): return self.hf.gpt_neox.layers
    def embedding(self): return self.hf.gpt_neox.embed_in
    def final_norm(self): return self.hf.gpt_neox.final_layer_norm
    def attn(self, layer): return self.layers()[layer].attention
    def mlp(self, layer): return self.layers()[layer].mlp
    def ln1(self, layer): return self.layers()[layer].input_layernorm
    def ln2(self, layer): return self.layers()[layer].post_attention_layernorm
    def o_proj(self, layer): return self.attn(layer).dense
    def down_proj(self, layer): return self.mlp(layer).dense_4h_to_h
    def act_fn(self, layer): return self.mlp(layer).act

    @property
    def parallel_residual(self):
        return bool(self.hf.config.use_parallel_residual)

    def qkv_point(self, site, layer):
        read, write = fused_part("qkv".index(site), 3, self.n_heads, interleaved=True)
        return HookPoint(self.attn(layer).query_key_value, "out", read=read, write=write)

    def _qkv(self, layer):
        return self.attn(layer).query_key_value

    def _qkv_weight(self, layer, part):
        w = self._qkv(layer).weight.view(self.n_heads, 3, self.d_head, self.d_model)
        return w[:, part].transpose(1, 2)

    def _qkv_bias(self, layer, part):
        return self._qkv(layer).bias.view(self.n_heads, 3, self.d_head)[:, part]

    def W_in(self, layer): return self.mlp(layer).dense_h_to_4h.weight.T
    def b_in(self, layer): return self.mlp(layer).dense_h_to_4h.bias
    def W_out(self, layer): return self.mlp(layer).dense_4h_to_h.weight.T
    def b_out(self, layer): return self.mlp(layer).dense_4h_to_h.bias


ADAPTERS: dict[str, type[Anatomy]] = {
    "llama": LlamaAnatomy, "qwen2": LlamaAnatomy, "mistral": LlamaAnatomy,
    "gemma3_text": Gemma3Anatomy, "gemma3": Gemma3Anatomy,
    "gpt2": GPT2Anatomy, "gpt_neox": NeoXAnatomy,
}


def anatomy_for(hf: nn.Module) -> Anatomy:
    """The adapter for a Hugging Face causal LM, by its ``config.model_type``."""
    kind = hf.config.model_type
    if kind not in ADAPTERS:
        raise NotImplementedError(
            f"No anatomy adapter for model_type {kind!r}; supported: {', '.join(sorted(ADAPTERS))}. "
            "An adapter is a small subclass of interpbook.anatomy.Anatomy naming the modules."
        )
    return ADAPTERS[kind](hf)


def check_site(anatomy: Anatomy, site: str, layer: int | None) -> None:
    """Raise a specific error for a misspelled site or a layer out of range."""
    if site not in SITES:
        close = difflib.get_close_matches(site, SITES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"Unknown site {site!r}.{hint} Sites: {', '.join(SITES)}.")
    if site in LAYERLESS_SITES:
        if layer is not None:
            raise ValueError(f"Site {site!r} has no layer; address it as {site!r}, not ({site!r}, {layer}).")
        return
    if layer is None:
        raise ValueError(f"Site {site!r} needs a layer, e.g. ({site!r}, 0).")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(
            f"A layer index must be an int, e.g. ({site!r}, {int(layer) if isinstance(layer, float) and layer.is_integer() else 0}); "
            f"got {layer!r} ({type(layer).__name__}). Derive layers with round(...) or int(...).")
    if not -anatomy.n_layers <= layer < anatomy.n_layers:
        raise IndexError(
            f"Layer {layer!r} is out of range for {site!r}: this model has {anatomy.n_layers} "
            f"layers (0..{anatomy.n_layers - 1}, or negative from the end)."
        )
    if site == "resid_mid" and anatomy.parallel_residual:
        raise ValueError(
            "This model computes attention and MLP in parallel from resid_pre, so it has no "
            "resid_mid; use resid_pre, attn_out or mlp_out."
        )
