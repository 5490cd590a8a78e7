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
