"""Week 12 exercise checks on a tiny toy run: right answers pass, usual slips fail with a
message that names them."""

import pytest
import torch

from interpbook import toy
from interpbook.exercises import CheckFailed
from interpbook.exercises import week12 as w
from interpbook.tracing import edit

TASK = toy.ICLTask(n_pairs=3, n_items=10, n_labels=6, n_queries=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("INTERPBOOK_CACHE", str(tmp_path_factory.mktemp("cache")))
    spec = toy.TrainSpec(task=TASK, d_model=24, n_heads=3, steps=30, batch=8, eval_every=10, n_eval=16)
    run = toy.train_icl(spec)
    mp.undo()
    model = toy.load_checkpoint(spec, run, -1)
    with torch.no_grad():                               # random weights, so slips show
        for p in model.hf.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return spec, run, model, toy.held_out_batch(spec)


# --- answers a reader might write --------------------------------------------------------
def diagonal_attention(pattern):
    q = torch.arange(1, pattern.shape[-1])
    return pattern[:, :, q, q - 1].mean(dim=(0, 2))


def previous_token_curve(spec, run, layer):
    held_out = toy.held_out_batch(spec)
    out = []
    for i in range(len(run["step"])):
        m = toy.load_checkpoint(spec, run, i)
        pat = m.run(held_out["ids"], cache=("attn_pattern", layer)).cache["attn_pattern", layer]
        out.append(diagonal_attention(pat))
    return torch.stack(out)


def ideal_previous_pattern(n):
    ideal = torch.zeros(n, n)
    ideal[0, 0] = 1.0
    ideal[torch.arange(1, n), torch.arange(n - 1)] = 1.0
    return ideal


def clamped_logits(model, ids, layer, head):
    v = model.run(ids, cache=("v", layer)).cache["v", layer][:, :, head]
    ideal = ideal_previous_pattern(ids.shape[1]) @ v

    def fix(z):
        z = z.clone()
        z[:, :, head] = ideal
        return z
    return model.run(ids, edits=[edit(("attn_z", layer), fix)]).logits


def query_label_attention(pattern, batch):
    rows = torch.arange(pattern.shape[0])[:, None]
    return pattern[rows, :, batch["query_pos"], batch["label_pos"]].mean(dim=(0, 1))


def pattern_of(model, batch, layer):
    return model.run(batch["ids"], cache=("attn_pattern", layer)).cache["attn_pattern", layer]


# --- exercise 1 ----------------------------------------------------------------------------
def test_diagonal_attention(trained):
    *_, model, batch = trained
    pat = pattern_of(model, batch, 0)
    assert "matches" in str(w.check_diagonal_attention(diagonal_attention, pat))
    with pytest.raises(CheckFailed, match="main diagonal"):
        w.check_diagonal_attention(lambda p: p.diagonal(dim1=-2, dim2=-1).mean((0, 2)), pat)
    with pytest.raises(CheckFailed, match="one number per head"):
        w.check_diagonal_attention(lambda p: p[:, :, 1:, :-1].diagonal(dim1=-2, dim2=-1).mean(-1), pat)
    with pytest.raises(CheckFailed, match="no function"):
        w.check_diagonal_attention(..., pat)


def test_previous_token_curve_against_the_stored_scores(trained):
    spec, run, *_ = trained
    assert "matches" in str(w.check_previous_token_curve(previous_token_curve, spec, run, 0))
    with pytest.raises(CheckFailed, match=r"\[checkpoint, head\]"):
        w.check_previous_token_curve(lambda s, r, l: previous_token_curve(s, r, l).T, spec, run, 0)
    with pytest.raises(CheckFailed, match="largest difference"):               # the other layer
        w.check_previous_token_curve(lambda s, r, l: previous_token_curve(s, r, 1), spec, run, 0)


# --- exercise 2 ----------------------------------------------------------------------------
def test_ideal_previous_pattern():
    assert "matches" in str(w.check_ideal_previous_pattern(ideal_previous_pattern, 7))
    with pytest.raises(CheckFailed, match="row 0"):
        w.check_ideal_previous_pattern(lambda n: torch.diag(torch.ones(n - 1), -1), 7)
    with pytest.raises(CheckFailed, match="transposed"):
        w.check_ideal_previous_pattern(lambda n: ideal_previous_pattern(n).T, 7)


@pytest.mark.parametrize("layer, head", [(0, 0), (1, 2)])
def test_clamped_logits(trained, layer, head):
    *_, model, batch = trained
    ids = batch["ids"][:6]
    assert "matches" in str(w.check_clamped_logits(clamped_logits, model, ids, layer, head))
    with pytest.raises(CheckFailed, match="unclamped"):
        w.check_clamped_logits(lambda m, i, l, h: m.run(i).logits, model, ids, layer, head)
    with pytest.raises(CheckFailed, match="largest difference"):               # clamped the wrong head
        w.check_clamped_logits(lambda m, i, l, h: clamped_logits(m, i, l, (h + 1) % 3), model, ids, layer, head)
    # the reference agrees with the toy module's own clamp for the first layer's head 0
    if (layer, head) == (0, 0):
        with toy.clamped(model, "prev", batch):
            want = model.run(batch["ids"]).logits
        torch.testing.assert_close(clamped_logits(model, batch["ids"], 0, 0), want, atol=1e-5, rtol=1e-4)


# --- exercise 3 ----------------------------------------------------------------------------
def test_label_attention(trained):
    *_, model, batch = trained
    pat = pattern_of(model, batch, 1)
    assert "matches" in str(w.check_label_attention(query_label_attention, pat, batch))
    torch.testing.assert_close(query_label_attention(pat, batch), toy.label_attention(pat, batch))
    with pytest.raises(CheckFailed, match="exemplar itself"):
        w.check_label_attention(
            lambda p, b: query_label_attention(p, {**b, "label_pos": b["label_pos"] - 1}), pat, batch)
