"""Probes: feature extraction on tiny random models of every family, the linear read-outs
against brute-force references, tree metrics on hand-checked trees, and the structural
probes on synthetic features that embed trees exactly."""

import numpy as np
import pytest
import torch

from interpbook import probes as P
from tiny_models import CONFIGS, random_ids, tiny_model

FAMILIES = list(CONFIGS)


# --- feature extraction ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_last_token_features_match_a_plain_run(family):
    model = tiny_model(family)
    seqs = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]
    feats = P.last_token_features(model, seqs, layers=[0, 1, 3], batch_size=3)
    assert feats.shape == (3, 4, model.d_model)
    for i, s in enumerate(seqs):  # each prompt alone, no padding
        run = model.run(torch.tensor([s]), cache=["embed", ("resid_post", 0), ("resid_post", 2)])
        torch.testing.assert_close(feats[0, i], run.cache["embed"][0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(feats[1, i], run.cache["resid_post", 0][0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(feats[2, i], run.cache["resid_post", 2][0, -1], atol=1e-4, rtol=1e-4)


def test_feature_layers_are_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="outside"):
        P.feature_sites(model, [model.n_layers + 1])
    assert P.feature_sites(model, [0, 2]) == ["embed", ("resid_post", 1)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_word_features_average_the_word_pieces(family):
    model = tiny_model(family)
    ids = random_ids(1, 7, seed=3)[0].tolist()
    word_of = [0, 1, 1, 2, 3, 3, 3]
    (feats,) = P.word_features(model, layers=[0, 2], tokens=[(ids, word_of)])
    assert feats.shape == (2, 4, model.d_model)
    run = model.run(torch.tensor([ids]), cache=["embed", ("resid_post", 1)])
    h = run.cache["resid_post", 1][0]
    torch.testing.assert_close(feats[1, 1], h[1:3].mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats[1, 3], h[4:7].mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats[0, 0], run.cache["embed"][0, 0], atol=1e-4, rtol=1e-4)


class _WordTokenizer:
    """Splits on characters; marks a BOS token the way Gemma's tokenizer adds one."""

    def __call__(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        return {"input_ids": ids + [3 + (ord(c) % 90) for c in text]}


def test_align_words_maps_every_token_to_its_word():
    ids, word_of = P.align_words(_WordTokenizer(), ["ab", "c"])
    assert word_of == [-1, 0, 0, 1, 1]  # BOS, 'a', 'b', ' ', 'c'
    assert len(ids) == len(word_of)
    ids2, word_of2 = P.align_words(_WordTokenizer(), ["ab", "c"], prefix="xy")
    assert word_of2 == [-1, -1, -1, 0, 0, 1, 1] and ids2[3:] == ids[1:]


# --- linear read-outs --------------------------------------------------------------------
def _data(n=120, d=10, k=2, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    W = rng.normal(size=(d, k))
    return X, X @ W + 3.0 + noise * rng.normal(size=(n, k))


@pytest.mark.parametrize("n", [40, 8])  # primal and dual form
def test_ridge_fit_matches_scikit_learn(n):
    from sklearn.linear_model import Ridge

    X, Y = _data(n=n)
    W, b = P.ridge_fit(X, Y, alpha=2.5)
    ref = Ridge(alpha=2.5).fit(X, Y)
    np.testing.assert_allclose(W, ref.coef_.T, atol=1e-8)
    np.testing.assert_allclose(b, ref.intercept_, atol=1e-8)
    w1, b1 = P.ridge_fit(X, Y[:, 0], alpha=2.5)
    assert w1.shape == (X.shape[1],) and np.ndim(b1) == 0


def test_ridge_cv_leave_one_out_equals_brute_force():
    X, Y = _data(n=30, d=5, noise=1.0)
    alphas = [0.1, 10.0]
    _, errors = P.ridge_cv(X, Y, alphas)
    for a, err in zip(alphas, errors):
        sq = []
        for i in range(len(X)):
            keep = np.arange(len(X)) != i
            W, b = P.ridge_fit(X[keep], Y[keep], a)
            sq.append((X[i] @ W + b - Y[i]) ** 2)
        assert err == pytest.approx(np.mean(sq), rel=1e-8)


def test_train_val_test_split_partitions_and_is_seeded():
    tr, va, te = P.train_val_test_split(100, 0.2, 0.1, seed=3)
    assert (len(tr), len(va), len(te)) == (70, 20, 10)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(100))
    again = P.train_val_test_split(100, 0.2, 0.1, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((tr, va, te), again))
    with pytest.raises(ValueError, match="sum to less than 1"):
        P.train_val_test_split(100, 0.5, 0.5)
    with pytest.raises(ValueError, match="too few"):
        P.train_val_test_split(2, 0.2, 0.2)


def test_r2_and_ridge_probe_on_a_linear_signal():
    X, Y = _data(n=300, noise=0.05)
    res = P.ridge_probe(X, Y, seed=1)
    assert res.r2.shape == (2,) and (res.r2 > 0.99).all()
    assert len(set(res.train_idx) & set(res.test_idx)) == 0
    assert P.r2_score(Y[:, 0], Y[:, 0]) == pytest.approx(1.0)
    assert P.r2_score(Y, np.tile(Y.mean(0), (len(Y), 1))) == pytest.approx([0.0, 0.0])
    shuffled = P.ridge_probe(X, Y, seed=1, shuffle_targets=True)
    assert (shuffled.r2 < 0.2).all()
    sweep = P.layer_sweep(np.stack([X, np.random.default_rng(99).normal(size=X.shape)]), Y)
    assert sweep.shape == (2, 2) and sweep[0].min() > sweep[1].max()


def test_mlp_and_logistic_probes_learn_simple_signals():
    X, Y = _data(n=400, d=6, noise=0.05)
    assert (P.mlp_probe(X, Y, hidden=64, steps=300, seed=0).r2 > 0.9).all()
    labels = (X @ np.random.default_rng(1).normal(size=(6, 3))).argmax(1)  # linearly separable
    acc, pred = P.logistic_probe(X, labels)
    assert acc > 0.85 and len(pred) == 80


# --- trees ---------------------------------------------------------------------------------
HEADS = [1, 3, 3, -1, 3, 6, 4]  # "the dog ... saw ... near the river"


def test_tree_distances_and_depths():
    D = P.tree_distances(HEADS)
    assert (D == D.T).all() and (np.diag(D) == 0).all()
    assert D[0, 6] == 4 and D[1, 4] == 2
    assert P.tree_depths(HEADS).tolist() == [2, 1, 1, 0, 1, 3, 2]
    with pytest.raises(ValueError):
        P.tree_depths([1, -1, -1])


def test_mst_recovers_the_tree_from_its_own_distances():
    D = P.tree_distances(HEADS).astype(float)
    assert P.min_spanning_tree(D) == P.tree_edges(HEADS)
    assert P.uuas([D], [HEADS]) == 1.0
    assert P.uuas(D, HEADS) == 1.0  # a single sentence
    chain = np.abs(np.subtract.outer(np.arange(7), np.arange(7))).astype(float)
    expected = len(P.tree_edges(HEADS) & {(i, i + 1) for i in range(6)}) / 6
    assert P.uuas([chain], [HEADS]) == pytest.approx(expected)


def test_spearman_metrics_and_root_accuracy():
    D = P.tree_distances(HEADS).astype(float)
    assert P.distance_spearman([D], [HEADS]) == pytest.approx(1.0)
    depth = P.tree_depths(HEADS).astype(float)
    assert P.depth_spearman([depth], [HEADS]) == pytest.approx(1.0)
    assert P.root_accuracy([depth], [HEADS]) == 1.0
    assert P.root_accuracy([-depth], [HEADS]) == 0.0


def _embedded_trees(n_sent=40, d=24, seed=0):
    """Features in which squared distance is tree distance: each word is the sum of one
    orthonormal direction per edge on its path to the root (the Pythagorean embedding)."""
    from interpbook.datasets import toy_treebank

    rng = np.random.default_rng(seed)
    sents = toy_treebank(n_sent, seed=seed, max_len=12)
    feats, heads = [], []
    for s in sents:
        Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        n = len(s)
        depth_path = []
        for i in range(n):
            v, path = i, []
            while s.heads[v] >= 0:
                path.append(v)
                v = s.heads[v]
            depth_path.append(path)
        X = np.stack([Q[:, p].sum(1) if p else np.zeros(d) for p in depth_path])
        feats.append(torch.tensor(X, dtype=torch.float32))
        heads.append(s.heads)
    return feats, heads


def test_distance_probe_recovers_embedded_trees():
    feats, heads = _embedded_trees()
    probe = P.train_structural_probe(feats[:30], heads[:30], "distance", rank=24, steps=400, lr=1e-2)
    with torch.no_grad():
        dists = [probe(f).numpy() for f in feats[30:]]
    assert P.uuas(dists, heads[30:]) > 0.95
    assert P.distance_spearman(dists, heads[30:]) > 0.9


def test_depth_probe_finds_the_root():
    feats, heads = _embedded_trees()
    probe = P.train_structural_probe(feats[:30], heads[:30], "depth", rank=24, steps=400, lr=1e-2)
    with torch.no_grad():
        depths = [probe(f).numpy() for f in feats[30:]]
    assert P.root_accuracy(depths, heads[30:]) > 0.9
    with pytest.raises(ValueError):
        P.train_structural_probe(feats, heads, "width")


# --- circles -----------------------------------------------------------------------------
def test_cyclic_order_and_pca():
    t = 2 * np.pi * np.arange(7) / 7
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    assert P.cyclic_order(circle) == 1.0
    assert P.cyclic_order(circle[::-1]) == 1.0  # clockwise counts too
    assert P.cyclic_order(circle[[0, 3, 1, 4, 2, 5, 6]]) < 0.5
    X = np.concatenate([circle * 5, 0.01 * np.random.default_rng(0).normal(size=(7, 6))], 1)
    coords, ratio = P.pca(X, 2)
    assert coords.shape == (7, 2) and ratio.sum() > 0.99
    assert P.cyclic_order(coords) == 1.0
