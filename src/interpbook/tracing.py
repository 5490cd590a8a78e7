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

import dataclasses
import operator
import weakref
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
        if layer is not None and not isinstance(layer, (int, float)):
            try:
                layer = operator.index(layer)  # numpy ints, 0-d integer tensors
            except TypeError:
                pass
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


Rows = Union[int, Sequence[int], slice, torch.Tensor, None]


def _selector(x, n: int, what: str):
    """One dimension's selector: an int or slice as given, a list or bool mask as a
    LongTensor of indices (checked against the dimension's length ``n``)."""
    if x is None:
        return slice(None)
    if isinstance(x, slice):
        return x
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool:
        x = int(x)
    if not isinstance(x, (bool, float, torch.Tensor, Sequence, range)):
        try:
            x = operator.index(x)  # ints, numpy ints
        except TypeError:
            pass
    if isinstance(x, int) and not isinstance(x, bool):
        if not -n <= x < n:
            raise IndexError(f"{what} {x} is out of range: this activation has {n} (0..{n - 1}).")
        return x
    bad = TypeError(f"{what} must be an int, a 1-D list of ints, a slice or a bool mask; got {x!r}.")
    if not isinstance(x, (torch.Tensor, Sequence, range)) or isinstance(x, str):
        raise bad
    t = torch.as_tensor(x.tolist() if isinstance(x, torch.Tensor) else list(x))
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"A bool mask for {what} needs one entry per element ({n}); got shape {tuple(t.shape)}.")
        return t.nonzero()[:, 0]
    if t.dim() != 1 or (t.numel() and t.is_floating_point()):
        raise bad
    t = t.long()
    if t.numel() and not (-n <= int(t.min()) and int(t.max()) < n):
        raise IndexError(f"{what} {t.tolist()} out of range: this activation has {n} (0..{n - 1}).")
    return t


def _index(shape: torch.Size, rows: Rows, pos: Positions, head) -> tuple:
    """Index tuple for ``(rows, pos[, head])`` of a ``[batch, pos(, head), ...]`` activation.

    Lists select an outer product (rows x positions x heads), ints drop their dimension, as
    in basic indexing: the selection of ``x[rows, pos, head]`` always has the dimensions of
    the non-int selectors, in order."""
    names = ["rows", "positions", "heads"][: 2 if head is None else 3]
    sels = [_selector(s, shape[i], names[i]) for i, s in enumerate([rows, pos, head][:len(names)])]
    if not any(isinstance(s, torch.Tensor) for s in sels):
        return tuple(sels)
    # Mixed lists and slices: make every selector a tensor so that the selected dimensions
    # stay in place, and shape the 1-D ones as an outer product.
    ts = [torch.arange(shape[i])[s] if isinstance(s, slice) else torch.as_tensor(s) for i, s in enumerate(sels)]
    n_vec = sum(t.dim() == 1 for t in ts)
    out, k = [], 0
    for t in ts:
        if t.dim() == 1:
            k += 1
            t = t.view(-1, *([1] * (n_vec - k)))
        out.append(t)
    return tuple(out)


@dataclass
class Edit:
    """A change to one site's activation: ``fn(value) -> new value`` in canonical shape.

    ``rows``, ``pos`` and ``head`` document what the edit touches and let the trace check
    them against the model before the forward pass. Edits that name positions apply to the
    first forward pass in a trace (the prompt), not to later generation steps. ``source``
    is the attention mask of the run a patched value was recorded in (see :func:`patch`).
    """

    site: object
    fn: Callable[[torch.Tensor], torch.Tensor]
    pos: Positions = None
    head: object = None
    name: str = "edit"
    rows: Rows = None
    source: torch.Tensor | None = None


def _select(name, site, rows, pos, head, apply, source=None) -> Edit:
    """An edit that replaces the (rows, pos, head) slice of a site with ``apply(slice)``."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        idx = _index(x.shape, rows, pos, head)
        out = x.clone()
        out[idx] = apply(x[idx])
        return out

    return Edit(site, fn, pos, head, name, rows, source)


def _checked(value: torch.Tensor, target: torch.Tensor, what: str, site) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=target.dtype, device=target.device)
    try:
        shape = torch.broadcast_shapes(value.shape, target.shape)
    except RuntimeError:
        shape = None
    if shape != target.shape:
        raise ValueError(
            f"{what} value for {site!r} has shape {tuple(value.shape)}, but the selected "
            f"activation has shape {tuple(target.shape)} (rows, positions[, heads], dim); "
            "pass a tensor of that shape or one that broadcasts to it."
        )
    return value


# --- where recorded activations came from ----------------------------------------------------
# Model.run registers every cached tensor's storage with the attention mask of its run, so that
# a patch made from it (also from a slice or view of it) can be checked against the run it is
# patched into: differently padded batches put different tokens at the same position.
_RECORDED: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def remember_source(cache: "ActivationCache", attention_mask: torch.Tensor) -> None:
    """Register the tensors of ``cache`` as recorded under ``attention_mask``."""
    for key in [k for k, (ref, _) in _RECORDED.items() if ref() is None]:
        del _RECORDED[key]
    mask = attention_mask.detach().cpu()
    for t in cache.values():
        _RECORDED[t.untyped_storage().data_ptr()] = (weakref.ref(t), mask)


def source_mask(value) -> torch.Tensor | None:
    """The attention mask of the run ``value`` (or the tensor it is a view of) was recorded
    in, when ``value`` still has that run's batch rows (so its positions are meant to line
    up with the patched run's); None otherwise, e.g. for a single vector moved on purpose."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    ptr = value.untyped_storage().data_ptr()
    ref, mask = _RECORDED.get(ptr, (None, None))
    alive = ref() if ref is not None else None
    if alive is None or alive.untyped_storage().data_ptr() != ptr or value.shape[0] != mask.shape[0]:
        return None
    return mask


def patch(site, value: torch.Tensor, *, pos: Positions = None, head=None, rows: Rows = None) -> Edit:
    """Replace a site's activation (or its ``rows``/``pos``/``head`` slice) with ``value``.

    Typical use: ``patch(("resid_post", 8), clean_cache["resid_post", 8][:, -1], pos=-1)``.
    ``rows`` selects batch rows (int, list, slice or bool mask), e.g. to patch a different
    position into each copy of a repeated batch. A value taken from another run's cache
    must come from a run with the same padding (attention mask) unless it patches the last
    position only (left padding aligns it); otherwise :meth:`Model.run` raises.
    """
    return _select("patch", site, rows, pos, head, lambda t: _checked(value, t, "Patch", site).expand_as(t),
                   source=source_mask(value))


def ablate(site, *, pos: Positions = None, head=None, rows: Rows = None,
           value: torch.Tensor | float = 0.0) -> Edit:
    """Set a slice to ``value``: 0 (zero-ablation) or a mean activation (mean-ablation)."""
    return _select("ablate", site, rows, pos, head, lambda t: _checked(value, t, "Ablation", site).expand_as(t))


def steer(site, vector: torch.Tensor, *, pos: Positions = None, rows: Rows = None, scale: float = 1.0) -> Edit:
    """Add ``scale * vector`` to a site (activation steering / addition)."""
    return _select("steer", site, rows, pos, None, lambda t: t + scale * _checked(vector, t, "Steering", site))


def edit(site, fn: Callable[[torch.Tensor], torch.Tensor], *, pos: Positions = None, rows: Rows = None) -> Edit:
    """Apply any function to a site's activation (shape must be kept).

    With ``rows``, ``fn`` sees and returns only those batch rows; ``pos`` does not slice,
    it marks the edit as one for the prompt pass only (not later generation steps)."""
    if rows is None:
        return Edit(site, fn, pos, None, "edit")
    return dataclasses.replace(_select("edit", site, rows, None, None, fn), pos=pos)


def _as_anatomy(obj) -> Anatomy:
    """Accept a Model where an Anatomy is expected (``Trace(model, ...)``)."""
    if isinstance(obj, Anatomy):
        return obj
    if isinstance(getattr(obj, "anatomy", None), Anatomy):
        return obj.anatomy
    raise TypeError(f"Trace needs a model's anatomy (model.anatomy) or the Model itself; got {type(obj).__name__}. "
                    "Easiest: `with model.trace(cache=...)`.")


def _check_source(site: Site, e: Edit, mask: torch.Tensor | None) -> None:
    """Refuse a patch recorded under different padding than the run it goes into."""
    src = e.source
    if src is None or mask is None or (isinstance(e.pos, int) and e.pos == -1):
        return
    mask = mask.detach().cpu()
    if e.rows is not None:  # the rows patched must carry the source's padding
        rows = _selector(e.rows, mask.shape[0], "rows")
        mask = mask[[rows]] if isinstance(rows, int) else mask[rows]
    padded = not bool(src.all()) or not bool(mask.all())
    if padded and not (src.shape == mask.shape and torch.equal(src, mask)):
        def pads(m):
            return f"shape {list(m.shape)}, {int((m == 0).sum())} padding tokens"
        raise ValueError(
            f"The value patched into {site!r} was recorded in a run padded differently ({pads(src)}) "
            f"from this run ({pads(mask)}): the same position holds different tokens in the two, so the "
            "patch would reproduce neither. Use prompts of equal token length (no padding), the same "
            "batch layout in both runs, or patch the last position only (pos=-1). If the alignment is "
            "intended, patch a copy (value.clone()) to skip this check.")


@dataclass
class _Planned:
    site: Site
    edits: list = field(default_factory=list)
    record: bool = False


class Trace:
    """Context manager that records and edits sites on one model; see the module docstring.

    ``cache``: sites to record (see :func:`parse_sites`). ``edits``: :class:`Edit` objects.
    ``stop_early``: end the forward pass after the last layer that holds a recorded site
    (the model's output is then not computed). ``grad``: recorded tensors stay in the
    autograd graph and the rest of the forward pass is computed from them, so
    ``torch.autograd.grad(metric, [cache[s] for s in sites])`` gives each site's gradient
    (enable gradients around the forward pass; :meth:`Model.run` does). ``attention_mask``:
    the mask of the forward pass, used to check patches recorded in another run.
    A trace is good for one ``with`` block; make a new one for the next.
    """

    def __init__(self, anatomy, *, cache: SiteSpec | None = None,
                 edits: Sequence[Edit] = (), stop_early: bool = False, grad: bool = False,
                 attention_mask: torch.Tensor | None = None):
        anatomy = _as_anatomy(anatomy)
        self.anatomy = anatomy
        self.grad = grad
        self._used = False
        self.cache = ActivationCache(anatomy.n_layers)
        self._handles: list = []
        self._fired: set = set()
        plan: dict[Site, _Planned] = {s: _Planned(s, record=True) for s in parse_sites(anatomy, cache)}
        for e in edits:
            if not isinstance(e, Edit):
                raise TypeError(f"edits must be Edit objects (from patch/ablate/steer/edit); got {type(e).__name__}.")
            site = normalize_site(anatomy, e.site)
            self._check_edit(site, e)
            _check_source(site, e, attention_mask)
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
        if self._used:
            raise RuntimeError(
                "This Trace was already used for a `with` block: its cache holds the earlier pass and "
                "its position edits would be skipped. Make a new one (model.trace(...)) for each block.")
        self._used = True
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

    def _routes_grad(self, planned: _Planned) -> bool:
        """With ``grad``, a recorded site is written back so that the rest of the pass is
        computed from the cached tensor (a view such as attn_z would otherwise hang off the
        graph, and resid_mid read at the MLP norm would miss the residual branch)."""
        return self.grad and planned.record

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
            if self.grad and not value.requires_grad:
                # nothing before it needs a gradient (weights frozen, as load_model leaves
                # them): the recorded tensor becomes the graph's leaf
                value = value.detach().requires_grad_()
            self.cache[planned.site] = value if self.grad else value.detach()
        return value

    def _hook(self, point, planned: _Planned) -> None:
        site = planned.site
        if point.side == "in":
            def pre(module, args, kwargs):
                raw = args[0] if args else kwargs["hidden_states"]
                new = self._process(planned, point.read(raw))
                if planned.edits or self._routes_grad(planned):
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
                if not (planned.edits or self._routes_grad(planned)):
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
        if not (planned.edits or self._routes_grad(planned)):
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
