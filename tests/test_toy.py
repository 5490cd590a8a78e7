"""The toy attention-only models of Week 12: task, anatomy invariants, clamps, training, cache."""

from __future__ import annotations

import pytest
import torch

from interpbook import toy
from interpbook.lenses import logit_lens
from interpbook.toy import ICLTask, TrainSpec

TASK = ICLTask(n_pairs=3, n_items=10, n_labels=6)


def batch(n=5, seed=0):
    return TASK.sample(n, torch.Generator().manual_seed(seed))


def test_task_sequences_hold_their_answers_in_context():
    task = ICLTask(n_pairs=3, n_items=10, n_labels=6, n_queries=3)
    b = task.sample(50, torch.Generator().manual_seed(0))
    ids, target, pos, qpos = b["ids"], b["target"], b["label_pos"], b["query_pos"]
    assert ids.shape == (50, task.seq_len) == (50, 2 * (3 + 3) - 1)
    assert target.shape == pos.shape == (50, 3) and qpos.tolist() == [6, 8, 10]
    rows = torch.arange(50)[:, None]
    assert torch.equal(ids[rows, pos], target)                      # the answer sits at label_pos
    assert torch.equal(ids[rows, pos - 1], ids[:, qpos])            # right after the query's twin
    assert torch.equal(ids[:, qpos[:-1] + 1], target[:, :-1])       # answered queries carry their label
    items, labels = ids[:, 0:6:2], ids[:, 1:6:2]
    assert bool(((items >= 1) & (items <= task.n_items)).all())
    assert bool((labels > task.n_items).all()) and bool((labels < task.vocab_size).all())
    for row in range(50):                                           # distinct items and labels per sequence
        assert len(set(items[row].tolist())) == task.n_pairs == len(set(labels[row].tolist()))
    # labels are re-drawn per sequence: one item gets different labels in different sequences
    seen = {}
    for row in task.sample(400, torch.Generator().manual_seed(1))["ids"]:
        for x, y in zip(row[0:6:2].tolist(), row[1:6:2].tolist()):
            seen.setdefault(x, set()).add(y)
    assert max(len(v) for v in seen.values()) > 1


def test_task_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="n_items"):
        ICLTask(n_pairs=5, n_items=4)
    with pytest.raises(ValueError, match="one query"):
        ICLTask(n_queries=0)


def test_model_is_attention_only_and_the_book_tools_work():
    model = toy.attention_only_model(TASK, d_model=16, n_layers=2, n_heads=2, seed=3)
    with torch.no_grad():
        for p in model.hf.parameters():                              # random weights, not the tiny init
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    ids = batch()["ids"]
    run = model.run(ids, cache=["mlp_out", "attn_out", "attn_z", "attn_pattern", "resid_pre", "resid_post"])
    for layer in range(2):
        assert float(run.cache["mlp_out", layer].abs().max()) == 0.0
        # attention-only: the block adds exactly its attention output
        torch.testing.assert_close(run.cache["resid_post", layer],
                                   run.cache["resid_pre", layer] + run.cache["attn_out", layer])
        # per-head outputs through W_O sum (plus the bias) to the attention output
        z = run.cache["attn_z", layer]
        per_head = torch.einsum("bphd,hdm->bphm", z, model.anatomy.W_O(layer))
        torch.testing.assert_close(per_head.sum(2) + model.anatomy.b_O(layer), run.cache["attn_out", layer],
                                   atol=1e-5, rtol=1e-4)
        pat = run.cache["attn_pattern", layer]
        torch.testing.assert_close(pat.sum(-1), torch.ones_like(pat.sum(-1)))
    # the logit lens at the last layer equals the logits
    lens = logit_lens(model, ids)
    torch.testing.assert_close(lens[-1], run.logits[:, -1], atol=1e-5, rtol=1e-4)
    assert model.tokenizer.decode([0, 1, TASK.n_items + 1]) == "<pad> x0 y0"


def test_seeded_models_are_equal_and_leave_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = toy.attention_only_model(TASK, d_model=16, n_heads=2, seed=1)
    after = torch.rand(1)
    b = toy.attention_only_model(TASK, d_model=16, n_heads=2, seed=1)
    assert torch.equal(before, after)
    for (_, p), (_, q) in zip(a.hf.named_parameters(), b.hf.named_parameters()):
        assert torch.equal(p, q)


def _pattern_under(model, kind, b):
    with toy.clamped(model, kind, b):
        return model.run(b["ids"], cache=["attn_z", "v"])


@pytest.mark.parametrize("kind", ["prev", "match"])
def test_pattern_clamps_make_the_head_output_the_ideal_pattern_times_values(kind):
    model = toy.attention_only_model(TASK, d_model=16, n_layers=2, n_heads=2, seed=0)
    b = batch()
    layer = 0 if kind == "prev" else 1
    run = _pattern_under(model, kind, b)
    z, v = run.cache["attn_z", layer][:, :, 0], run.cache["v", layer][:, :, 0]
    if kind == "prev":
        torch.testing.assert_close(z[:, 1:], v[:, :-1])
        torch.testing.assert_close(z[:, 0], v[:, 0])
    else:
        rows = torch.arange(len(b["ids"]))
        torch.testing.assert_close(z[:, -1], v[rows, b["label_pos"][:, 0]])
    # the other head and (for match) the other positions are untouched
    free = model.run(b["ids"], cache="attn_z").cache["attn_z", layer]
    torch.testing.assert_close(run.cache["attn_z", layer][:, :, 1], free[:, :, 1])
    if kind == "match":
        torch.testing.assert_close(run.cache["attn_z", layer][:, :-1], free[:, :-1])


def test_copy_clamp_adds_the_attended_tokens_unembedding_and_hooks_come_off():
    model = toy.attention_only_model(TASK, d_model=16, n_layers=2, n_heads=2, seed=0)
    b = batch()
    free = model.run(b["ids"], cache=["attn_out", "attn_z", "attn_pattern"])
    with toy.clamped(model, "copy", b):
        run = model.run(b["ids"], cache="attn_out")
    a = model.anatomy
    own = torch.einsum("bd,dm->bm", free.cache["attn_z", 1][:, -1, 0], a.W_O(1)[0])
    u = a.W_U.T[b["ids"]]
    u = u / u.norm(dim=-1, keepdim=True) * a.d_model ** 0.5
    ideal = (free.cache["attn_pattern", 1][:, 0, -1, :, None] * u).sum(1)
    torch.testing.assert_close(run.cache["attn_out", 1][:, -1], free.cache["attn_out", 1][:, -1] - own + ideal,
                               atol=1e-5, rtol=1e-4)
    after = model.run(b["ids"], cache="attn_out")                   # hooks removed
    torch.testing.assert_close(after.cache["attn_out", 1], free.cache["attn_out", 1])


def test_clamp_errors_are_specific():
    model = toy.attention_only_model(TASK, d_model=16, n_layers=2, n_heads=2)
    with pytest.raises(ValueError, match="Unknown clamp"):
        with toy.clamped(model, "match-all", batch()):
            pass
    with pytest.raises(IndexError, match="2 heads"):
        with toy.clamped(model, "prev", batch(), head=2):
            pass
    with pytest.raises(ValueError, match="n_layers >= 2"):
        TrainSpec(n_layers=1, clamp="copy")


def test_training_is_seeded_cached_and_keeps_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPBOOK_CACHE", str(tmp_path))
    spec = TrainSpec(task=TASK, d_model=16, n_heads=2, steps=40, batch=16, eval_every=20, n_eval=32, lr=3e-3)
    run = toy.train_icl(spec)
    assert run["train_loss"].shape == (40,)
    assert run["step"].tolist() == [0, 20, 40]
    assert run["prev"].shape == run["match"].shape == (3, 2, 2)
    assert run["train_loss"][-10:].mean() < run["train_loss"][:5].mean()     # it learns something
    again = toy.train_icl(spec)                                               # from the cache
    assert torch.equal(again["train_loss"], run["train_loss"])
    assert list(tmp_path.glob("toy/*.pt"))
    fresh = toy._train(spec)                                                  # seeded: same numbers
    assert torch.equal(fresh["train_loss"], run["train_loss"])
    model = toy.load_checkpoint(spec, run, -1)
    m = toy.evaluate(model, toy.held_out_batch(spec))
    assert float(m["acc"]) == pytest.approx(float(run["acc"][-1]))
    with pytest.raises(IndexError, match="3 checkpoints"):
        toy.load_checkpoint(spec, run, 3)


def test_steps_to_and_mean_ablation():
    steps, acc = torch.tensor([0, 10, 20, 30]), torch.tensor([0.1, 0.5, 0.95, 0.9])
    assert toy.steps_to(steps, acc, 0.9) == 20
    assert toy.steps_to(steps, acc, 0.99) is None
    model = toy.attention_only_model(TASK, d_model=16, n_layers=2, n_heads=2, seed=2)
    b = batch(8)
    edits = toy.mean_ablate_heads(model, b, [(1, 0)])
    z = model.run(b["ids"], cache="attn_z", edits=edits).cache["attn_z", 1]
    torch.testing.assert_close(z[:, :, 0], z[:1, :, 0].expand_as(z[:, :, 0]))    # same at every row


# --- the name-moving task ------------------------------------------------------------------
NAMES = toy.NameTask(n_names=8, n_fillers=8, n_context=5)


def test_name_task_sequences_end_on_the_subject_and_answer_with_the_other_name():
    b = NAMES.sample(200, torch.Generator().manual_seed(0))
    ids, target, io, s1, qpos = b["ids"], b["target"], b["label_pos"], b["subject_pos"], b["query_pos"]
    assert ids.shape == (200, NAMES.seq_len) == (200, 6) and qpos.tolist() == [5]
    assert target.shape == io.shape == s1.shape == (200, 1)
    rows = torch.arange(200)[:, None]
    is_name = ids > NAMES.n_fillers
    assert bool((ids >= 1).all()) and bool((ids < NAMES.vocab_size).all())
    assert is_name.sum(1).tolist() == [3] * 200                    # the two names and the repeat, all else filler
    assert torch.equal(ids[rows, io], target)                      # the indirect object sits at label_pos
    assert torch.equal(ids[rows, s1][:, 0], ids[:, -1])            # the last token repeats the subject
    assert bool((target[:, 0] != ids[:, -1]).all())                # the answer is the other name
    assert bool((target > NAMES.n_fillers).all()) and bool((io != s1).all())
    assert bool((io < s1).any()) and bool((io > s1).any())         # either name may come first
    assert NAMES.token_name(1) == "w0" and NAMES.token_name(NAMES.n_fillers + 1) == "N0"


def test_name_task_rejects_impossible_sizes():
    with pytest.raises(ValueError, match=r"n_names \(1\) must be at least 2"):
        toy.NameTask(n_names=1)
    with pytest.raises(ValueError, match="n_context >= 2"):
        toy.NameTask(n_context=1)
    with pytest.raises(ValueError, match="n_fillers >= 1"):
        toy.NameTask(n_fillers=0, n_context=4)
    toy.NameTask(n_fillers=0, n_context=2)                          # two names and nothing else is fine
    with pytest.raises(TypeError, match="ICLTask or a NameTask, not dict"):
        TrainSpec(task={"n_names": 8})


def test_name_mover_score_is_the_attention_from_the_last_position_to_the_indirect_object():
    b = NAMES.sample(16, torch.Generator().manual_seed(1))
    T, rows = NAMES.seq_len, torch.arange(16)
    mover = torch.full((16, 3, T, T), 1.0 / T)                      # head 0 a name mover, 1 looks at the
    mover[:, 0, -1] = torch.nn.functional.one_hot(b["label_pos"][:, 0], T).float()   # subject, 2 uniform
    mover[:, 1, -1] = torch.nn.functional.one_hot(b["subject_pos"][:, 0], T).float()
    mover[rows, 1, :-1] = 0.0                                       # other rows must not count
    torch.testing.assert_close(toy.label_attention(mover, b), torch.tensor([1.0, 0.0, 1.0 / T]))


def test_a_trained_name_mover_attends_to_the_indirect_object_and_both_tasks_share_the_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPBOOK_CACHE", str(tmp_path))
    spec = TrainSpec(task=NAMES, d_model=32, n_layers=1, n_heads=2, steps=100, eval_every=50, n_eval=128, lr=3e-3)
    run = toy.train_icl(spec)
    assert run["step"].tolist() == [0, 50, 100] and run["match"].shape == (3, 1, 2)
    assert float(run["acc"][-1]) > 0.9 > float(run["acc"][0])
    assert [p.name.split("-")[0] for p in tmp_path.glob("toy/*.pt")] == ["names"]
    model, b = toy.load_checkpoint(spec, run, -1), toy.held_out_batch(spec)
    pattern = model.run(b["ids"], cache="attn_pattern").cache["attn_pattern", 0]
    head = int(run["match"][-1, 0].argmax())
    rows = torch.arange(len(b["ids"]))
    to_io = pattern[rows, head, -1, b["label_pos"][:, 0]]
    to_subject = pattern[rows, head, -1, b["subject_pos"][:, 0]]
    assert float(to_io.mean()) == pytest.approx(float(run["match"][-1, 0, head]), abs=1e-5)
    assert float(to_io.mean()) > 0.5 > float(to_subject.mean())     # it moves the other name, not the subject
    size, order = toy.circuit_size(model, b)
    assert 1 <= size <= 2 and sorted(order) == [(0, 0), (0, 1)]
