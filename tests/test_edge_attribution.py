"""interpbook.edge_attribution: the edge graph, EAP / EAP-IG scores and edge-level circuit
evaluation, checked against invariants on tiny random models of every family (in float64,
so that first-order agreement is not lost in rounding), and cheaply on the real model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, random_ids, tiny_model

from interpbook import edge_attribution as ea
from interpbook.patching import logit_diff

FAMILIES = list(CONFIGS)


def metric(logits):
    return logit_diff(logits, 5, 7).mean()


def setup(family):
    model = tiny_model(family)
    model.hf.double()
    clean = random_ids(3, 6, seed=1)
    corrupt = clean.clone()
    corrupt[:, 1:3] = random_ids(3, 2, seed=5)
    return model, clean, corrupt, ea.EdgeGraph.of(model)


def native(model, ids):
    with torch.no_grad():
        return float(metric(model.hf(ids).logits[:, -1]))


def test_graph_counts_match_hanna_et_al_for_gpt2_small_shape():
    """A GPT-2-small-shaped graph (12 layers x 12 heads) has the paper's 32,491 edges."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from interpbook.lm import Model
    from tiny_models import ToyTokenizer

    cfg = GPT2Config(vocab_size=11, n_embd=24, n_layer=12, n_head=12, n_positions=8)
    graph = ea.EdgeGraph.of(Model(AutoModelForCausalLM.from_config(cfg), ToyTokenizer(), name="gpt2-shape"))
    assert graph.n_edges == 32491
    assert len(graph.senders) == 1 + 12 * 13 and len(graph.receivers) == 12 * 37 + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_senders_add_up_to_the_residual_stream(family):
    model, clean, _, graph = setup(family)
    out = ea.sender_outputs(model, clean, graph)
    resid = model.run(clean, cache=("resid_pre", 1)).cache["resid_pre", 1]
    a = model.anatomy
    bias = 0 if a.b_O(0) is None else a.b_O(0)
    rebuilt = out[:graph.layer_senders(0).stop].sum(0) + bias
    torch.testing.assert_close(rebuilt, resid, rtol=1e-5, atol=1e-6)  # post-norm shares in float32


@pytest.mark.parametrize("family", FAMILIES)
def test_all_edges_is_the_model_and_no_edge_the_corrupted_run(family):
    model, clean, corrupt, graph = setup(family)
    both = torch.stack([graph.edges, torch.zeros_like(graph.edges)])
    got = ea.circuit_metrics(model, clean, corrupt, both, metric, graph=graph)
    assert got.tolist() == pytest.approx([native(model, clean), native(model, corrupt)], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_matches_single_edge_patching_to_first_order(family, monkeypatch):
    """With the corrupted outputs moved a small step eps towards corrupt, patching one edge
    changes the metric by the EAP score up to O(eps^2), for every edge of the graph."""
    model, clean, corrupt, graph = setup(family)
    eps = 1e-4
    real = ea.sender_outputs
    a_clean, a_corrupt = real(model, clean, graph), real(model, corrupt, graph)

    def nudged(m, prompts, g=None):
        ids = m.forward_inputs(prompts)["input_ids"]
        return a_clean + eps * (a_corrupt - a_clean) if torch.equal(ids, corrupt) else real(m, prompts, g)

    monkeypatch.setattr(ea, "sender_outputs", nudged)
    scores = ea.edge_attribution(model, clean, corrupt, metric, graph=graph)
    edges = graph.edges.nonzero()
    masks = torch.stack([graph.edges.clone().index_put_(tuple(e), torch.tensor(False)) for e in edges])
    exact = ea.circuit_metrics(model, clean, corrupt, masks, metric, graph=graph, batch_size=300)
    base = ea.circuit_metrics(model, clean, corrupt, graph.edges, metric, graph=graph)
    effect = (exact.double() - float(base)) / eps
    # circuit_metrics returns float32: compare at that precision, relative to the largest effect
    first_order = scores[graph.edges].double() / eps
    scale = float(first_order.abs().max())
    assert scale > 0
    assert (effect - first_order).abs().max() < 0.01 * scale


@pytest.mark.parametrize("family", ["llama", "gemma3", "neox"])
def test_eap_ig_scores_on_the_embedding_add_up_to_the_total_effect(family):
    """Integrated gradients are complete: the embedding's edges reach every receiver, so
    their IG scores sum to metric(corrupt) - metric(clean) as the steps grow (EAP does not)."""
    model, clean, corrupt, graph = setup(family)
    total = native(model, corrupt) - native(model, clean)
    err = [abs(float(ea.edge_attribution(model, clean, corrupt, metric, method="eap-ig", steps=s,
                                         graph=graph)[:, 0].sum()) - total) for s in (4, 40)]
    assert err[1] < err[0] / 2  # the step rule's error falls like 1/steps


def test_scoring_leaves_no_gradient_on_the_weights():
    """Only the receivers' inputs get gradients (and are scored and freed at once): a model
    whose weights require gradients is left as it was."""
    model, clean, corrupt, graph = setup("llama")
    assert all(p.requires_grad for p in model.hf.parameters())
    for method in ("eap", "eap-ig"):
        ea.edge_attribution(model, clean, corrupt, metric, method=method, steps=2, graph=graph)
    assert all(p.grad is None for p in model.hf.parameters())


def test_top_edges_are_nested_and_sized():
    model, clean, corrupt, graph = setup("llama")
    scores = ea.edge_attribution(model, clean, corrupt, metric, graph=graph)
    circuits = ea.top_edges(graph, scores, [0, 5, 20, graph.n_edges])
    assert circuits.sum((1, 2)).tolist() == [0, 5, 20, graph.n_edges]
    assert bool((circuits[1] <= circuits[2]).all()) and not bool((circuits & ~graph.edges).any())
    kept = scores.abs()[circuits[1]].min()
    assert bool((scores.abs()[graph.edges & ~circuits[1]] <= kept).all())
    assert len(graph.edge_names(circuits[1])) == 5 and "->" in graph.edge_names(circuits[1])[0]


def test_bad_input_gets_clear_errors():
    model, clean, corrupt, graph = setup("llama")
    with pytest.raises(ValueError, match="method"):
        ea.edge_attribution(model, clean, corrupt, metric, method="ig")
    with pytest.raises(ValueError, match="same shape"):
        ea.edge_attribution(model, clean, corrupt[:, :4], metric)
    with pytest.raises(ValueError, match="receivers, senders"):
        ea.circuit_metrics(model, clean, corrupt, torch.ones(3, 3, dtype=torch.bool), metric)
    with pytest.raises(TypeError, match="bool"):
        ea.circuit_metrics(model, clean, corrupt, graph.edges.float(), metric)
    with pytest.raises(ValueError, match="between 0"):
        ea.top_edges(graph, torch.zeros(graph.edges.shape), [graph.n_edges + 1])


@pytest.mark.integration
def test_real_model_circuit_of_every_edge_is_the_model(real_model):
    from interpbook.circuits import ioi_dataset, logit_diffs

    ds = ioi_dataset(real_model, 4)
    graph = ea.EdgeGraph.of(real_model)
    got = ea.circuit_metrics(real_model, ds.prompts, ds.corrupt, graph.edges, ds.metric, graph=graph)
    assert float(got[0]) == pytest.approx(float(logit_diffs(real_model, ds).mean()), rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "neox"])
def test_sparse_and_dense_circuits_match_the_edge_by_edge_definition(family):
    """Small circuits are evaluated from their kept edges (the residual minus the kept
    differences), large ones from their cut edges: both equal the definition, every cut
    edge adding corrupt - current to its receiver."""
    model, clean, corrupt, graph = setup(family)
    g = torch.Generator().manual_seed(0)
    circuits = torch.stack([graph.edges & (torch.rand(graph.edges.shape, generator=g) < f) for f in (0.05, 0.9)])
    a_corrupt = ea.sender_outputs(model, corrupt, graph)
    want = []
    for keep in circuits:
        def delta(receivers, x, keep=keep):
            up = int(graph.edges[receivers.start].sum())
            cut = (~keep[receivers, :up]).to(x.dtype)
            return torch.einsum("vu,ubpd->bpvd", cut, a_corrupt[:up] - hooks.out[:up])

        hooks = ea._EdgeHooks(model, graph, delta, record=True)
        with torch.no_grad(), hooks:
            want.append(float(metric(model.hf(clean).logits[:, -1])))
    got = ea.circuit_metrics(model, clean, corrupt, circuits, metric, graph=graph)
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
