"""The dashboard, page by page, through streamlit.testing.v1.AppTest on small runs made here.

Live views (probe, loss effect, steering) are checked against independent computations: the model's
own hidden states, a hand-written forward hook, brute-force cosines.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dashboard_sample import INJECTIONS, tiny_model_dir, write_analysis

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
LAYER, SITE, D_IN, D_SAE = 1, "resid_post", 32, 64


def make_run(run_dir: Path, model_dir: Path, seed: int, analysed: bool = True) -> Path:
    import sae.runs
    from sae import variants
    torch.manual_seed(seed)
    sae_model = variants.create("relu", d_in=D_IN, d_sae=D_SAE)
    with torch.no_grad():
        sae_model.b_enc.fill_(0.05)  # some latents fire on most tokens of the random model
    sae.runs.save_run(sae_model, run_dir, {"model": str(model_dir), "layer": LAYER, "site": SITE, "store": "none"})
    (run_dir / "eval.json").write_text(json.dumps({"fvu": 0.25, "explained_variance": 0.75, "mse": 0.1, "l0": 12.5,
                                                   "dead_fraction": 0.02, "ce_loss_recovered": 0.9}))
    lines = [json.dumps({"step": s, "tokens": 1024 * s, "loss": 1 / (s + 1), "l0": 40 - s, "fvu": 0.5 / (s + 1),
                         "dead_fraction": 0.01}) for s in range(20)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 20, "tok')  # half-written last line
    if analysed:
        write_analysis(run_dir, D_SAE, n_top=6, radius=4, seed=seed)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    model_dir = tiny_model_dir(root / "model")
    sweep = root / "sweep"
    a = make_run(sweep / "a", model_dir, seed=1)
    b = make_run(sweep / "b", model_dir, seed=2)
    pq.write_table(pa.table({"name": ["a", "b", "c"], "variant": ["relu", "relu", "topk"], "l0": [12.5, 30.0, 8.0],
                             "fvu": [0.25, 0.2, 0.4], "ce_loss_recovered": [0.9, 0.95, 0.8]}), sweep / "sweep.parquet")
    bare = make_run(root / "bare", model_dir, seed=3, analysed=False)
    half = root / "half"
    half.mkdir()
    (half / "config.json").write_text('{"variant": "relu", "d_in": 3')
    return {"a": a, "b": b, "bare": bare, "half": half, "missing": root / "nowhere", "model": model_dir,
            "sweep": sweep}


def app(monkeypatch, *paths, timeout=60, **query):
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("SAE_DASHBOARD_RUNS", os.pathsep.join(str(p) for p in paths))
    at = AppTest.from_file(APP, default_timeout=timeout)
    for key, value in query.items():
        at.query_params[key] = str(value)
    return at.run()


def no_exception(at):
    assert not at.exception, [e.value for e in at.exception]


def html_of(at) -> str:
    return "".join(h.proto.body for h in at.get("html"))


def charts(at) -> int:
    return len(at.get("vega_lite_chart"))


def loaded(runs):
    from dashboard import live
    return live.cached_model(str(runs["model"])), live.cached_sae(str(runs["a"]))


# ---- pages ------------------------------------------------------------------------------------
def test_runs_page_shows_identity_figures_curves_and_frontier(monkeypatch, runs):
    at = app(monkeypatch, runs["a"], runs["b"])
    no_exception(at)
    assert at.title[0].value == "Runs"
    values = {m.label: m.value for m in at.metric}
    assert values["fvu"] == "0.25" and values["l0"] == "12.5" and values["ce_loss_recovered"] == "0.9"
    identity = at.dataframe[0].value
    assert identity["variant"][0] == "relu" and identity["layer"][0] == str(LAYER) and identity["width"][0] == str(D_SAE)
    assert charts(at) >= 2 * 4 + 1    # four curves per run, plus the sweep frontier
    assert any("frontier" in s.value for s in at.subheader)
    assert not at.error


def test_pareto_frontier_matches_brute_force():
    from dashboard.views.runs_page import pareto
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"l0": rng.uniform(1, 100, 200), "fvu": rng.uniform(0, 1, 200)})
    brute = [i for i in frame.index
             if not ((frame.l0 <= frame.l0[i]) & (frame.fvu <= frame.fvu[i]) &
                     ((frame.l0 < frame.l0[i]) | (frame.fvu < frame.fvu[i]))).any()]
    assert sorted(pareto(frame).index) == sorted(brute)


def test_feature_page_from_query_parameter(monkeypatch, runs):
    at = app(monkeypatch, runs["a"], feature=5)
    no_exception(at)
    assert at.title[0].value == "Feature 5"
    top = pq.read_table(runs["a"] / "analysis" / "top_examples.parquet").to_pandas()
    mine = top[top.feature == 5].sort_values("rank")
    body = html_of(at)
    assert body.count('class="ctx sae-ex"') >= len(mine)            # every top example is shown
    first = mine.iloc[0]
    center = first.tokens[first.center].replace("\n", "↵")
    # the ranked token is outlined and carries its activation on hover
    assert f'class="tok center"' in body and f'title="{float(first.acts[first.center]):.3g}"' in body
    assert center.strip() == "" or center.strip() in body
    assert charts(at) >= 2                                          # histogram and label bars
    assert 'href="?feature=' in body                                 # nearest features are links
    features = pq.read_table(runs["a"] / "analysis" / "features.parquet").to_pandas()
    nearest = list(features.loc[features.feature == 5, "nearest"].iloc[0])
    assert f'href="?feature={nearest[0]}"' in body
    label = [m for m in at.metric if m.label == "best label (F1)"]
    assert label and label[0].delta in (None, "")                    # a value, not a change arrow
    # logit chips: each value printed beside its token (no hover needed), spaces visible
    logits = pq.read_table(runs["a"] / "analysis" / "logit_effects.parquet").to_pandas()
    row = logits[logits.feature == 5].iloc[0]
    assert f'<span class="sae-chip-val">{float(row.promoted_values[0]):+.3g}</span>' in body


def test_feature_number_box_updates_the_url(monkeypatch, runs):
    at = app(monkeypatch, runs["a"], feature=2)
    at.number_input(key="feature_input").set_value(7).run()
    no_exception(at)
    assert at.title[0].value == "Feature 7" and at.query_params["feature"] in ("7", ["7"])
    at.button(key="feature_next").click().run()
    assert at.title[0].value == "Feature 8"


def test_injection_strings_render_as_text(monkeypatch, runs):
    at = app(monkeypatch, runs["a"], feature=0)
    no_exception(at)
    body = html_of(at)
    for payload in INJECTIONS:
        assert payload not in body
        assert payload.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;") in body
    assert "<script" not in body and "<img" not in body and "<svg" not in body    # no live markup at all


def test_escape_and_shade_direct():
    from dashboard.render import shade_tokens
    html = shade_tokens(["<b>", ' "x"', "&"], [1.0, 0.5, 0.0], titles=['<i>', "a", "b"])
    assert "<b>" not in html and "&lt;b&gt;" in html and "&quot;x&quot;" in html and "&amp;" in html
    assert 'title="&lt;i&gt;"' in html
    from dashboard.render import md
    assert md("[x](javascript:alert(1)) **b** <i>") == r"\[x\]\(javascript\:alert\(1\)\) \*\*b\*\* \<i\>"


def test_feature_list_filters_and_links(monkeypatch, runs):
    at = app(monkeypatch, runs["a"], page="features")
    no_exception(at)
    table = at.dataframe[0].value
    assert len(table) == D_SAE and table["open"][0].startswith("?feature=")
    assert not any(str(v).startswith("[") for v in table["top_tokens"])      # text, not a JSON string
    assert charts(at) >= 1
    features = pq.read_table(runs["a"] / "analysis" / "features.parquet").to_pandas()
    word = features.auto_label[3]
    at.text_input(key="list_filter").input(word).run()
    expected = features[features.top_tokens.str.contains(word, case=False, regex=False)    # best_label: never
                        | features.auto_label.str.contains(word, case=False, regex=False)]
    assert sorted(at.dataframe[0].value["feature"]) == sorted(expected.feature)
    at.text_input(key="list_filter").input("").run()
    at.checkbox(key="list_dead").check().run()
    assert len(at.dataframe[0].value) == int((features.density > 0).sum())


def test_probe_page_matches_the_models_own_hidden_states(monkeypatch, runs):
    at = app(monkeypatch, runs["a"], page="probe")
    no_exception(at)
    text = "the market <img src=x onerror=alert(1)> rose"
    at.text_area(key="probe_input").input(text)
    at.button[0].click().run()
    no_exception(at)
    body = html_of(at)
    assert "<img" not in body and "&lt;" in body and "onerror" in body   # the typed tag shows as text
    shown = at.dataframe[0].value
    model, sae_model = loaded(runs)
    ids = torch.tensor([[model.bos_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0]  # resid_post
        codes = sae_model.encode(hidden)[1:]                                    # BOS left out
    best = codes.max(dim=0).values
    top = best.topk(5).indices.tolist()
    assert shown["feature"][:5].tolist() == top
    np.testing.assert_allclose(shown["max"][:5], best[top].numpy(), rtol=1e-4)


def test_loss_effect_matches_own_hook(runs):
    from dashboard import live
    model, sae_model = loaded(runs)
    context = [model.bos_id] + model.tokenizer("the market shares rose", add_special_tokens=False)["input_ids"]
    feature = int(torch.argmax(sae_model.encode(
        model.model(input_ids=torch.tensor([context]), output_hidden_states=True).hidden_states[LAYER + 1][0])[1:].sum(0)))
    effect = live.loss_effect(model, sae_model, SITE, LAYER, feature, [context])[0]
    ids = torch.tensor([context])
    direction = sae_model.W_dec[feature] / sae_model.input_scale

    def hook(module, args, output):        # resid_post of layer 1 = the decoder layer's output
        hidden = output[0] if isinstance(output, tuple) else output
        codes = sae_model.encode(hidden[0])[:, feature]
        codes[0] = 0.0                       # BOS keeps its activation
        new = hidden - codes[None, :, None] * direction
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    with torch.no_grad():
        clean = torch.nn.functional.cross_entropy(model.model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
        handle = model.model.model.layers[LAYER].register_forward_hook(hook)
        try:
            ablated = torch.nn.functional.cross_entropy(model.model(input_ids=ids).logits[0, :-1], ids[0, 1:],
                                                        reduction="none")
        finally:
            handle.remove()
    assert np.isnan(effect[0])
    np.testing.assert_allclose(effect[1:], (ablated - clean).numpy(), atol=1e-5)
    assert np.abs(effect[1:]).max() > 0


def test_loss_effect_button_on_feature_page(monkeypatch, runs):
    at = app(monkeypatch, runs["a"], feature=4)
    assert "loss change" not in html_of(at)
    at.button(key="loss_button_4").click().run()
    no_exception(at)
    assert "loss change" in html_of(at) and not at.warning
    at.button(key="loss_hide_4").click().run()
    assert "loss change" not in html_of(at)


def test_steering_at_strength_zero_reproduces_plain_generation(runs):
    from dashboard import live
    model, sae_model = loaded(runs)
    for temperature in (1.0, 0.0):
        plain = live.generate(model, "the market", seed=3, max_new_tokens=12, temperature=temperature)
        zero = live.generate(model, "the market", seed=3, max_new_tokens=12, temperature=temperature,
                             steer=live.steer_fn(sae_model, 5, "add", 0.0), site=SITE, layer=LAYER)
        assert zero == plain
    strong = live.generate(model, "the market", seed=3, max_new_tokens=12, temperature=0.0,
                           steer=live.steer_fn(sae_model, 5, "add", 200.0), site=SITE, layer=LAYER)
    assert strong != plain                     # the hook does act


def test_clamp_sets_the_feature_to_the_value(runs):
    from dashboard import live
    _, sae_model = loaded(runs)
    x = torch.randn(2, 7, D_IN)
    clamped = live.steer_fn(sae_model, 9, "clamp", 3.0)(x)
    expected = x + (3.0 - sae_model.encode(x.reshape(-1, D_IN))[:, 9]).reshape(2, 7, 1) * sae_model.W_dec[9]
    torch.testing.assert_close(clamped, expected.detach(), atol=1e-5, rtol=1e-5)


def test_steer_page_shows_both_generations(monkeypatch, runs):
    at = app(monkeypatch, runs["a"], page="steer", feature=6)
    no_exception(at)
    assert at.number_input(key="steer_feature").value == 6
    at.number_input(key="steer_value").set_value(0.0)
    at.number_input(key="steer_temp").set_value(1.0)
    at.button[0].click().run()
    no_exception(at)
    texts = [t.value for t in at.text]
    assert len(texts) == 2 and texts[0] == texts[1]          # strength 0: identical to the plain text
    at.number_input(key="steer_value").set_value(300.0)
    at.number_input(key="steer_temp").set_value(0.0)
    at.button[0].click().run()
    texts = [t.value for t in at.text]
    assert texts[0] != texts[1]


def test_compare_finds_closest_decoder_directions(monkeypatch, runs):
    at = app(monkeypatch, runs["a"], runs["b"], page="compare", feature=11)
    no_exception(at)
    table = at.dataframe[-1].value
    import sae
    A, B = sae.load(runs["a"]).W_dec.detach(), sae.load(runs["b"]).W_dec.detach()
    cos = torch.nn.functional.normalize(B, dim=1) @ torch.nn.functional.normalize(A[11], dim=0)
    assert table["feature"].tolist() == cos.topk(10).indices.tolist()
    np.testing.assert_allclose(table["cosine"], cos.topk(10).values.numpy(), atol=1e-5)
    assert table["open"][0] == f"?feature={table['feature'][0]}&run=1"
    summary = at.table[0].value                                      # figures formatted, not raw floats
    assert all(len(str(v)) <= 9 for v in summary.to_numpy().ravel() if str(v)[:1].isdigit())
    assert html_of(at).count('class="ctx sae-ex"') >= 2        # A's examples beside its match's in B


def test_compare_with_one_run_explains(monkeypatch, runs):
    at = app(monkeypatch, runs["a"], page="compare")
    no_exception(at)
    assert "two runs" in at.info[0].value


def test_folder_of_runs_expands(monkeypatch, runs):
    at = app(monkeypatch, runs["sweep"])
    no_exception(at)
    assert [s.value for s in at.subheader][:2] == ["0: sweep/a", "1: sweep/b"]


@pytest.mark.parametrize("which,page,needle", [
    ("missing", "feature", "does not exist"),
    ("half", "features", "not valid JSON"),
    ("bare", "feature", "sae analyze"),
    ("bare", "features", "sae analyze"),
    ("half", "runs", "not valid JSON"),
])
def test_broken_runs_give_a_message_not_a_traceback(monkeypatch, runs, which, page, needle):
    at = app(monkeypatch, runs[which], page=page)
    no_exception(at)
    assert any(needle in e.value for e in at.error), [e.value for e in at.error]


def test_half_written_table_gives_a_message(monkeypatch, runs, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    path = run / "analysis" / "top_examples.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    at = app(monkeypatch, run, feature=1)
    no_exception(at)
    assert any("cannot be read" in e.value for e in at.error)


def test_no_run_given(monkeypatch):
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("SAE_DASHBOARD_RUNS", "")
    monkeypatch.setattr(sys, "argv", ["app.py"])
    at = AppTest.from_file(APP).run()
    assert "No run given" in at.error[0].value


def test_pages_read_what_sae_analyze_writes(monkeypatch, tmp_path):
    """The real producer (sae.analyze) and this consumer agree on RUN/analysis/'s schema."""
    from sae import variants
    from sae.analyze.pipeline import AnalyzeOptions, analyze
    from sae.runs import save_run
    from sae.store import ActivationStore, shard_name, write_shard
    from sae.files import write_json
    gen = torch.Generator().manual_seed(0)
    windows, context = 6, 12
    window_tokens = torch.randint(3, 40, (windows, context), generator=gen, dtype=torch.int32)
    window_index = torch.arange(windows).repeat_interleave(context - 1)            # BOS position dropped
    position = torch.arange(1, context, dtype=torch.int32).repeat(windows)
    n = len(window_index)
    doc_id = window_index // 2
    (tmp_path / "store").mkdir()
    write_shard(tmp_path / "store" / shard_name(0), {
        "activations.0": torch.randn(n, 8, generator=gen), "token_ids": window_tokens[window_index, position.long()],
        "window_tokens": window_tokens, "window_index": window_index, "position": position,
        "doc_id": doc_id, "label": doc_id % 2})
    write_json(tmp_path / "store" / "manifest.json", {
        "model": None, "layers": [0], "site": "resid_post", "d_model": 8, "n_tokens": n, "context_size": context,
        "dataset": "test", "dtype": "float32", "shards": [shard_name(0)], "shard_rows": [n],
        "label_names": ["a", "b"], "held_out": {"rule": "x", "modulus": 20}})
    torch.manual_seed(0)
    save_run(variants.create("relu", d_in=8, d_sae=24), tmp_path / "run", {"layer": 0, "site": "resid_post"})
    analyze(tmp_path / "run", ActivationStore(tmp_path / "store"), options=AnalyzeOptions(with_model=False), log=None)
    top = pq.read_table(tmp_path / "run" / "analysis" / "top_examples.parquet").to_pandas()
    feature = int(top.feature.iloc[0])
    at = app(monkeypatch, tmp_path / "run", feature=feature)
    no_exception(at)
    assert not at.error and at.title[0].value == f"Feature {feature}"
    assert html_of(at).count('class="ctx sae-ex"') >= int((top.feature == feature).sum())
    at = app(monkeypatch, tmp_path / "run", page="features")
    no_exception(at)
    assert not at.error and len(at.dataframe[0].value) == 24


# ---- the command -------------------------------------------------------------------------------
def test_command_flags_and_errors(runs):
    import socket
    from sae.commands.dashboard import check_port, streamlit_command
    from sae.errors import UserError
    argv = streamlit_command([runs["a"]], 8765, "localhost")
    assert "--server.address=localhost" in argv and "--server.headless=true" in argv
    assert "--browser.gatherUsageStats=false" in argv and argv[-1] == str(runs["a"].resolve())
    with socket.socket() as busy:
        busy.bind(("localhost", 0))
        busy.listen()
        with pytest.raises(UserError, match="cannot serve"):
            check_port("localhost", busy.getsockname()[1])
    result = subprocess.run([sys.executable, "-m", "sae", "dashboard", str(runs["missing"]), "--port", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_project_streamlit_config_is_local_and_quiet():
    import tomllib
    config = tomllib.loads((Path(APP).parents[1] / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost" and config["server"]["headless"] is True
    assert config["browser"]["gatherUsageStats"] is False
