"""Reading and editing activations during a forward pass.

A :class:`Trace` is a context manager that puts hooks on the native modules that carry the
requested sites (see :mod:`interpbook.anatomy`), records activations into an
:class:`ActivationCache`, applies :class:`Edit` objects (patch, ablate, steer or any
function), can stop the forward pass once nothing later is needed, and removes every hook
when the block ends, also when it ends with an exception::

    with Trace(model.anatomy, cache=["resid_post"], edits=[ablate(("attn_z", 5), head=3)]) as tr:
        model.hf(input_ids)
    tr.cache["resid_post", 12]

:meth:`interpbook.Model.run` wraps exactly this around one forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from .anatomy import HEAD_SITES, LAYERLESS_SITES, SITES, Anatomy, check_site

Site = tuple[str, Union[int, None]]
SiteSpec = Union[str, tuple, Iterable]
Positions = Union[int, Sequence[int], slice, None]


class StopForward(Exception):
    """Raised inside a hook to end the forward pass early; swallowed by :class:`Trace`."""


def normalize_site(anatomy: Anatomy, spec) -> Site:
    """``"embed"`` or ``("resid_post", -1)`` -> a checked ``(site, layer)`` with layer >= 0."""
    if isinstance(spec, str):
        site, layer = spec, None
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        site, layer = spec
    else:
        raise TypeError(f"A site is a name or a (name, layer) pair such as ('resid_post', 3); got {spec!r}.")
    check_site(anatomy, site, layer)
    if layer is not None and layer < 0:
        layer += anatomy.n_layers
    return site, layer


def parse_sites(anatomy: Anatomy, spec: SiteSpec | None) -> list[Site]:
    """Expand a cache request into a list of sites.

    Accepts one site, a list of sites, or a bare per-layer name (``"resid_post"``) meaning
    that site at every layer.
    """
    if spec is None:
        return []
    items = [spec] if isinstance(spec, (str, tuple)) else list(spec)
    sites: list[Site] = []
    for item in items:
        if isinstance(item, str) and item not in LAYERLESS_SITES:
            check_site(anatomy, item, 0)
            sites += [(item, layer) for layer in range(anatomy.n_layers)]
        else:
            sites.append(normalize_site(anatomy, item))
    return list(dict.fromkeys(sites))


class ActivationCache(Mapping):
    """Activations recorded by a trace, addressed as ``cache["resid_post", 5]``.

    Negative layers count from the end; ``cache["embed"]`` for layerless sites.
    """

    def __init__(self, n_layers: int):
        self._store: dict[Site, torch.Tensor] = {}
        self.n_layers = n_layers

    def _key(self, key) -> Site:
        if isinstance(key, str):
            if key not in LAYERLESS_SITES and any(s == key for s, _ in self._store):
                raise KeyError(f"{key!r} is recorded per layer: use cache[{key!r}, layer] or cache.stack({key!r}).")
            key = (key, None)
        site, layer = key
        if layer is not None and layer < 0:
            layer += self.n_layers
        if (site, layer) not in self._store:
            have = ", ".join(sorted({s for s, _ in self._store})) or "nothing"
            raise KeyError(f"{(site, layer)!r} was not recorded; this cache holds: {have}.")
        return site, layer

    def __getitem__(self, key) -> torch.Tensor:
        return self._store[self._key(key)]

    def __setitem__(self, key: Site, value: torch.Tensor) -> None:
        self._store[key] = value

    def __iter__(self):
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def stack(self, site: str, layers: Iterable[int] | None = None) -> torch.Tensor:
        """One site across layers, stacked on a new first dimension ``[layer, ...]``."""
        layers = sorted(l for s, l in self._store if s == site) if layers is None else list(layers)
        if not layers:
            raise KeyError(f"Site {site!r} was not recorded at any layer.")
        return torch.stack([self[site, layer] for layer in layers])

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} entries: {sorted({s for s, _ in self._store})})"


def _index(pos: Positions, head) -> tuple:
    """Index tuple selecting (all batch, pos[, head]) with an outer product for two lists."""
    def norm(x):
        if x is None:
            return slice(None)
        if isinstance(x, (int, slice)):
            return x
        return torch.as_tensor(list(x), dtype=torch.long)

    p, h = norm(pos), norm(head)
    if isinstance(p, torch.Tensor) and isinstance(h, torch.Tensor):
        p = p[:, None]
    return (slice(None), p) if head is None else (slice(None), p, h)


@dataclass
class Edit:
    """A change to one site's activation: ``fn(value) -> new value`` in canonical shape.

    ``pos`` and ``head`` only document what the edit touches and let the trace check them
    against the model before the forward pass. Edits that name positions apply to the first
    forward pass in a trace (the prompt), not to later generation steps.
    """

    site: object
    fn: Callable[[torch.Tensor], torch.Tensor]
    pos: Positions = None
    head: object = None
    name: str = "edit"


def _select(name, site, pos, head, apply) -> Edit:
    """An edit that replaces the (pos, head) slice of a site with ``apply(slice)``."""
    idx = _index(pos, head)

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[idx] = apply(x[idx])
        return out

    return Edit(site, fn, pos, head, name)


def _checked(value: torch.Tensor, target: torch.Tensor, what: str, site) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=target.dtype, device=target.device)
    try:
        shape = torch.broadcast_shapes(value.shape, target.shape)
    except RuntimeError:
        shape = None
    if shape != target.shape:
        raise ValueError(
            f"{what} value for {site!r} has shape {tuple(value.shape)}, but the selected "
            f"activation has shape {tuple(target.shape)} (batch, positions[, heads], dim); "
            "pass a tensor of that shape or one that broadcasts to it."
        )
    return value


def patch(site, value: torch.Tensor, *, pos: Positions = None, head=None) -> Edit:
    """Replace a site's activation (or its ``pos``/``head`` slice) with ``value``.

    Typical use: ``patch(("resid_post", 8), clean_cache["resid_post", 8][:, -1], pos=-1)``.
    """
    return _select("patch", site, pos, head, lambda t: _checked(value, t, "Patch", site).expand_as(t))


def ablate(site, *, pos: Positions = None, head=None, value: torch.Tensor | float = 0.0) -> Edit:
    """Set a slice to ``value``: 0 (zero-ablation) or a mean activation (mean-ablation)."""
    return _select("ablate", site, pos, head, lambda t: _checked(value, t, "Ablation", site).expand_as(t))


def steer(site, vector: torch.Tensor, *, pos: Positions = None, scale: float = 1.0) -> Edit:
    """Add ``scale * vector`` to a site (activation steering / addition)."""
    return _select("steer", site, pos, None, lambda t: t + scale * _checked(vector, t, "Steering", site))


def edit(site, fn: Callable[[torch.Tensor], torch.Tensor], *, pos: Positions = None) -> Edit:
    """Apply any function to a site's activation (shape must be kept)."""
    return Edit(site, fn, pos, None, "edit")


@dataclass
class _Planned:
    site: Site
    edits: list = field(default_factory=list)
    record: bool = False


class Trace:
    """Context manager that records and edits sites on one model; see the module docstring.

    ``cache``: sites to record (see :func:`parse_sites`). ``edits``: :class:`Edit` objects.
    ``stop_early``: end the forward pass after the last layer that holds a recorded site
    (the model's output is then not computed). ``grad``: keep recorded tensors in the
    autograd graph (for gradient-based attribution).
    """

    def __init__(self, anatomy: Anatomy, *, cache: SiteSpec | None = None,
                 edits: Sequence[Edit] = (), stop_early: bool = False, grad: bool = False):
        self.anatomy = anatomy
        self.grad = grad
        self.cache = ActivationCache(anatomy.n_layers)
        self._handles: list = []
        self._fired: set = set()
        plan: dict[Site, _Planned] = {s: _Planned(s, record=True) for s in parse_sites(anatomy, cache)}
        for e in edits:
            if not isinstance(e, Edit):
                raise TypeError(f"edits must be Edit objects (from patch/ablate/steer/edit); got {type(e).__name__}.")
            site = normalize_site(anatomy, e.site)
            self._check_edit(site, e)
            plan.setdefault(site, _Planned(site)).edits.append(e)
        self._plan = plan
        self._stop_layer = None
        if stop_early:
            layers = [l if l is not None else (0 if s == "embed" else None) for s, l in plan]
            self._stop_layer = None if None in layers or not layers else max(layers)

    def _check_edit(self, site: Site, e: Edit) -> None:
        name, layer = site
        point = self.anatomy.hook_point(name, layer) if name != "resid_mid" else None
        if point is not None and not point.editable:
            raise ValueError(f"Site {name!r} can be recorded but not edited.")
        if e.head is not None:
            if name not in HEAD_SITES:
                raise ValueError(f"head= only applies to per-head sites ({', '.join(HEAD_SITES)}), not {name!r}.")
            n = self.anatomy.n_kv_heads if name in ("k", "v") else self.anatomy.n_heads
            heads = [e.head] if isinstance(e.head, int) else list(e.head)
            bad = [h for h in heads if not -n <= h < n]
            if bad:
                raise IndexError(f"Head {bad[0]} is out of range for {name!r} at layer {layer}: it has {n} heads (0..{n - 1}).")

    # --- hooks -------------------------------------------------------------------------
    def __enter__(self) -> "Trace":
        try:
            for site, planned in self._plan.items():
                if site[0] == "resid_mid":
                    self._hook_resid_mid(planned)
                else:
                    self._hook(self.anatomy.hook_point(*site), planned)
            if self._stop_layer is not None:
                self._handles.append(self.anatomy.layers()[self._stop_layer].register_forward_hook(self._stop))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        return exc_type is StopForward

    def remove(self) -> None:
        """Remove every hook this trace installed (safe to call twice)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _stop(module, args, output):
        raise StopForward

    def _process(self, planned: _Planned, value: torch.Tensor) -> torch.Tensor:
        first = planned.site not in self._fired
        self._fired.add(planned.site)
        for e in planned.edits:
            if e.pos is None or first:
                new = e.fn(value)
                if new.shape != value.shape:
                    raise ValueError(f"Edit of {planned.site!r} returned shape {tuple(new.shape)}; expected {tuple(value.shape)}.")
                value = new
        if planned.record and first:
            self.cache[planned.site] = value if self.grad else value.detach()
        return value

    def _hook(self, point, planned: _Planned) -> None:
        site = planned.site
        if point.side == "in":
            def pre(module, args, kwargs):
                raw = args[0] if args else kwargs["hidden_states"]
                new = self._process(planned, point.read(raw))
                if planned.edits:
                    new = point.write(raw, new)
                    return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})
                return None
            self._handles.append(point.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module, args, output):
                is_tuple = isinstance(output, tuple)
                raw = output[point.index or 0] if is_tuple else output
                if raw is None:
                    raise RuntimeError(
                        f"{site[0]!r} is not available: load the model with attn_implementation='eager' "
                        "(interpbook.load_model does) to get attention patterns.")
                new = self._process(planned, point.read(raw))
                if not planned.edits:
                    return None
                new = point.write(raw, new)
                if is_tuple:
                    out = list(output)
                    out[point.index or 0] = new
                    return tuple(out)
                return new
            self._handles.append(point.module.register_forward_hook(post))

    def _hook_resid_mid(self, planned: _Planned) -> None:
        """resid_mid = resid_pre + attn_out: record it at the MLP norm's input; edit it by
        rewriting attn_out as (edited resid_mid - resid_pre)."""
        layer = planned.site[1]
        if not planned.edits:
            self._hook(self.anatomy.hook_point("resid_mid", layer), planned)
            return
        seen: dict[str, torch.Tensor] = {}

        def remember(module, args, kwargs):
            seen["pre"] = args[0] if args else kwargs["hidden_states"]

        def rewrite(attn_out: torch.Tensor) -> torch.Tensor:
            return self._process(planned, seen["pre"] + attn_out) - seen["pre"]

        self._handles.append(self.anatomy.layers()[layer].register_forward_pre_hook(remember, with_kwargs=True))
        inner = _Planned(("attn_out", layer), [Edit(("attn_out", layer), rewrite)])
        self._hook(self.anatomy.attn_out_point(layer), inner)
