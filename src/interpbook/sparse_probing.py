"""k-sparse probing (Gurnee et al., 2023) and the offline datasets the chapter probes.

Book chapter ``06-neurons``, page *Sparse probing*. A k-sparse probe is a linear
classifier allowed to read only ``k`` neurons. Neurons are first ranked by how differently
they fire on positive and negative examples (:func:`mean_difference_ranking`, on the
training split only), then a logistic-regression probe is fit on the top ``k``
(:func:`k_sparse_probe`) and scored by F1 on held-out examples. Sweeping ``k`` and the
layer (:func:`sparse_probe_sweep`) separates features that one neuron carries (high F1 at
``k = 1``) from features spread over many neurons (F1 that only rises with ``k``).

Datasets, all built from files that installed packages ship (no download):

* :func:`language_strings`: the translated user messages of Sphinx's locale catalogues
  (``sphinx/locale/<lang>/LC_MESSAGES/sphinx.po``; English from ``sphinx.pot``);
* :func:`source_snippets`: source files of installed packages by file type (``.py``,
  ``.h``, ``.js``, ...);
* :func:`frequent_bigram`: the bigram whose second token occurs often both after its
  first token and elsewhere, for a token-level compound feature.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import random
import re
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "SPHINX_LICENSE", "po_messages", "language_strings", "source_snippets", "pack_examples",
    "frequent_bigram", "bigram_labels", "mean_difference_ranking", "f1_score", "SparseProbe",
    "k_sparse_probe", "sparse_probe_sweep", "split_indices", "chance_f1", "sequence_features",
    "token_features",
]

#: Source and licence of the language-identification strings.
SPHINX_LICENSE = ("Sphinx message catalogues (sphinx/locale/*/LC_MESSAGES/sphinx.po), "
                  "translations by the Sphinx contributors, BSD-2-Clause licence")

_PO_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _sphinx_locale() -> Path:
    spec = importlib.util.find_spec("sphinx")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("The language dataset reads Sphinx's message catalogues, but Sphinx is not "
                                  "installed; install the book extra (pip install -e '.[book]').")
    return Path(next(iter(spec.submodule_search_locations))) / "locale"


def po_messages(path: Path | str, field: str = "msgstr") -> list[str]:
    """The non-empty ``field`` strings (``msgstr`` or ``msgid``) of a gettext ``.po`` file,
    with multi-line strings joined and escapes decoded; the header entry is skipped."""
    if field not in ("msgstr", "msgid"):
        raise ValueError(f"field must be 'msgstr' or 'msgid', not {field!r}")
    out, current, reading = [], [], False
    for line in Path(path).read_text(encoding="utf-8").splitlines() + [""]:
        line = line.strip()
        if line.startswith(field + " "):
            reading, current = True, [line[len(field) + 1:]]
        elif reading and line.startswith('"'):
            current.append(line)
        else:
            if reading:
                text = "".join(m.group(1) for part in current for m in _PO_STRING.finditer(part))
                text = _unescape(text)
                if text.strip():
                    out.append(text.strip())
            reading = False
    return out


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": " ", "t": " "}.get(m.group(1), m.group(1)), text)


def language_strings(languages: Sequence[str]) -> dict[str, list[str]]:
    """Translated Sphinx messages per language code (``"en"`` reads the English
    originals), without duplicates and without strings that are mostly markup."""
    root = _sphinx_locale()
    out = {}
    for lang in languages:
        path = root / "sphinx.pot" if lang == "en" else root / lang / "LC_MESSAGES" / "sphinx.po"
        if not path.exists():
            have = sorted(p.name for p in root.iterdir() if (p / "LC_MESSAGES" / "sphinx.po").exists())
            raise ValueError(f"No Sphinx catalogue for language {lang!r}; available: en, {', '.join(have)}")
        texts = po_messages(path, "msgid" if lang == "en" else "msgstr")
        seen, keep = set(), []
        for t in texts:
            letters = sum(c.isalpha() for c in t)
            if t not in seen and letters >= 0.6 * len(t) and letters >= 8:
                seen.add(t)
                keep.append(t)
        out[lang] = keep
    return out


def _usable_source(text: str) -> bool:
    return len(text) > 400 and "\x00" not in text


def source_snippets(suffixes: Sequence[str], n_files: int = 40, *, root: Path | str | None = None,
                    seed: int = 0, chars: int = 600) -> dict[str, list[str]]:
    """``n_files`` snippets of ``chars`` characters per file suffix (e.g. ``".py"``), each
    from a different source file of the installed packages (``site-packages``), taken from
    the middle of the file so that licence headers are mostly avoided. Files are chosen
    with a seeded shuffle of the sorted file list."""
    base = Path(root or sysconfig.get_paths()["purelib"])
    rng = random.Random(seed)
    out = {}
    for suffix in suffixes:
        files = sorted(p for p in base.rglob(f"*{suffix}") if p.is_file() and ".dist-info" not in str(p))
        rng.shuffle(files)
        snippets = []
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not _usable_source(text) or (suffix == ".py" and not _parses(text)):
                continue
            start = max(0, len(text) // 2 - chars // 2)
            snippets.append(text[start:start + chars])
            if len(snippets) == n_files:
                break
        if len(snippets) < n_files:
            raise ValueError(f"Only {len(snippets)} readable {suffix} files under {base}; asked for {n_files}.")
        out[suffix] = snippets
    return out


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError):
        return False


def pack_examples(encode: Callable[[str], Sequence[int]], texts: Sequence[str], n_tokens: int,
                  n_examples: int, *, separator: str = " ", seed: int = 0) -> list[list[int]]:
    """``n_examples`` token sequences of exactly ``n_tokens`` tokens, each made by
    concatenating randomly drawn (seeded) ``texts`` of one class until long enough.

    Short strings (a translated menu label) say little on their own; joined to a
    paragraph-sized sequence they carry their language the way a document does."""
    if not texts:
        raise ValueError("pack_examples needs at least one text")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    out, cursor = [], 0
    for _ in range(n_examples):
        ids: list[int] = []
        while len(ids) < n_tokens:
            ids.extend(encode((separator if ids else "") + texts[order[cursor % len(order)]]))
            cursor += 1
        out.append(ids[:n_tokens])
    return out


def frequent_bigram(windows: torch.Tensor, *, min_count: int = 20,
                    allowed: Callable[[int], bool] | None = None) -> tuple[int, int, int, int]:
    """``(first, second, n_after_first, n_elsewhere)``: the token bigram (a, b) that
    maximises ``min(#(a b), #(b not after a))`` in ``windows [n, seq]``, so that the
    feature "b right after a" has many positive and many negative examples. ``allowed``
    filters token ids (e.g. word tokens only)."""
    prev, cur = windows[:, :-1].reshape(-1).tolist(), windows[:, 1:].reshape(-1).tolist()
    pairs = Counter(zip(prev, cur))
    singles = Counter(cur)
    best, best_score = None, 0
    for (a, b), n_ab in pairs.items():
        if a == b or (allowed is not None and not (allowed(a) and allowed(b))):
            continue
        score = min(n_ab, singles[b] - n_ab)
        if score > best_score:
            best, best_score = (a, b, n_ab, singles[b] - n_ab), score
    if best is None or best_score < min_count:
        raise ValueError(f"No bigram with at least {min_count} positive and negative examples in "
                         f"{windows.numel()} tokens; use more text or lower min_count.")
    return best


def bigram_labels(windows: torch.Tensor, first: int, second: int, *, skip_first: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions where ``second`` occurs (from ``skip_first`` on) as ``[n, 2]``
    (window, position), and whether each comes right after ``first`` (``[n]`` bool)."""
    at = (windows == second).nonzero()
    at = at[at[:, 1] >= max(1, skip_first)]
    labels = windows[at[:, 0], at[:, 1] - 1] == first
    return at, labels


# --- probing --------------------------------------------------------------------------------
def split_indices(labels: Sequence[bool] | torch.Tensor, test_frac: float = 0.4, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split stratified by label: ``(train_idx, test_idx)``."""
    y = np.asarray(labels, dtype=bool)
    if not 0 < test_frac < 1:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in (False, True):
        idx = np.flatnonzero(y == cls)
        if len(idx) < 2:
            raise ValueError(f"Need at least two {'positive' if cls else 'negative'} examples to split; got {len(idx)}.")
        idx = rng.permutation(idx)
        n_test = max(1, int(round(test_frac * len(idx))))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _as_np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def mean_difference_ranking(X, labels) -> np.ndarray:
    """Neuron indices sorted by ``|mean(X[pos]) - mean(X[neg])|``, largest first.

    ``X [n_examples, n_neurons]``; ``labels [n_examples]`` bool. The absolute value keeps
    neurons that fire *less* on the feature, which gated MLPs (signed activations) have as
    often as the other kind."""
    X, y = _as_np(X), np.asarray(labels, dtype=bool)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be [n_examples, n_neurons] with one label per row; got X {X.shape}, labels {y.shape}")
    if y.all() or not y.any():
        raise ValueError("labels must contain both classes")
    diff = X[y].mean(0) - X[~y].mean(0)
    return np.argsort(-np.abs(diff), kind="stable")


def f1_score(pred, labels) -> float:
    """F1 of boolean predictions for the positive class (0 when nothing is predicted)."""
    p, y = np.asarray(pred, dtype=bool), np.asarray(labels, dtype=bool)
    tp = float((p & y).sum())
    return 0.0 if tp == 0 else 2 * tp / (p.sum() + y.sum())


@dataclasses.dataclass(frozen=True)
class SparseProbe:
    """A fitted k-sparse probe: the neurons it reads and its held-out F1."""

    neurons: tuple[int, ...]
    f1: float
    train_f1: float


def k_sparse_probe(X, labels, k: int, train_idx, test_idx, *, ranking: np.ndarray | None = None,
                   C: float = 1.0) -> SparseProbe:
    """Fit a logistic-regression probe on the top ``k`` neurons (ranked by mean difference
    on the training rows unless ``ranking`` is given) and score it by F1 on the test rows.

    Features are standardised with training statistics; classes are weighted so the rare
    class counts as much as the common one."""
    from sklearn.linear_model import LogisticRegression

    X, y = _as_np(X), np.asarray(labels, dtype=bool)
    if not 1 <= k <= X.shape[1]:
        raise ValueError(f"k must be between 1 and the number of neurons ({X.shape[1]}); got {k}")
    if ranking is None:
        ranking = mean_difference_ranking(X[train_idx], y[train_idx])
    cols = np.asarray(ranking[:k])
    Xtr, Xte = X[train_idx][:, cols], X[test_idx][:, cols]
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=1000)
    clf.fit((Xtr - mu) / sd, y[train_idx])
    return SparseProbe(tuple(int(c) for c in cols), f1_score(clf.predict((Xte - mu) / sd), y[test_idx]),
                       f1_score(clf.predict((Xtr - mu) / sd), y[train_idx]))


def sparse_probe_sweep(features: Sequence, labels, ks: Sequence[int], train_idx, test_idx) -> tuple[np.ndarray, np.ndarray]:
    """F1 of k-sparse probes for every layer's features and every ``k``: ``(test, train)``,
    each ``[len(features), len(ks)]``. ``features[i]`` is ``[n_examples, n_neurons]``; the
    ranking is computed once per layer on the training rows. Choose layers and ``k`` on the
    training F1, report the test F1."""
    y = np.asarray(labels, dtype=bool)
    test, train = np.zeros((len(features), len(ks))), np.zeros((len(features), len(ks)))
    for i, X in enumerate(features):
        X = _as_np(X)
        ranking = mean_difference_ranking(X[train_idx], y[train_idx])
        for j, k in enumerate(ks):
            probe = k_sparse_probe(X, y, k, train_idx, test_idx, ranking=ranking)
            test[i, j], train[i, j] = probe.f1, probe.train_f1
    return test, train


def chance_f1(labels) -> float:
    """F1 of the trivial classifier that calls every example positive: ``2p / (1 + p)``
    for a positive share ``p``; a probe must beat it to show anything."""
    p = float(np.asarray(labels, dtype=bool).mean())
    return 2 * p / (1 + p)


@torch.no_grad()
def sequence_features(model, seqs: Sequence[Sequence[int]], layers: Sequence[int], *,
                      batch_size: int = 32) -> list[torch.Tensor]:
    """Mean ``mlp_act`` over each sequence's tokens (after any BOS the model expects), per
    layer: a list of ``[n_seqs, d_mlp]``. All ``seqs`` must have the same length."""
    from .neurons import with_bos

    if len({len(s) for s in seqs}) != 1:
        raise ValueError("sequence_features needs sequences of equal length (use pack_examples)")
    ids = with_bos(model, torch.tensor([list(s) for s in seqs], dtype=torch.long))
    n_bos = ids.shape[1] - len(seqs[0])
    sites = [("mlp_act", layer) for layer in layers]
    out: list[list[torch.Tensor]] = [[] for _ in layers]
    for b in range(0, len(ids), batch_size):
        run = model.run(ids[b:b + batch_size], cache=sites, stop_early=max(layers) < model.n_layers - 1)
        for i, site in enumerate(sites):
            out[i].append(run.cache[site][:, n_bos:].float().mean(1).cpu())
    return [torch.cat(o) for o in out]


@torch.no_grad()
def token_features(model, windows: torch.Tensor, positions: torch.Tensor, layers: Sequence[int], *,
                   batch_size: int = 32) -> list[torch.Tensor]:
    """``mlp_act`` at the given ``positions [n, 2]`` (window, position) of ``windows``, per
    layer: a list of ``[n, d_mlp]`` (a BOS is prepended when the model expects one)."""
    from .neurons import with_bos

    ids = with_bos(model, windows)
    shift = ids.shape[1] - windows.shape[1]
    sites = [("mlp_act", layer) for layer in layers]
    acts: list[list[torch.Tensor]] = [[] for _ in layers]
    for b in range(0, len(ids), batch_size):
        run = model.run(ids[b:b + batch_size], cache=sites, stop_early=max(layers) < model.n_layers - 1)
        for i, site in enumerate(sites):
            acts[i].append(run.cache[site].float().cpu())
    return [torch.cat(a)[positions[:, 0], positions[:, 1] + shift] for a in acts]
