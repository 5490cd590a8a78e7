"""Tracing: caching, patching, ablation, early stopping, hook hygiene and error messages."""

import pytest
import torch
from tiny_models import CONFIGS, random_ids, tiny_model

import interpbook as ib

FAMILIES = list(CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def _editable_sites(model):
    a = model.anatomy
    sites = ["embed", "final_norm"]
    for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "mlp_act", "attn_z", "q", "k", "v"):
        if name == "resid_mid" and a.parallel_residual:
            continue
        sites += [(name, 0), (name, a.n_layers - 1)]
    return sites


def _hook_count(hf):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())


def test_patching_clean_into_clean_changes_nothing(model):
    ids = random_ids()
    sites = _editable_sites(model)
    clean = model.run(ids, cache=sites)
    for site in sites:
        patched = model.run(ids, edits=[ib.patch(site, clean.cache[site])])
        if site[0] == "resid_mid":  # edited through attn_out = mid - pre: one rounding step
            torch.testing.assert_close(patched.logits, clean.logits, atol=1e-5, rtol=0)
        else:
            assert torch.equal(patched.logits, clean.logits), site


@pytest.mark.parametrize("name", ["resid_pre", "resid_mid", "resid_post"])
def test_patching_every_corrupted_activation_at_a_layer_gives_the_corrupted_run(model, name):
    """Everything downstream of a residual-stream site reads only that site, so replacing
    it at every position hands the rest of the pass the corrupted run."""
    if name == "resid_mid" and model.anatomy.parallel_residual:
        pytest.skip("no resid_mid in a parallel block")
    clean_ids, corrupt_ids = random_ids(seed=1), random_ids(seed=2)
    corrupt = model.run(corrupt_ids, cache=name)
    for layer in range(model.n_layers):
        patched = model.run(clean_ids, edits=[ib.patch((name, layer), corrupt.cache[name, layer])])
        torch.testing.assert_close(patched.logits, corrupt.logits, atol=1e-5, rtol=0)


def test_patching_one_position_only_changes_that_position_and_later(model):
    clean_ids, corrupt_ids = random_ids(seed=1), random_ids(seed=2)
    corrupt = model.run(corrupt_ids, cache=("resid_pre", 1))
    clean = model.run(clean_ids)
    patched = model.run(clean_ids, edits=[ib.patch(("resid_pre", 1), corrupt.cache["resid_pre", 1][:, 3], pos=3)])
    assert torch.equal(patched.logits[:, :3], clean.logits[:, :3])
    assert not torch.allclose(patched.logits[:, 3], clean.logits[:, 3])


def test_zero_ablating_a_head_removes_exactly_its_contribution(model):
    a = model.anatomy
    ids = random_ids()
    base = model.run(ids, cache=[("attn_z", 1), ("attn_out", 1)])
    abl = model.run(ids, cache=[("attn_z", 1), ("attn_out", 1)], edits=[ib.ablate(("attn_z", 1), head=2)])
    assert torch.equal(abl.cache["attn_z", 1][:, :, 2], torch.zeros_like(abl.cache["attn_z", 1][:, :, 2]))
    assert torch.equal(abl.cache["attn_z", 1][:, :, [0, 1, 3]], base.cache["attn_z", 1][:, :, [0, 1, 3]])
    if a.family != "gemma3":  # Gemma normalises after the projection, so removal is not linear
        head2 = base.cache["attn_z", 1][:, :, 2] @ a.W_O(1)[2]
        torch.testing.assert_close(abl.cache["attn_out", 1], base.cache["attn_out", 1] - head2, atol=1e-5, rtol=1e-5)


def test_edits_with_position_and_head_lists(model):
    ids = random_ids()
    run = model.run(ids, cache=("attn_z", 0), edits=[ib.ablate(("attn_z", 0), pos=[1, 4], head=[0, 3])])
    z = run.cache["attn_z", 0]
    assert torch.equal(z[:, [1, 4]][:, :, [0, 3]], torch.zeros(2, 2, 2, model.d_head))
    assert z[:, [1, 4]][:, :, [1, 2]].abs().sum() > 0 and z[:, 0].abs().sum() > 0


def test_steering_adds_a_vector(model):
    ids = random_ids()
    vec = torch.randn(model.d_model)
    base = model.run(ids, cache=("resid_post", 0))
    run = model.run(ids, cache=("resid_post", 0), edits=[ib.steer(("resid_post", 0), vec, pos=-1, scale=2.0)])
    torch.testing.assert_close(run.cache["resid_post", 0][:, -1], base.cache["resid_post", 0][:, -1] + 2 * vec)
    assert torch.equal(run.cache["resid_post", 0][:, :-1], base.cache["resid_post", 0][:, :-1])


def test_stop_early_records_and_skips_the_rest(model):
    calls = []
    last = model.anatomy.layers()[-1]
    h = last.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run = model.run(random_ids(), cache=("resid_post", 0), stop_early=True)
    finally:
        h.remove()
    assert run.logits is None and ("resid_post", 0) in run.cache and not calls


def test_hooks_are_removed_also_after_an_exception(model):
    before = _hook_count(model.hf)
    with pytest.raises(ZeroDivisionError):
        with model.trace(cache="resid_post", edits=[ib.ablate(("attn_z", 0), head=1)]):
            model.hf(input_ids=random_ids())
            1 / 0
    assert _hook_count(model.hf) == before
    with pytest.raises(ValueError, match="shape"):
        model.run(random_ids(), edits=[ib.patch(("resid_post", 0), torch.zeros(3, 3))])
    assert _hook_count(model.hf) == before


def test_cache_addressing(model):
    run = model.run(random_ids(), cache="resid_post")
    assert torch.equal(run.cache["resid_post", -1], run.cache["resid_post", model.n_layers - 1])
    assert run.cache.stack("resid_post").shape == (model.n_layers, 2, 7, model.d_model)
    with pytest.raises(KeyError, match="per layer"):
        run.cache["resid_post"]
    with pytest.raises(KeyError, match="not recorded.*resid_post"):
        run.cache["mlp_out", 0]


# --- error messages ------------------------------------------------------------------

def test_misspelled_site_suggests_the_right_one(model):
    with pytest.raises(KeyError, match="Did you mean 'resid_post'"):
        model.run(random_ids(), cache=("resid_pots", 0))


def test_layer_out_of_range(model):
    with pytest.raises(IndexError, match=r"has 3 layers \(0..2"):
        model.run(random_ids(), cache=("resid_post", 3))


def test_head_out_of_range(model):
    with pytest.raises(IndexError, match=r"Head 4 is out of range.*4 heads"):
        model.run(random_ids(), edits=[ib.ablate(("attn_z", 0), head=4)])


def test_head_on_a_non_head_site(model):
    with pytest.raises(ValueError, match="head= only applies"):
        model.run(random_ids(), edits=[ib.ablate(("resid_post", 0), head=1)])


def test_patch_of_the_wrong_shape(model):
    with pytest.raises(ValueError, match=r"has shape \(5,\), but the selected activation has shape \(2, 7, 32\)"):
        model.run(random_ids(), edits=[ib.patch(("resid_post", 0), torch.zeros(5))])


def test_attention_pattern_is_read_only(model):
    with pytest.raises(ValueError, match="recorded but not edited"):
        model.run(random_ids(), edits=[ib.ablate(("attn_pattern", 0))])


def test_layerless_site_with_a_layer(model):
    with pytest.raises(ValueError, match="has no layer"):
        model.run(random_ids(), cache=("embed", 0))


def test_resid_mid_in_a_parallel_block_is_explained():
    with pytest.raises(ValueError, match="no resid_mid"):
        tiny_model("neox").run(random_ids(), cache=("resid_mid", 0))


# --- rows= ---------------------------------------------------------------------------------

ROWS = [1, [0, 2], slice(1, 3), torch.tensor([True, False, True])]


@pytest.mark.parametrize("rows", ROWS, ids=["int", "list", "slice", "mask"])
def test_rows_select_batch_rows_with_pos_and_head(model, rows):
    """ablate and steer with rows= change exactly rows x positions (x heads)."""
    ids = random_ids(batch=3)
    picked = torch.zeros(3, dtype=torch.bool)
    picked[rows] = True
    site = ("attn_z", 1)
    z = model.run(ids, cache=[site]).cache[site]
    expected = z.clone()
    for r in picked.nonzero()[:, 0]:
        for p in (2, 4):
            expected[r, p, [0, 3]] = 0
    ablated = model.run(ids, cache=[site], edits=[ib.ablate(site, rows=rows, pos=[2, 4], head=[0, 3])])
    assert torch.equal(ablated.cache[site], expected)
    resid = ("resid_pre", 1)
    plain = model.run(ids, cache=[resid]).cache[resid]
    steered = model.run(ids, cache=[resid], edits=[ib.steer(resid, torch.ones(model.d_model), rows=rows, pos=3)])
    delta = steered.cache[resid] - plain
    torch.testing.assert_close(delta[picked, 3], torch.ones_like(delta[picked, 3]))
    delta[picked, 3] = 0
    assert not delta.any()


def test_patch_rows_takes_values_for_the_selected_rows(model):
    """Copying run A's activation into rows of a batch made of [A, B, B] makes those rows
    compute A's logits; other rows are untouched."""
    a, b = random_ids(batch=1, seed=3), random_ids(batch=1, seed=4)
    site = ("resid_pre", 1)
    run_a = model.run(a, cache=[site])
    batch = torch.cat([b, b, b])
    plain = model.run(batch)
    patched = model.run(batch, edits=[ib.patch(site, run_a.cache[site], rows=[0, 2])])
    torch.testing.assert_close(patched.logits[[0, 2]], run_a.logits.expand(2, -1, -1), atol=1e-5, rtol=1e-5)
    assert torch.equal(patched.logits[1], plain.logits[1])
    one = model.run(batch, edits=[ib.patch(site, run_a.cache[site][0, 2], rows=1, pos=2)])
    assert torch.equal(one.logits[[0, 2]], plain.logits[[0, 2]]) and not torch.equal(one.logits[1], plain.logits[1])


def test_edit_with_rows_sees_only_those_rows(model):
    seen = []

    def double(x):
        seen.append(x.shape)
        return 2 * x

    ids = random_ids(batch=3)
    base = model.run(ids, cache=[("mlp_out", 0)]).cache["mlp_out", 0]
    got = model.run(ids, cache=[("mlp_out", 0)], edits=[ib.edit(("mlp_out", 0), double, rows=[2])]).cache["mlp_out", 0]
    assert seen == [(1, 7, model.d_model)]
    assert torch.equal(got[2], 2 * base[2]) and torch.equal(got[:2], base[:2])


def test_bad_rows_are_explained(model):
    ids = random_ids(batch=3)
    with pytest.raises(IndexError, match=r"rows 3 is out of range.*has 3"):
        model.run(ids, edits=[ib.ablate(("resid_pre", 0), rows=3)])
    with pytest.raises(ValueError, match="bool mask for rows needs one entry per element \\(3\\)"):
        model.run(ids, edits=[ib.ablate(("resid_pre", 0), rows=torch.tensor([True, False]))])
    with pytest.raises(TypeError, match="rows must be an int"):
        model.run(ids, edits=[ib.ablate(("resid_pre", 0), rows=1.5)])


# --- gradients through recorded sites -------------------------------------------------------

def _metric(logits):
    return logits[:, -1, 5].sum() - logits[:, -1, 7].sum()


@pytest.mark.parametrize("name", ["resid_post", "resid_mid", "attn_z", "mlp_act", "embed"])
def test_grad_on_recorded_sites_equals_the_identity_edit_gradient(model, name):
    """run(grad=True) puts cached tensors on the path of the forward pass, so autograd.grad
    w.r.t. them equals the gradient obtained the old way, through an identity edit."""
    if name == "resid_mid" and model.anatomy.parallel_residual:
        pytest.skip("no resid_mid in a parallel block")
    site = name if name == "embed" else (name, 1)
    ids = random_ids()
    run = model.run(ids, cache=[site], grad=True)
    (g,) = torch.autograd.grad(_metric(run.logits), [run.cache[site]])
    held = {}

    def keep(x):
        held["x"] = x.detach().requires_grad_(True)
        return held["x"]

    with torch.enable_grad():
        ref = model.run(ids, edits=[ib.edit(site, keep)], grad=True)
        (g_ref,) = torch.autograd.grad(_metric(ref.logits), [held["x"]])
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    assert g.abs().sum() > 0


def test_grad_on_resid_post_matches_finite_differences():
    model = tiny_model("llama")
    ids = random_ids(batch=1)
    site = ("resid_post", 0)
    run = model.run(ids, cache=[site], grad=True)
    (g,) = torch.autograd.grad(_metric(run.logits), [run.cache[site]])
    base = run.cache[site].detach()
    direction = torch.randn_like(base)
    eps = 1e-3
    plus, minus = (float(_metric(model.run(ids, edits=[ib.patch(site, base + s * eps * direction)]).logits))
                   for s in (1, -1))
    assert (plus - minus) / (2 * eps) == pytest.approx(float((g * direction).sum()), rel=2e-2, abs=1e-3)


def test_trace_with_grad_gives_grads_in_a_block_you_run(model):
    ids = random_ids()
    with torch.enable_grad(), model.trace(cache=[("attn_z", 0), ("resid_pre", 2)], grad=True) as tr:
        logits = model.hf(input_ids=ids).logits
    gz, gr = torch.autograd.grad(_metric(logits), [tr.cache["attn_z", 0], tr.cache["resid_pre", 2]])
    assert gz.shape == tr.cache["attn_z", 0].shape and gz.abs().sum() > 0 and gr.abs().sum() > 0


def test_grad_mode_works_with_frozen_weights(model):
    """load_model freezes the weights: recorded sites must still get gradients, and a site
    upstream of another must get the whole gradient (through the downstream one too)."""
    ids = random_ids()
    sites = [("resid_pre", 1), ("attn_z", 1), ("resid_post", model.n_layers - 1)]

    def grads():
        run = model.run(ids, cache=sites, grad=True)
        return torch.autograd.grad(_metric(run.logits), [run.cache[s] for s in sites])

    want = grads()
    model.hf.requires_grad_(False)
    try:
        got = grads()
    finally:
        model.hf.requires_grad_(True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in got)


def test_last_only_unembeds_just_the_last_position(model):
    """``Model.logits``, ``run(last_only=True)`` and ``forward_last`` give the full pass's
    last-position logits while unembedding one position."""
    prompts = random_ids()
    full = model.run(prompts)
    last = model.run(prompts, last_only=True, cache=[("resid_post", 0)])
    assert last.logits.shape == (2, 1, full.logits.shape[-1])
    torch.testing.assert_close(last.last_logits, full.last_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.logits(prompts), full.last_logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_last(model.forward_inputs(prompts)), full.last_logits,
                                   atol=1e-5, rtol=1e-5)
    assert ("resid_post", 0) in last.cache
