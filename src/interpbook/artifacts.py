"""Trained artefacts (tuned lenses, sparse autoencoders, ...) cached on disk, trained once.

Several chapters train something small on the model (a tuned lens in Week 3, sparse
autoencoders in Weeks 7 and 8). Training is the slow part of a cold book build, so the
result is saved under :func:`interpbook.models.cache_dir` and reused, by every chapter that
asks for the same thing. :func:`cached` is the one helper that does it:

* the **key** is a digest of a JSON *spec* that names everything the result depends on
  (model name and shape, every hyper-parameter, a digest of the training tokens, a format
  version): change any of them and a new artefact is trained;
* a **file lock** makes a second kernel wait for the first one's training instead of
  training the same thing twice;
* the file is written to a temporary name and renamed (``os.replace``), so nobody ever
  reads half a file, and nothing is left behind when training fails;
* a **content digest** (SHA-256 of the saved bytes) heads the file and is checked on
  load: a truncated or corrupted file is reported with a warning, removed and trained
  again. (The digest shares the file, so one rename publishes both; the lock files live
  in ``cache_dir()/.locks``, so a kind's folder holds only finished artefacts.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .models import cache_dir

__all__ = ["spec_key", "tensor_digest", "artifact_path", "cached"]


def spec_key(spec: dict) -> str:
    """A short digest of ``spec`` (JSON with sorted keys): equal specs, equal keys."""
    try:
        text = json.dumps(spec, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"An artefact spec must be plain JSON (str, numbers, lists, dicts): {err}") from None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's values and shape (e.g. the training token ids, for a spec)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def artifact_path(kind: str, name: str, spec: dict) -> Path:
    """``cache_dir()/<kind>/<name>-<key>.pt``: where :func:`cached` keeps this artefact."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", kind):
        raise ValueError(f"kind must be a plain folder name (letters, digits, _ . -); got {kind!r}.")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return cache_dir() / kind / f"{safe}-{spec_key(spec)}.pt"


_MAGIC = b"interpbook-artifact sha256="


def _atomic_write(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _encode(obj: Any) -> bytes:
    """``torch.save`` bytes of ``obj`` behind a header line holding their SHA-256."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    body = buf.getvalue()
    return _MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def _decode(blob: bytes) -> Any:
    """The object saved by ``_encode``; ``ValueError`` when the bytes do not check out."""
    head, sep, body = blob.partition(b"\n")
    if not sep or not head.startswith(_MAGIC):
        raise ValueError("it has no digest header")
    if hashlib.sha256(body).hexdigest().encode() != head[len(_MAGIC):]:
        raise ValueError("its bytes do not match its digest (truncated or corrupted)")
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)


def _load_checked(path: Path) -> Any | None:
    """The saved object, or ``None`` when there is none; a file that fails its digest
    check is removed with a warning (and ``None`` returned, so it is trained again)."""
    if not path.is_file():
        return None
    try:
        return _decode(path.read_bytes())
    except Exception as err:
        warnings.warn(f"Cached artefact {path} is unusable ({err}); removing it and training again.",
                      stacklevel=3)
        path.unlink(missing_ok=True)
        return None


def cached(kind: str, name: str, spec: dict, train: Callable[[], Any]) -> Any:
    """The artefact ``kind``/``name`` for ``spec``: loaded from the cache, else ``train()``-ed
    and saved.

    ``train`` returns something ``torch.save`` can write and ``torch.load(weights_only=True)``
    can read back (tensors, dicts, lists, numbers, strings). What is returned on a cache hit
    equals what ``train`` returned on the miss that wrote it.
    """
    from filelock import FileLock

    path = artifact_path(kind, name, spec)
    locks = cache_dir() / ".locks"
    for folder in (path.parent, locks):
        folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{kind}-{path.stem}.lock"), timeout=1800):
        saved = _load_checked(path)
        if saved is not None:
            return saved
        result = train()
        _atomic_write(path, _encode(result))
        return result
