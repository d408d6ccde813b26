"""Attribution graphs (sae.attribute, `sae attribute`): on a tiny Llama (and GPT-2) built from a config, with
random-weight transcoders from make_transcoder. The exactness checks run in float64, so that what is measured is
the method, not float32 rounding: completeness (the logit is its direct effects plus its bias terms), exactness
(each node's direct effect equals the change of the logit when the node is removed from the frozen replacement
model, measured with forward passes only), and the replacement reproducing the clean logits."""
from __future__ import annotations

import json

import pytest
import torch

from sae.attribute.effects import direct_effect_rows
from sae.attribute.pipeline import check_completeness
from sae.attribute.prune import normalise_rows, propagate, prune
from sae.attribute.replacement import Part, ReplacementModel
from sae.variants.transcoder import make_transcoder

N_LAYERS, HIDDEN, D_SAE, K = 3, 32, 64, 4
PROMPT = "The cat sat."


def random_transcoder(seed: int, skip: bool = True, dtype=torch.float64):
    torch.manual_seed(seed)
    model = make_transcoder("topk", HIDDEN, D_SAE, skip=skip, k=K)
    with torch.no_grad():
        model.W_enc.normal_(0, HIDDEN ** -0.5)
        model.W_dec.normal_(0, HIDDEN ** -0.5)
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
        if skip:
            model.W_skip.normal_(0, 0.3 * HIDDEN ** -0.5)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def replacement(tiny_lm):
    loaded = tiny_lm("llama", n_layers=N_LAYERS, hidden=HIDDEN)
    loaded.model.double()
    parts = {layer: Part(layer, "transcoder", random_transcoder(layer, skip=layer != 1), run=f"run{layer}")
             for layer in range(N_LAYERS)}
    rm = ReplacementModel(loaded, parts)
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        clean = rm.prepare(ids)
    token = int(clean[-1].argmax())
    rows = direct_effect_rows(rm, token, max_feature_nodes=None, batch_size=64, progress=False)
    return rm, clean, token, rows


def _remove_each(rm, token):
    """Logit of `token` in the frozen replacement with each source removed in turn ([n_sources]), and intact."""
    n = rm.n_sources
    with torch.no_grad():
        intact = rm.logits(rm.forward(), [token])[0, 0]
        removed = rm.logits(rm.forward(torch.ones(n, n, dtype=torch.float64) - torch.eye(n, dtype=torch.float64)),
                            [token])[:, 0]
    return intact, removed


def test_replacement_reproduces_the_clean_logits(replacement):
    rm, clean, _, _ = replacement
    with torch.no_grad():
        frozen = rm.forward()
        logits = rm.logits(frozen, list(range(clean.shape[1])), position=-1)
        every_position = frozen.final[0] @ rm.head.weight.t()
    # transformers' Llama RMSNorm rounds through float32 even in a float64 model: hence 1e-6, not 1e-12
    assert torch.allclose(logits[0], clean[-1], rtol=0, atol=1e-6 * clean.abs().max())
    assert torch.allclose(every_position, clean, rtol=0, atol=1e-6 * clean.abs().max())
    assert rm.n_features > 0 and all(len(part.features) <= K * rm.n_pos for part in rm.parts.values())


def test_completeness_logit_is_direct_effects_plus_bias(replacement):
    rm, clean, token, rows = replacement
    figures = check_completeness(rm, rows.logit, token)
    assert figures["relative_error"] < 1e-4
    # and independently: the bias is the logit with every source removed, measured here
    with torch.no_grad():
        bias = rm.logits(rm.forward(torch.zeros(1, rm.n_sources, dtype=torch.float64)), [token])[0, 0]
    total = rows.logit.sum() + bias
    assert abs(float(total - clean[-1, token])) <= 1e-4 * abs(float(clean[-1, token]))
    assert rows.logit.abs().sum() > 10 * abs(float(clean[-1, token])) * 1e-3   # the row is not all zeros


def test_exactness_each_node_effect_is_the_change_when_removed(replacement):
    rm, _, token, rows = replacement
    intact, removed = _remove_each(rm, token)
    measured = intact - removed                                                      # [n_sources]
    scale = float(measured.abs().max())
    assert scale > 0
    assert float((measured - rows.logit).abs().max()) <= 1e-4 * scale
    # every kind of node carries effect: features, error nodes, embeddings
    for lo, hi in ((0, rm.n_features), (rm.error_index(0, 0), rm.embed_index(0)), (rm.embed_index(0), rm.n_sources)):
        assert rows.logit[lo:hi].abs().max() > 0


def test_feature_rows_are_exact_direct_effects_on_preactivations(replacement):
    rm, _, _, rows = replacement
    n = rm.n_sources
    offsets = rm.feature_offsets()
    with torch.no_grad():
        intact = rm.forward()
        removed = rm.forward(torch.ones(n, n, dtype=torch.float64) - torch.eye(n, dtype=torch.float64))
    checked = 0
    for row, source in zip(rows.features, rows.visited.tolist()):
        layer = max(lay for lay, start in offsets.items() if start <= source and len(rm.parts[lay].features))
        index = torch.tensor([source - offsets[layer]])
        change = rm.preactivations(intact, layer, index)[0, 0] - rm.preactivations(removed, layer, index)[:, 0]
        assert float((change - row).abs().max()) <= 1e-4 * max(float(change.abs().max()), 1e-6)
        # no edge from a feature of the same or a later layer, nor from a later position
        later = [i for lay, start in offsets.items() if lay >= layer
                 for i in range(start, start + len(rm.parts[lay].features))]
        assert float(row[later].abs().max()) == 0.0 if later else True
        checked += 1
    assert checked == rm.n_features


def test_encoder_rows_are_the_variant_encoders_own_derivative(replacement):
    rm, _, _, _ = replacement
    part = rm.parts[0]
    x0 = rm.clean_mlp_in[0]
    delta = 1e-6 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=x0.dtype)
    with torch.no_grad():
        moved = part.module.encode(x0 + delta)[part.positions, part.features]
    predicted = part.activations + (delta[part.positions] * part.encoder).sum(-1)
    assert torch.allclose(moved, predicted, rtol=0, atol=1e-12)


def test_gpt2_replacement_is_exact_too(tiny_lm):
    loaded = tiny_lm("gpt2", n_layers=2, hidden=HIDDEN)
    loaded.model.double()
    rm = ReplacementModel(loaded, {0: Part(0, "transcoder", random_transcoder(5)), 1: Part(1, "transcoder",
                                                                                           random_transcoder(6))})
    with torch.no_grad():
        clean = rm.prepare(torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]]))
    token = int(clean[-1].argmax())
    rows = direct_effect_rows(rm, token, None, 32, progress=False)
    intact, removed = _remove_each(rm, token)
    assert abs(float(intact - clean[-1, token])) <= 1e-6 * float(clean.abs().max())
    assert float(((intact - removed) - rows.logit).abs().max()) <= 1e-4 * float((intact - removed).abs().max())


def test_rows_are_computed_most_influential_first(replacement):
    rm, _, token, rows = replacement
    few = direct_effect_rows(rm, token, max_feature_nodes=3, batch_size=2, progress=False)
    assert len(few.visited) == 3
    shares = normalise_rows(rows.logit[None])[0][:rm.n_features]
    assert int(few.visited[0]) == int(shares.argmax())           # first batch: the largest direct effects
    assert torch.allclose(few.logit, rows.logit)


def test_influence_and_pruning_on_a_planted_graph():
    # nodes: 0 feature f1, 1 feature f2, 2 error, 3 embedding, 4 logit; adjacency [target, source]
    a = torch.zeros(5, 5, dtype=torch.float64)
    a[4, 0], a[4, 1], a[4, 2] = 6.0, 0.1, -3.0    # logit <- f1, f2, error
    a[0, 3] = 2.0                                  # f1 <- embedding
    a[1, 3] = 1.0                                  # f2 <- embedding
    weights = torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64)
    influence = propagate(normalise_rows(a), weights)
    share = torch.tensor([6.0, 0.1, 3.0], dtype=torch.float64) / 9.1
    assert torch.allclose(influence[:3], share)
    assert torch.isclose(influence[3], share[0] + share[1])      # through f1 (all of its input) and f2
    keep = torch.tensor([False, False, False, True, True])
    is_feature = torch.tensor([True, True, False, False, False])
    pruned = prune(a, weights, keep, is_feature, node_threshold=0.8, edge_threshold=0.98)
    assert pruned.node_mask.tolist() == [True, False, True, True, True]
    assert pruned.edge_mask[4, 0] and pruned.edge_mask[0, 3] and not pruned.edge_mask[1, 3]


# ---- the command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_runs(tiny_llama_dir, tmp_path_factory):
    """A live-training-style RUN/layer_L/ of float32 transcoders for the tiny Llama saved in tiny_llama_dir."""
    from sae.runs import save_run
    root = tmp_path_factory.mktemp("attr") / "tc"
    for layer in range(4):
        save_run(random_transcoder(10 + layer, dtype=torch.float32), root / f"layer_{layer}",
                 {"site": "mlp_in", "target_site": "mlp_out", "layer": layer, "model": str(tiny_llama_dir)})
    return root


def _cli(args, capsys):
    from sae.cli import main
    with pytest.raises(SystemExit) as done:
        main(args)
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_cli_writes_a_graph(saved_runs, tmp_path, capsys):
    out = tmp_path / "graph.json"
    code, stdout, err = _cli(["attribute", "--run", str(saved_runs), "--prompt", PROMPT, "--out", str(out),
                              "--node-threshold", "0.9", "--max-feature-nodes", "20"], capsys)
    assert code == 0, err
    graph = json.loads(out.read_text())
    assert graph["prompt_tokens"] and graph["target"]["token_id"] >= 0
    ids = {node["id"] for node in graph["nodes"]}
    assert {node["kind"] for node in graph["nodes"]} <= {"feature", "error", "embedding", "logit"}
    assert sum(node["kind"] == "logit" for node in graph["nodes"]) == 1
    assert sum(node["kind"] == "embedding" for node in graph["nodes"]) == len(graph["prompt_tokens"])
    for node in graph["nodes"]:
        assert {"id", "kind", "layer", "position", "activation", "influence"} <= set(node)
        assert ("feature" in node) == (node["kind"] == "feature")
    assert graph["edges"] and all(edge["source"] in ids and edge["target"] in ids for edge in graph["edges"])
    done = graph["completeness"]      # float32 here, and random transcoders: terms cancel 1e5-fold
    assert abs(done["direct_sum"] + done["bias"] - done["logit"]) <= 1e-5 * done["direct_abs_sum"]
    assert graph["counts"]["features_visited"] == 20
    assert "completeness" in stdout
    code, _, err = _cli(["attribute", "--run", str(saved_runs), "--prompt", PROMPT, "--out", str(out)], capsys)
    assert code == 2 and "exists" in err


@pytest.mark.parametrize("change, message", [
    (["--prompt", "   "], "--prompt is empty"),
    (["--target", "cat"], "not one"),
    (["--model", "MODEL2"], "was trained on model"),
])
def test_cli_refuses_bad_input(saved_runs, tmp_path, capsys, tiny_lm, change, message):
    args = ["attribute", "--run", str(saved_runs), "--prompt", PROMPT, "--out", str(tmp_path / "g.json")]
    if "MODEL2" in change:
        other = tmp_path / "other"
        loaded = tiny_lm("llama", n_layers=4, hidden=HIDDEN, seed=3)
        loaded.model.save_pretrained(str(other))
        loaded.tokenizer.save_pretrained(str(other))
        change = ["--model", str(other)]
        capsys.readouterr()
    code, _, err = _cli(args + change, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.json").exists()


def test_cli_names_a_missing_layer_and_allows_a_partial_graph(saved_runs, tmp_path, capsys):
    runs = [str(saved_runs / f"layer_{layer}") for layer in (0, 1, 3)]
    out = tmp_path / "g.json"
    code, _, err = _cli(["attribute", "--run", *runs, "--prompt", PROMPT, "--out", str(out)], capsys)
    assert code == 2 and "layer 2 " in err
    code, _, err = _cli(["attribute", "--run", *runs, "--prompt", PROMPT, "--out", str(out), "--allow-missing"],
                        capsys)
    assert code == 0 and "[2]" in err
    graph = json.loads(out.read_text())
    assert graph["missing_layers"] == [2]
    assert not any(node["kind"] == "feature" and node["layer"] == 2 for node in graph["nodes"])


def test_cli_refuses_runs_at_other_sites(tiny_llama_dir, tmp_path, capsys):
    from sae.runs import save_run
    from sae.variants import create
    wrong = tmp_path / "resid"
    save_run(create("topk", HIDDEN, D_SAE, k=K), wrong, {"site": "resid_post", "layer": 0,
                                                          "model": str(tiny_llama_dir)})
    code, _, err = _cli(["attribute", "--run", str(wrong), "--prompt", PROMPT, "--out", str(tmp_path / "g.json")],
                        capsys)
    assert code == 2 and "site resid_post" in err


# ---- the dashboard page ------------------------------------------------------------------------
def test_dashboard_draws_the_graph_with_links_and_edge_summaries(saved_runs, monkeypatch, capsys):
    import os
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from dashboard.runs import find_runs
    from dashboard.views.graph import layout, run_index_of_layers
    out = saved_runs / "graphs" / "cat.json"
    out.parent.mkdir(exist_ok=True)
    code, _, err = _cli(["attribute", "--run", str(saved_runs), "--prompt", PROMPT + " <b>", "--out", str(out),
                         "--max-feature-nodes", "20"], capsys)
    assert code == 0, err
    graph = json.loads(out.read_text())
    runs = find_runs([saved_runs])
    links = run_index_of_layers(graph, runs)
    assert links == {layer: i for i, run in enumerate(runs) for layer in [int(run.config["layer"])]}
    nodes, edges, tokens = layout(graph, links)
    assert len(nodes) == len(graph["nodes"]) and len(edges) == len(graph["edges"])
    assert list(tokens["token"]) == graph["prompt_tokens"]
    top = max(graph["edges"], key=lambda e: abs(e["weight"]))          # the widest edge is the heaviest
    assert edges["width"].max() == edges.loc[edges["weight"].abs().idxmax(), "width"]
    assert abs(edges["weight"].abs().max() - abs(top["weight"])) < 1e-12
    feature = nodes[nodes["kind"] == "feature"].iloc[0]
    assert feature["href"] == f"?feature={int(feature['feature'])}&run={links[int(feature['layer'])]}&page=feature" \
        or (links[int(feature["layer"])] == 0 and feature["href"] == f"?feature={int(feature['feature'])}&page=feature")
    logit = nodes[nodes["kind"] == "logit"].iloc[0]
    assert logit["y"] == graph["n_layers"] and logit["top inputs"] != "—"
    assert all(nodes[nodes["kind"] == "embedding"]["y"] == -1)
    monkeypatch.setenv("SAE_DASHBOARD_RUNS", os.pathsep.join([str(saved_runs)]))
    app_path = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    at = AppTest.from_file(str(app_path), default_timeout=60)
    at.query_params["page"] = "graph"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.get("vega_lite_chart")) == 1
    assert "Attribution graph" in at.title[0].value


def test_an_sae_at_mlp_out_is_a_source_only_and_still_exact(tiny_lm):
    from sae.variants import create
    loaded = tiny_lm("llama", n_layers=2, hidden=HIDDEN)
    loaded.model.double()
    torch.manual_seed(7)
    sae_model = create("topk", HIDDEN, D_SAE, k=K).double().eval()
    rm = ReplacementModel(loaded, {0: Part(0, "sae", sae_model), 1: Part(1, "transcoder", random_transcoder(8))})
    with torch.no_grad():
        clean = rm.prepare(torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]]))
    token = int(clean[-1].argmax())
    rows = direct_effect_rows(rm, token, None, 32, progress=False)
    n_sae = len(rm.parts[0].features)
    assert n_sae > 0 and len(rows.visited) == rm.n_features - n_sae      # SAE features get no input rows
    assert bool((rows.visited >= n_sae).all())
    intact, removed = _remove_each(rm, token)
    assert float(((intact - removed) - rows.logit).abs().max()) <= 1e-4 * float((intact - removed).abs().max())
    assert rows.logit[:n_sae].abs().max() > 0


@pytest.mark.parametrize("layer, width, message", [(9, HIDDEN, "not one of the model's layers 0..3"),
                                                   (0, 16, "reads width 16")])
def test_cli_refuses_runs_that_do_not_fit_the_model(tiny_llama_dir, tmp_path, capsys, layer, width, message):
    from sae.runs import save_run
    run = tmp_path / "tc"
    save_run(make_transcoder("topk", width, D_SAE, k=K), run,
             {"site": "mlp_in", "target_site": "mlp_out", "layer": layer, "model": str(tiny_llama_dir)})
    code, _, err = _cli(["attribute", "--run", str(run), "--prompt", PROMPT, "--out", str(tmp_path / "g.json")],
                        capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
