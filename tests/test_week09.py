"""Week 9 exercise checks on tiny random IOI models: right answers pass, usual slips fail
with a message that names them."""

import pytest
import torch
from test_circuits import dataset, ioi_model

from interpbook import circuits as C
from interpbook.exercises import CheckFailed
from interpbook.exercises import week09 as w
from interpbook.tracing import edit, patch


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def setup(request):
    model = ioi_model(request.param)
    return model, dataset(model, 8)


def patch_one_layer(model, clean, corrupt, layer, metric):
    with torch.no_grad():
        resid = model.run(clean, cache=("resid_pre", layer)).cache["resid_pre", layer]
        return torch.tensor([float(metric(model.run(corrupt, edits=[patch(("resid_pre", layer), resid[:, p], pos=p)])
                                          .last_logits)) for p in range(resid.shape[1])])


def test_layer_patching(setup):
    model, ds = setup
    w.check_layer_patching(patch_one_layer, model, ds)

    def backwards(model, clean, corrupt, layer, metric):  # corrupt patched into clean
        return patch_one_layer(model, corrupt, clean, layer, metric)

    with pytest.raises(CheckFailed):
        w.check_layer_patching(backwards, model, ds)
    with pytest.raises(CheckFailed, match="replace the"):
        w.check_layer_patching(..., model, ds)


def head_attribution(model, clean, corrupt, metric, positions=slice(None)):
    """Attribution patching per head, summed over ``positions`` (all of them: the right answer)."""
    with torch.no_grad():
        zc = model.run(corrupt, cache="attn_z").cache
    run = model.run(clean, cache="attn_z", grad=True)
    zs = [run.cache["attn_z", l] for l in range(model.n_layers)]
    grads = torch.autograd.grad(metric(run.last_logits), zs)
    return torch.stack([((zc["attn_z", l] - z.detach()) * g)[:, positions].sum((0, 1, 3))
                        for l, (z, g) in enumerate(zip(zs, grads))])


def test_head_attribution(setup):
    model, ds = setup
    w.check_head_attribution(head_attribution, model, ds)
    with pytest.raises(CheckFailed, match="wrong sign"):
        w.check_head_attribution(lambda *a: -head_attribution(*a), model, ds)

    def last_position_only(model, clean, corrupt, metric):
        return head_attribution(model, clean, corrupt, metric, positions=slice(-1, None))

    with pytest.raises(CheckFailed):
        w.check_head_attribution(last_position_only, model, ds)


def test_name_mover_check_follows_its_rule(setup):
    model, ds = setup
    direct = C.direct_effects(model, ds)
    io_first = C.attention_to(model, ds, "io") > C.attention_to(model, ds, "s2")
    with pytest.raises(CheckFailed, match="attends"):
        w.check_name_mover(tuple((~io_first).nonzero()[0].tolist()), model, ds)
    if not bool(io_first.any()):  # this random model has no head that prefers IO: nothing can pass
        return
    best = float(direct[io_first].min())
    good = (direct <= 0.5 * best) & io_first & (direct < 0)
    assert bool(good.any())
    for layer, head in good.nonzero().tolist()[:2]:
        w.check_name_mover((layer, head), model, ds)
    weak = (io_first & ~good).nonzero().tolist()
    if weak:
        with pytest.raises(CheckFailed, match="direct path"):
            w.check_name_mover(tuple(weak[0]), model, ds)
    with pytest.raises(IndexError):
        w.check_name_mover((model.n_layers, 0), model, ds)


def mean_ablated_ld(model, ds, circuit, means):
    keep = torch.zeros(model.n_layers, model.n_heads, dtype=torch.bool)
    for layer, head in circuit:
        keep[layer, head] = True
    edits = [edit(("attn_z", l), lambda z, k=keep[l][None, None, :, None], m=means[l]: torch.where(k, z, m))
             for l in range(model.n_layers)]
    with torch.no_grad():
        return float(ds.metric(model.run(ds.prompts, edits=edits).last_logits))


def test_circuit_faithfulness(setup):
    model, ds = setup
    means = C.template_means(model, ds)
    circuit = [(model.n_layers - 1, 0), (0, 1)]
    every = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    f_c, f_0, f_m = (mean_ablated_ld(model, ds, c, means) for c in (circuit, [], every))
    w.check_circuit_faithfulness((f_c - f_0) / (f_m - f_0), model, ds, circuit)
    with pytest.raises(CheckFailed, match="normalise"):
        w.check_circuit_faithfulness(f_c / f_m, model, ds, circuit)
