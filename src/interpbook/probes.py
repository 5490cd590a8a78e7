"""Probes: small supervised models that read a property off frozen representations.

Book chapter ``02-probing``. Three families:

* **feature extraction** (:func:`last_token_features`, :func:`word_features`): one forward
  pass per batch, only ``resid_post`` at the layers asked for, stopping early;
  layer ``0`` is the token embedding and layer ``l`` the residual stream after block ``l``
  (the Hugging Face ``hidden_states`` convention, also the one probing papers use);
* **linear read-outs** (:func:`ridge_fit`, :func:`ridge_cv`, :func:`ridge_probe`,
  :func:`layer_sweep`, :func:`mlp_probe`, :func:`logistic_probe`) with held-out
  :func:`r2_score` on a seeded :func:`train_test_split`;
* **structural probes** (Hewitt & Manning, 2019): :class:`DistanceProbe` and
  :class:`DepthProbe` (a low-rank linear map ``B`` trained by gradient descent so that
  squared distances / squared norms after ``B`` match tree distances / depths), with the
  paper's metrics :func:`uuas` (minimum spanning tree against the gold tree),
  :func:`distance_spearman`, :func:`root_accuracy` and :func:`depth_spearman`;

plus two small tools for the circle figure of the bonus paper: :func:`pca` and
:func:`cyclic_order`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "feature_sites",
    "last_token_features",
    "align_words",
    "word_features",
    "train_test_split", "train_val_test_split",
    "r2_score",
    "ridge_fit",
    "ridge_predict",
    "ridge_cv",
    "ProbeResult",
    "ridge_probe",
    "layer_sweep",
    "mlp_probe",
    "logistic_probe",
    "tree_distances",
    "tree_depths",
    "min_spanning_tree",
    "tree_edges",
    "uuas",
    "distance_spearman",
    "root_accuracy",
    "depth_spearman",
    "DistanceProbe",
    "DepthProbe",
    "train_structural_probe",
    "pca",
    "cyclic_order",
]


# --- feature extraction ------------------------------------------------------------------
def feature_sites(model, layers: Sequence[int]) -> list:
    """The cache sites behind feature ``layers``: 0 is ``"embed"``, ``l`` is
    ``("resid_post", l - 1)`` (the residual stream after ``l`` blocks)."""
    sites = []
    for layer in layers:
        if not 0 <= layer <= model.n_layers:
            raise ValueError(f"feature layer {layer} is outside 0..{model.n_layers} "
                             "(0 = embeddings, l = after block l)")
        sites.append("embed" if layer == 0 else ("resid_post", layer - 1))
    return sites


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding, same results)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> dict:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[row, width - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _token_ids(model, prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        return [row.tolist() for row in prompts]
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts and not isinstance(prompts[0], str):
        return [list(p) for p in prompts]
    return [model.tokenizer(p)["input_ids"] for p in prompts]


@torch.no_grad()
def _run_features(model, seqs, layers, batch_size, pick):
    """Run ``seqs`` (lists of token ids) in length-sorted batches; ``pick(acts, rows,
    widths)`` turns ``[layer, batch, pos, d]`` into the per-item results."""
    sites = feature_sites(model, layers)
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    out: list = [None] * len(seqs)
    stop = max(layers) < model.n_layers
    for idx in _batches([len(s) for s in seqs], batch_size):
        enc = _left_pad([seqs[i] for i in idx], pad)
        run = model.run(enc, cache=sites, stop_early=stop)
        acts = torch.stack([run.cache[s] for s in sites]).float()  # [L, b, pos, d]
        for row, i in enumerate(idx):
            out[i] = pick(acts[:, row], len(seqs[i]))
    return out


def last_token_features(model, prompts, layers: Sequence[int] | None = None,
                        batch_size: int = 64) -> torch.Tensor:
    """The residual stream at each prompt's last token: ``[len(layers), n_prompts, d_model]``.

    ``prompts`` is a list of strings (tokenised with the model's tokenizer) or of token-id
    lists / a tensor. ``layers`` defaults to all of ``0..n_layers`` (0 = embeddings).
    Prompts are batched by length and the pass stops after the last layer needed.
    """
    layers = list(range(model.n_layers + 1)) if layers is None else list(layers)
    seqs = _token_ids(model, prompts)
    feats = _run_features(model, seqs, layers, batch_size, lambda a, n: a[:, -1])
    return torch.stack(feats, dim=1)


def align_words(tokenizer, words: Sequence[str], prefix: str = "") -> tuple[list[int], list[int]]:
    """Token ids of ``prefix + " ".join(words)`` and, for each token, the index of its word.

    Each word is tokenised on its own (with a leading space after the first), which for
    byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen) equals tokenising the
    sentence. Special tokens the tokenizer adds at the start (BOS) and the tokens of
    ``prefix`` (e.g. ``tokenizer.bos_token``, so that no word sits at position 0, where
    causal LMs park an outlier "attention sink" activation) get word index -1.
    """
    ids: list[int] = []
    word_of: list[int] = []
    bos = tokenizer("", add_special_tokens=True)["input_ids"]
    ids += list(bos)
    if prefix:
        ids += tokenizer(prefix, add_special_tokens=False)["input_ids"]
    word_of += [-1] * len(ids)
    for i, w in enumerate(words):
        piece = tokenizer(("" if i == 0 else " ") + w, add_special_tokens=False)["input_ids"]
        ids += piece
        word_of += [i] * len(piece)
    return ids, word_of


def word_features(model, sentences: Sequence[Sequence[str]] | None = None,
                  layers: Sequence[int] | None = None, *, tokens=None, prefix: str = "",
                  batch_size: int = 32) -> list[torch.Tensor]:
    """Per-word representations: a list with one ``[len(layers), n_words, d_model]`` tensor
    per sentence, each word the mean of its subword tokens (as Hewitt & Manning average
    BERT's word pieces).

    Give ``sentences`` as lists of words (aligned with :func:`align_words`), or give
    ``tokens`` directly as ``(ids, word_of)`` pairs. ``prefix`` is passed to
    :func:`align_words`.
    """
    layers = list(range(model.n_layers + 1)) if layers is None else list(layers)
    if tokens is None:
        if sentences is None:
            raise ValueError("word_features needs sentences or tokens")
        tokens = [align_words(model.tokenizer, s, prefix) for s in sentences]
    seqs = [list(ids) for ids, _ in tokens]
    maps = [torch.as_tensor(list(w)) for _, w in tokens]
    n_words = [int(m.max()) + 1 for m in maps]
    per_token = _run_features(model, seqs, layers, batch_size, lambda acts, n_tok: acts[:, acts.shape[1] - n_tok:])
    out = []
    for acts, m, n in zip(per_token, maps, n_words):
        keep = m >= 0
        onehot = torch.zeros(n, int(keep.sum()))
        onehot[m[keep], torch.arange(int(keep.sum()))] = 1.0
        onehot /= onehot.sum(1, keepdim=True)
        out.append(torch.einsum("wt,ltd->lwd", onehot, acts[:, keep]))
    return out


@contextlib.contextmanager
def _one_thread():
    """Run small-tensor training loops on one CPU thread: with many tiny ops, intra-op
    threads cost more in synchronisation than they gain (measured 40x on a busy 2-core
    machine). The previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- linear and non-linear read-outs ----------------------------------------------------
def train_test_split(n: int, test_frac: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)``: ``(train_idx, test_idx)``."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(test_frac * n)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def train_val_test_split(n: int, val_frac: float = 0.2, test_frac: float = 0.2,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)`` into ``(train_idx, val_idx, test_idx)``.

    Choose anything the probe does not fit itself (a layer, a width) on the validation
    indices and report the score on the test indices, which nothing has looked at."""
    if val_frac <= 0 or test_frac <= 0 or val_frac + test_frac >= 1:
        raise ValueError(f"val_frac and test_frac must be positive and sum to less than 1, "
                         f"got {val_frac} and {test_frac}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = max(1, int(round(val_frac * n))), max(1, int(round(test_frac * n)))
    if n_val + n_test >= n:
        raise ValueError(f"{n} items are too few for a validation and a test split")
    return np.sort(perm[n_val + n_test:]), np.sort(perm[:n_val]), np.sort(perm[n_val:n_val + n_test])


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def r2_score(y, y_pred) -> np.ndarray:
    """Coefficient of determination per target column: ``1 - SS_res / SS_tot``.

    Can be negative on held-out data (worse than predicting the test mean).
    """
    y, y_pred = _np(y), _np(y_pred)
    if y.ndim == 1:
        return r2_score(y[:, None], y_pred.reshape(-1, 1))[0]
    ss_res = ((y - y_pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / np.maximum(ss_tot, 1e-12)


def ridge_fit(X, Y, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression in closed form with an unpenalised intercept.

    Centre ``X`` and ``Y``, solve ``(X_cᵀX_c + αI) W = X_cᵀY_c``, set ``b = ȳ - x̄ W``.
    Returns ``(W [d, k], b [k])``; predictions are ``X @ W + b``.
    """
    X, Y = _np(X), _np(Y)
    squeeze = Y.ndim == 1
    Y = Y[:, None] if squeeze else Y
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    d = X.shape[1]
    if X.shape[0] < d:  # dual form: cheaper when there are fewer samples than features
        K = Xc @ Xc.T
        W = Xc.T @ np.linalg.solve(K + alpha * np.eye(len(K)), Yc)
    else:
        W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(d), Xc.T @ Yc)
    b = my - mx @ W
    return (W[:, 0], b[0]) if squeeze else (W, b)


def ridge_predict(X, W, b) -> np.ndarray:
    """``X @ W + b``."""
    return _np(X) @ W + b


def ridge_cv(X, Y, alphas: Sequence[float] | None = None) -> tuple[float, np.ndarray]:
    """Choose ridge's ``α`` by exact leave-one-out cross-validation on ``(X, Y)``.

    Uses one SVD of the centred ``X``: the hat matrix is ``U diag(s²/(s²+α)) Uᵀ`` and the
    leave-one-out residual is ``(y - ŷ) / (1 - H_ii)`` (Hastie et al., *Elements of
    Statistical Learning*, eq. 7.52), as Gurnee & Tegmark do. Returns
    ``(best_alpha, loo_mse_per_alpha)``.
    """
    X, Y = _np(X), _np(Y)
    Y = Y[:, None] if Y.ndim == 1 else Y
    alphas = np.logspace(-2, 5, 15) if alphas is None else np.asarray(alphas, dtype=np.float64)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    U, s, _ = np.linalg.svd(Xc, full_matrices=False)
    UtY = U.T @ Yc
    n = X.shape[0]
    errors = []
    for a in alphas:
        shrink = s ** 2 / (s ** 2 + a)
        Yhat = U @ (shrink[:, None] * UtY)
        h = (U ** 2) @ shrink + 1.0 / n  # + 1/n: the intercept's share of the hat matrix
        loo = (Yc - Yhat) / (1.0 - h)[:, None]
        errors.append(float((loo ** 2).mean()))
    errors = np.array(errors)
    return float(alphas[int(errors.argmin())]), errors


@dataclasses.dataclass
class ProbeResult:
    """A fitted probe evaluated on held-out data.

    ``r2``: held-out R² per target; ``pred``: held-out predictions ``[n_test, k]``;
    ``train_idx`` / ``test_idx``: the split; ``alpha``: the regularisation chosen;
    ``W``, ``b``: the weights (linear probes only).
    """

    r2: np.ndarray
    pred: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray
    alpha: float | None = None
    W: np.ndarray | None = None
    b: np.ndarray | None = None


def ridge_probe(X, Y, *, alpha: float | None = None, test_frac: float = 0.2, seed: int = 0,
                split: tuple[np.ndarray, np.ndarray] | None = None,
                shuffle_targets: bool = False) -> ProbeResult:
    """Fit a ridge probe on a train split and report held-out R² per target.

    ``alpha=None`` picks it by leave-one-out CV on the training split only
    (:func:`ridge_cv`). ``shuffle_targets=True`` permutes the training targets (a
    control: a probe that still scores well has found something other than the property).
    """
    X, Y = _np(X), _np(Y)
    Y = Y[:, None] if Y.ndim == 1 else Y
    tr, te = split if split is not None else train_test_split(len(X), test_frac, seed)
    Ytr = Y[tr]
    if shuffle_targets:
        Ytr = Ytr[np.random.default_rng(seed + 1).permutation(len(tr))]
    if alpha is None:
        alpha, _ = ridge_cv(X[tr], Ytr)
    W, b = ridge_fit(X[tr], Ytr, alpha)
    pred = ridge_predict(X[te], W, b)
    return ProbeResult(r2_score(Y[te], pred), pred, tr, te, alpha, W, b)


def layer_sweep(features, Y, **kwargs) -> np.ndarray:
    """Held-out R² of :func:`ridge_probe` at every layer of ``features [L, n, d]``:
    an array ``[L, n_targets]`` (same split at every layer)."""
    return np.stack([ridge_probe(f, Y, **kwargs).r2 for f in features])


def mlp_probe(X, Y, *, hidden: int = 256, steps: int = 600, lr: float = 1e-3,
              weight_decay: float = 1e-2, test_frac: float = 0.2, seed: int = 0,
              split: tuple[np.ndarray, np.ndarray] | None = None) -> ProbeResult:
    """A one-hidden-layer ReLU MLP probe (the paper's non-linear control), full-batch Adam
    on standardised inputs and targets; held-out R² per target."""
    X, Y = _np(X), _np(Y)
    Y = Y[:, None] if Y.ndim == 1 else Y
    tr, te = split if split is not None else train_test_split(len(X), test_frac, seed)
    mx, sx = X[tr].mean(0), X[tr].std(0) + 1e-6
    my, sy = Y[tr].mean(0), Y[tr].std(0) + 1e-6
    xt = torch.tensor((X[tr] - mx) / sx, dtype=torch.float32)
    yt = torch.tensor((Y[tr] - my) / sy, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, Y.shape[1]))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / np.sqrt(p.shape[-1])) if p.dim() > 1 else 0 * p)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad(), _one_thread():
        for _ in range(steps):
            opt.zero_grad()
            loss = ((net(xt) - yt) ** 2).mean()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = net(torch.tensor((X[te] - mx) / sx, dtype=torch.float32)).double().numpy() * sy + my
    return ProbeResult(r2_score(Y[te], pred), pred, tr, te)


def logistic_probe(X, labels, *, C: float = 1.0, test_frac: float = 0.2, seed: int = 0,
                   split: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, np.ndarray]:
    """Multinomial logistic-regression probe (scikit-learn) on standardised features:
    ``(held-out accuracy, held-out predictions)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = _np(X)
    labels = np.asarray(labels)
    tr, te = split if split is not None else train_test_split(len(X), test_frac, seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    clf.fit(X[tr], labels[tr])
    pred = clf.predict(X[te])
    return float((pred == labels[te]).mean()), pred


# --- trees and their metrics -------------------------------------------------------------
def tree_edges(heads: Sequence[int]) -> set[tuple[int, int]]:
    """Undirected edges ``{(min, max)}`` of a tree given as head indices (-1 = root)."""
    return {tuple(sorted((i, h))) for i, h in enumerate(heads) if h >= 0}


def tree_distances(heads: Sequence[int]) -> np.ndarray:
    """Path length between every pair of words in the tree ``heads``: ``[n, n]``."""
    n = len(heads)
    adj = [[] for _ in range(n)]
    for i, j in tree_edges(heads):
        adj[i].append(j)
        adj[j].append(i)
    dist = np.full((n, n), -1, dtype=np.int64)
    for s in range(n):
        dist[s, s] = 0
        frontier = [s]
        while frontier:
            nxt = []
            for u in frontier:
                for v in adj[u]:
                    if dist[s, v] < 0:
                        dist[s, v] = dist[s, u] + 1
                        nxt.append(v)
            frontier = nxt
    if (dist < 0).any():
        raise ValueError("heads do not form a single tree")
    return dist


def tree_depths(heads: Sequence[int]) -> np.ndarray:
    """Depth of each word (the root has depth 0)."""
    root = [i for i, h in enumerate(heads) if h < 0]
    if len(root) != 1:
        raise ValueError(f"a tree needs exactly one root (head -1), found {len(root)}")
    return tree_distances(heads)[root[0]]


def min_spanning_tree(dist) -> set[tuple[int, int]]:
    """Edges ``{(i, j), i < j}`` of the minimum spanning tree of a symmetric distance
    matrix (Prim's algorithm, ties broken by index)."""
    d = _np(dist)
    n = len(d)
    if n <= 1:
        return set()
    in_tree = np.zeros(n, dtype=bool)
    in_tree[0] = True
    best = d[0].copy()
    parent = np.zeros(n, dtype=np.int64)
    edges = set()
    for _ in range(n - 1):
        cand = np.where(in_tree, np.inf, best)
        v = int(cand.argmin())
        edges.add(tuple(sorted((int(parent[v]), v))))
        in_tree[v] = True
        closer = d[v] < best
        parent[closer] = v
        best = np.minimum(best, d[v])
    return edges


def uuas(pred_dists: Sequence, heads_list: Sequence[Sequence[int]]) -> float:
    """Undirected unlabelled attachment score: the fraction of gold edges that the minimum
    spanning tree of the predicted distances recovers, pooled over sentences."""
    if len(pred_dists) and np.ndim(pred_dists[0]) == 1:  # a single sentence
        pred_dists, heads_list = [pred_dists], [heads_list]
    hit = total = 0
    for d, heads in zip(pred_dists, heads_list):
        gold = tree_edges(heads)
        hit += len(gold & min_spanning_tree(d))
        total += len(gold)
    return hit / max(total, 1)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _by_length(values: dict[int, list[float]], min_len: int, max_len: int) -> float:
    means = [np.nanmean(v) for n, v in sorted(values.items()) if min_len <= n <= max_len and v]
    return float(np.mean(means)) if means else float("nan")


def distance_spearman(pred_dists, heads_list, min_len: int = 5, max_len: int = 50) -> float:
    """Hewitt & Manning's DSpr.: for each word, the Spearman correlation between its
    predicted and gold distances to every other word; averaged within each sentence length,
    then over lengths ``min_len..max_len``."""
    per_len: dict[int, list[float]] = {}
    for d, heads in zip(pred_dists, heads_list):
        d, gold = _np(d), tree_distances(heads)
        n = len(heads)
        for i in range(n):
            others = np.arange(n) != i
            per_len.setdefault(n, []).append(_spearman(d[i, others], gold[i, others]))
    return _by_length(per_len, min_len, max_len)


def root_accuracy(pred_depths, heads_list) -> float:
    """Fraction of sentences whose shallowest predicted word is the gold root."""
    hits = [int(np.argmin(_np(p))) == list(h).index(-1) for p, h in zip(pred_depths, heads_list)]
    return float(np.mean(hits))


def depth_spearman(pred_depths, heads_list, min_len: int = 5, max_len: int = 50) -> float:
    """Hewitt & Manning's NSpr.: Spearman correlation between predicted and gold depth
    order in each sentence, averaged within sentence lengths, then over lengths."""
    per_len: dict[int, list[float]] = {}
    for p, heads in zip(pred_depths, heads_list):
        per_len.setdefault(len(heads), []).append(_spearman(_np(p), tree_depths(heads)))
    return _by_length(per_len, min_len, max_len)


# --- the structural probes ---------------------------------------------------------------
class DistanceProbe(torch.nn.Module):
    """``d_B(h_i, h_j)² = (B(h_i - h_j))ᵀ(B(h_i - h_j))`` with ``B: [rank, d_model]``."""

    def __init__(self, d_model: int, rank: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.B = torch.nn.Parameter(torch.rand(rank, d_model, generator=g) * 2 / np.sqrt(d_model) - 1 / np.sqrt(d_model))
        self.register_buffer("center", torch.zeros(d_model))
        self.register_buffer("scale", torch.ones(d_model))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """``B`` applied to the standardised features (a linear map all the same)."""
        return ((torch.as_tensor(h, dtype=torch.float32) - self.center) / self.scale) @ self.B.T

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., n, d]`` -> squared probe distances ``[..., n, n]``."""
        z = self.project(h)
        sq = (z ** 2).sum(-1)
        return (sq[..., :, None] + sq[..., None, :] - 2 * z @ z.transpose(-1, -2)).clamp(min=0)


class DepthProbe(DistanceProbe):
    """``‖B h_i‖²`` approximates the depth of word ``i`` in the tree."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., n, d]`` -> squared probe norms ``[..., n]``."""
        return (self.project(h) ** 2).sum(-1)


def _pad_words(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(f) for f in feats)
    H = torch.zeros(len(feats), n, feats[0].shape[-1])
    mask = torch.zeros(len(feats), n, dtype=torch.bool)
    for i, f in enumerate(feats):
        H[i, :len(f)] = torch.as_tensor(f, dtype=torch.float32)
        mask[i, :len(f)] = True
    return H, mask


def train_structural_probe(feats: Sequence[torch.Tensor], heads_list: Sequence[Sequence[int]],
                           kind: str = "distance", *, rank: int = 64, steps: int = 300,
                           lr: float = 5e-3, seed: int = 0, standardize: bool = True) -> DistanceProbe:
    """Train a :class:`DistanceProbe` (``kind="distance"``) or :class:`DepthProbe`
    (``kind="depth"``) on per-word features ``[n_words, d]`` of each sentence.

    Loss as in Hewitt & Manning: the L1 difference between gold and predicted tree
    distances (depths), averaged over the word pairs (words) of each sentence, then over
    sentences. Full-batch Adam. With ``standardize`` (the default) each feature is first
    centred and scaled by its training mean and standard deviation (stored in the probe),
    which keeps the optimisation well conditioned when residual-stream norms grow with
    depth; the probe stays a linear map of the features.
    """
    if kind not in ("distance", "depth"):
        raise ValueError("kind is 'distance' or 'depth'")
    H, mask = _pad_words(feats)
    n = H.shape[1]
    if kind == "distance":
        gold = torch.zeros(len(feats), n, n)
        for i, heads in enumerate(heads_list):
            k = len(heads)
            gold[i, :k, :k] = torch.as_tensor(tree_distances(heads), dtype=torch.float32)
        pair_mask = (mask[:, :, None] & mask[:, None, :]).float()
        probe = DistanceProbe(H.shape[-1], rank, seed)
    else:
        gold = torch.zeros(len(feats), n)
        for i, heads in enumerate(heads_list):
            gold[i, :len(heads)] = torch.as_tensor(tree_depths(heads), dtype=torch.float32)
        pair_mask = mask.float()
        probe = DepthProbe(H.shape[-1], rank, seed)
    if standardize:
        words = H[mask]
        probe.center.copy_(words.mean(0))
        probe.scale.copy_(words.std(0) + 1e-6)
    norm = pair_mask.flatten(1).sum(1)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    with torch.enable_grad(), _one_thread():
        for _ in range(steps):
            opt.zero_grad()
            err = ((probe(H) - gold).abs() * pair_mask).flatten(1).sum(1) / norm
            err.mean().backward()
            opt.step()
    probe.eval()
    return probe


# --- circles -----------------------------------------------------------------------------
def pca(X, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Project the rows of ``X`` on their top ``k`` principal components:
    ``(coords [n, k], explained_variance_ratio [k])``."""
    X = _np(X)
    Xc = X - X.mean(0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    return Xc @ Vt[:k].T, (s[:k] ** 2) / (s ** 2).sum()


def cyclic_order(points2d) -> float:
    """How well 2-D points sit around their centre in their listed (cyclic) order.

    Sort the points by angle around their mean; return the fraction of cyclically
    adjacent pairs ``(i, i+1 mod n)`` that are also adjacent in the angular order (either
    direction). 1.0 means a perfect clock face, e.g. Monday..Sunday going round.
    """
    P = _np(points2d)
    n = len(P)
    ang = np.arctan2(*(P - P.mean(0)).T[::-1])
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(ang)] = np.arange(n)
    step = (rank[(np.arange(n) + 1) % n] - rank) % n
    forward, backward = np.mean(step == 1), np.mean(step == n - 1)
    return float(max(forward, backward))
