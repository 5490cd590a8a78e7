"""Week 10 exercise checks on tiny random binding models: right answers pass, usual slips
fail with a message that names them."""

import pytest
import torch
from test_binding import binding_model, dataset

from interpbook import binding as B
from interpbook.exercises import CheckFailed
from interpbook.exercises import week10 as w
from interpbook.tracing import patch, steer


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return binding_model(request.param)


def binding_id_difference(model, ds, kind):
    resid = model.run(ds.prompts, cache="resid_pre").cache.stack("resid_pre")
    return (resid[:, :, ds.positions[kind + "1"]] - resid[:, :, ds.positions[kind + "0"]]).mean(1)


def test_binding_id_difference(model):
    ds = dataset(model, 6)
    w.check_binding_id_difference(binding_id_difference, model, ds)
    with pytest.raises(CheckFailed, match="sign is flipped"):
        w.check_binding_id_difference(lambda *a: -binding_id_difference(*a), model, ds)
    with pytest.raises(CheckFailed):   # the first context only, not the mean
        w.check_binding_id_difference(lambda m, d, k: binding_id_difference(m, d.select([0]), k), model, ds)
    with pytest.raises(CheckFailed, match="replace the"):
        w.check_binding_id_difference(..., model, ds)


def intervene(model, ds, kind, delta, *, accumulate=False):
    p0, p1 = ds.positions[kind + "0"], ds.positions[kind + "1"]
    resid = model.run(ds.prompts, cache="resid_pre").cache.stack("resid_pre")
    edits = []
    for layer in range(model.n_layers):
        if accumulate:
            edits += [steer(("resid_pre", layer), delta[layer], pos=p0), steer(("resid_pre", layer), -delta[layer], pos=p1)]
        else:
            edits += [patch(("resid_pre", layer), (resid[layer, :, p0] + delta[layer]).clone(), pos=p0),
                      patch(("resid_pre", layer), (resid[layer, :, p1] - delta[layer]).clone(), pos=p1)]
    return model.run(ds.prompts, edits=edits).last_logits


def test_binding_intervention(model):
    ds = dataset(model, 6)
    w.check_binding_intervention(intervene, model, ds)
    with pytest.raises(CheckFailed, match="pile up"):
        w.check_binding_intervention(lambda *a: intervene(*a, accumulate=True), model, ds)
    def first_layer_only(m, d, kind, delta):
        return m.run(d.prompts, edits=[steer(("resid_pre", 0), delta[0], pos=d.positions[kind + "0"])]).last_logits

    with pytest.raises(CheckFailed):   # only slot 0, only the first layer
        w.check_binding_intervention(first_layer_only, model, ds)


def patch_and_classify(model, base, cf, layer, *, third_from_cf=False):
    value = model.run(cf.prompts, cache=("resid_pre", layer)).cache["resid_pre", layer][:, -1].clone()
    top = model.run(base.prompts, edits=[patch(("resid_pre", layer), value, pos=-1)]).last_logits.argmax(-1)
    source = cf if third_from_cf else base
    third = source.attr_ids[torch.arange(len(base)), cf.query if not third_from_cf else base.query]
    codes = torch.full_like(top, 3)
    codes[top == third] = 2
    codes[top == cf.answers] = 1
    codes[top == base.answers] = 0
    return codes


def test_patch_and_classify(model):
    base, cf = dataset(model, 6, seed=4), dataset(model, 6, seed=5, first_query=1)
    result = w.check_patch_and_classify(patch_and_classify, model, base, cf)
    assert "layer" in result.message
    with pytest.raises(CheckFailed, match="prompt 0 gets code 0"):   # every answer called the base answer
        w.check_patch_and_classify(lambda m, b, c, l: torch.zeros(len(b)), model, base, cf)
    with pytest.raises(CheckFailed, match="one code per base prompt"):
        w.check_patch_and_classify(lambda m, b, c, l: torch.zeros(2), model, base, cf)


def rerotate_keys(keys, delta, inv_freq):
    angle = delta * inv_freq
    cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])
    half = keys.shape[-1] // 2
    return keys * cos + torch.cat([-keys[..., half:], keys[..., :half]], dim=-1) * sin


def test_rerotate_keys(model):
    ds = dataset(model, 2)
    w.check_rerotate_keys(rerotate_keys, model, ds.prompts)
    with pytest.raises(CheckFailed, match="wrong way"):
        w.check_rerotate_keys(lambda k, d, f: rerotate_keys(k, -d, f), model, ds.prompts)
    with pytest.raises(CheckFailed):   # the frequencies of one pair used for all
        w.check_rerotate_keys(lambda k, d, f: rerotate_keys(k, d, f[:1].expand_as(f)), model, ds.prompts)
    assert w.rotary_frequencies(model, 0).shape == (model.d_head // 2,)
