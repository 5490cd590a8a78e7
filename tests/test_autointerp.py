"""autointerp: explainers and scorers on synthetic data where the answer is known, and on
tiny random models for anything that runs a model."""

import pytest
import torch

from interpbook import autointerp as A
from interpbook.tracing import edit
from tiny_models import VOCAB, random_ids, tiny_model


def synthetic(seed: int = 0, n: int = 400, length: int = 10):
    """Contexts of random tokens; feature 0 fires (1.0) exactly on tokens {5, 6}, feature 1
    fires at random positions regardless of the token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (n, length), generator=g)
    detector = torch.isin(ids, torch.tensor([5, 6])).float()
    noise = (torch.rand(n, length, generator=g) < 0.05).float()
    return A.Contexts(ids, torch.stack([detector, noise], -1))


def test_contexts_layout_and_bad_input():
    windows = torch.arange(2 * 9).view(2, 9)
    acts = torch.arange(2 * 8, dtype=torch.float)[:, None]
    c = A.contexts(windows, acts, length=4)
    assert c.ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [10, 11, 12, 13], [14, 15, 16, 17]]
    assert c.acts[:, :, 0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    with pytest.raises(ValueError, match="n_windows"):
        A.contexts(windows, acts[:-1], length=4)
    with pytest.raises(ValueError, match="length"):
        A.contexts(windows, acts, length=9)


def test_max_act_finds_the_token_set_and_detection_scores_it():
    explain, score = synthetic(0), synthetic(1)
    th = A.thresholds(explain)
    expl = A.max_act(explain, k=5)
    assert set(expl[0]) == {5, 6}
    det = A.detection(expl, score, th)
    fuzz = A.fuzzing(expl, score, th)
    assert det[0] == 1.0 and fuzz[0] == 1.0
    # the random feature: its explanation matches as often in activating as in other contexts
    assert abs(float(det[1]) - 0.5) < 0.2 and abs(float(fuzz[1]) - 0.5) < 0.25
    # a wrong explanation for the detector scores at chance or below
    assert A.detection([[40, 41], [7]], score, th)[0] <= 0.6


def test_scorers_reject_mismatched_explanations():
    score = synthetic()
    th = A.thresholds(score)
    with pytest.raises(ValueError, match="one explanation per feature"):
        A.detection([[5]], score, th)
    with pytest.raises(ValueError, match="one explanation per feature"):
        A.output_score([[5]], torch.zeros(3, 10))
    with pytest.raises(ValueError, match="features >= 2"):
        A.output_score([[5]], torch.zeros(1, 10))
    with pytest.raises(ValueError, match="one explanation per feature"):
        A.surprisal(None, [[5]], score, th)
    with pytest.raises(ValueError, match="one explanation per feature"):
        A.embedding(None, [[5], [6], [7]], score, th)
    with pytest.raises(ValueError, match="k and top"):
        A.max_act(score, k=0)


def test_output_score_knows_its_own_steering():
    effect = torch.zeros(4, 20)
    for f in range(4):
        effect[f, 2 * f] = 1.0                    # feature f raises token 2f
    own = A.output_score([[0], [2], [4], [6]], effect)
    assert own.tolist() == [1.0, 1.0, 1.0, 1.0]
    shuffled = A.output_score([[2], [4], [6], [0]], effect)
    assert float(shuffled.mean()) < 0.5
    assert A.union([[1, 2]], [[2, 3]]) == [[1, 2, 3]]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_vocab_proj_of_an_unembedding_row_returns_its_token(family):
    model = tiny_model(family)
    U = model.anatomy.folded_W_U().float()
    token = 17
    # the direction that maximises column `token` of the folded unembedding's logits
    assert A.vocab_proj(model, U[:, token][None], k=1) == [[token]]
    with pytest.raises(ValueError, match="d_model"):
        A.vocab_proj(model, torch.zeros(1, model.d_model + 1))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_steering_effect_zero_changes_nothing_and_matches_a_manual_steer(family):
    model = tiny_model(family)
    ids = random_ids(2, 6)
    site = ("resid_post", 1)
    dirs = torch.randn(2, model.d_model, generator=torch.Generator().manual_seed(0))
    zero = A.steering_effect(model, site, dirs, ids, norm=0.0)
    assert zero.shape == (2, VOCAB) and zero.abs().max() < 1e-5
    effect = A.steering_effect(model, site, dirs, ids, norm=3.0)
    v = 3.0 * dirs[1] / dirs[1].norm()
    steered = model.run(ids, edits=[edit(site, lambda x: torch.cat([x[:, :1], x[:, 1:] + v], 1))]).logits
    clean = model.run(ids).logits
    manual = (steered[:, 1:].log_softmax(-1) - clean[:, 1:].log_softmax(-1)).mean((0, 1))
    assert torch.allclose(effect[1], manual, atol=1e-5)
    assert A.token_change(effect, k=1)[1] == [int(manual.argmax())]
    one_by_one = A.steering_effect(model, site, dirs, ids, norm=3.0, batch_size=1)
    assert torch.allclose(effect, one_by_one, atol=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        A.steering_effect(model, site, dirs, ids[0], norm=1.0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_output_directions_are_what_a_neuron_writes(family):
    model = tiny_model(family)
    a = model.anatomy
    layer, neuron = 1, 3
    x = torch.zeros(1, 1, a.d_mlp)
    x[..., neuron] = 1.0
    with torch.no_grad():
        written = a.down_proj(layer)(x)[0, 0] - a.down_proj(layer)(torch.zeros_like(x))[0, 0]
    d = A.output_directions(model, layer, torch.tensor([neuron]), torch.tensor([-1.0]))[0]
    gain = a.norm_gain(a.post_mlp_norm(layer))
    assert torch.allclose(d, -written * gain, atol=1e-5)
