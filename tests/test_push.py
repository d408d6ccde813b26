"""Publishing: `sae push RUN REPO` through the real huggingface_hub client against a real local HTTP server
that speaks the Hub's upload protocol (create repo, preupload, commit), and `sae export --format neuronpedia`
checked field by field against Neuronpedia's upload schema (SAEDashboard's NeuronpediaDashboardBatch/
Feature/Activation .to_dict() keys) and against the analysis tables it comes from."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sae.analyze.tables as tables
from sae.analyze.pipeline import AnalyzeOptions, analyze
from sae.cli import main
from sae.store import from_tensors
from test_analyze import make_run, make_window_store
from tiny_variants import synthetic


class LocalHub:
    """Just enough of the Hub's HTTP API for huggingface_hub's upload_folder: files arrive inline (base64)
    in the commit's NDJSON because every preupload answer says "regular"."""

    def __init__(self):
        self.calls, self.repos, self.files, self.card_yaml = [], [], {}, None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.calls.append(("GET", self.path))
                self.reply(404, {"error": "not here"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.calls.append(("POST", self.path, self.headers.get("authorization")))
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    hub.repos.append(request)
                    return self.reply(200, {"url": f"{hub.url}/{request['organization']}/{request['name']}"})
                if self.path == "/api/validate-yaml":
                    hub.card_yaml = json.loads(body)
                    return self.reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in json.loads(body)["files"]]})
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}",
                                            "commitOid": "a" * 40, "pullRequestUrl": None})
                self.reply(404, {"error": "not here"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def cli(*argv):
    import contextlib
    import io
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([str(a) for a in argv])
    return done.value.code, err.getvalue(), out.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    store = from_tensors(root / "store", synthetic(n=3000, d_in=16), layer=2, model="synthetic", site="resid_post")
    status, err, _ = cli("train", "--activations", store.path, "--variant", "topk", "--k", "4", "--d-sae", "32",
                         "--tokens", "1024", "--batch-size", "128", "--checkpoint-every", "4", "--eval-rows", "256",
                         "--device", "cpu", "--out", root / "run")
    assert status == 0, err
    status, err, _ = cli("eval", "--run", root / "run", "--activations", store.path, "--device", "cpu")
    assert status == 0, err
    return root / "run"


def test_push_uploads_the_run_and_its_card(trained, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)   # conftest keeps the tests offline;
    hub = LocalHub()                                                            # this server is on 127.0.0.1
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_tests")
    status, err, out = cli("push", trained, "me/tiny-topk", "--endpoint", hub.url)
    assert status == 0, err
    assert f"pushed {trained} to {hub.url}/me/tiny-topk" in out
    assert [(r["organization"], r["name"]) for r in hub.repos] == [("me", "tiny-topk")]
    assert all(call[2] == "Bearer hf_secret_for_tests" for call in hub.calls if call[0] == "POST")
    # every file of the run folder, byte for byte, and nothing of checkpoints/
    local = {str(p.relative_to(trained)): p.read_bytes() for p in trained.rglob("*")
             if p.is_file() and not p.relative_to(trained).parts[0] == "checkpoints"}
    assert (trained / "checkpoints").is_dir()
    assert {k: v for k, v in hub.files.items() if not k.startswith("saelens/")} == local
    assert {"saelens/cfg.json", "saelens/sae_weights.safetensors"} <= set(hub.files)
    card = hub.files["README.md"].decode()
    evaluation = json.loads((trained / "eval.json").read_text())
    config = json.loads((trained / "config.json").read_text())
    assert card.startswith("---\nlibrary_name: sae\n") and "# me/tiny-topk" in card
    assert f"`topk` sparse autoencoder with {config['d_sae']} latents" in card and "knobs:" in card and "k=4" in card
    assert f"| FVU (fraction of variance unexplained) | {evaluation['fvu']:.4g} |" in card
    assert f"| L0 (mean active latents per token) | {evaluation['l0']:.4g} |" in card
    assert "Figures from eval.json" in card
    assert 'sae.load(folder)' in card and 'SAE.load_from_disk(folder + "/saelens")' in card
    assert "activation store `store`" in card and "1,024 tokens" in card


def test_push_of_a_multi_layer_run(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    x = synthetic(n=2000, d_in=16)
    for layer in (3, 5):       # a live run's layout: RUN/layer_L/ each
        store = from_tensors(tmp_path / f"store{layer}", x, layer=layer, model="synthetic", site="resid_post")
        status, err, _ = cli("train", "--activations", store.path, "--variant", "relu", "--d-sae", "24", "--tokens",
                             "512", "--batch-size", "128", "--checkpoint-every", "2", "--eval-rows", "0",
                             "--device", "cpu", "--out", tmp_path / "multi" / f"layer_{layer}")
        assert status == 0, err
    hub = LocalHub()
    from sae.push import push
    push(tmp_path / "multi", "me/multi", token="hf_x", endpoint=hub.url)
    assert not [name for name in hub.files if "checkpoints" in name]
    assert {f"layer_{n}/{f}" for n in (3, 5) for f in ("config.json", "sae.safetensors")} <= set(hub.files)
    assert {"saelens/blocks.3.hook_resid_post/cfg.json", "saelens/blocks.5.hook_resid_post/cfg.json"} <= set(hub.files)
    card = hub.files["README.md"].decode()
    assert "## relu SAE, layer 3 (`layer_3/`)" in card and "## relu SAE, layer 5 (`layer_5/`)" in card
    assert 'sae.load(folder + "/layer_3")' in card and '"/saelens/blocks.3.hook_resid_post"' in card


def test_push_without_credentials_is_one_line(trained, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    hub = LocalHub()
    status, err, _ = cli("push", trained, "me/x", "--endpoint", hub.url)
    assert status == 2 and err.strip() == ("error: no Hugging Face credentials: run `hf auth login` or set HF_TOKEN "
                                           "(a write token)")
    assert hub.calls == []
    status, err, _ = cli("push", trained, "not-a-repo-id")
    assert status == 2 and "is not a Hub repo id: give OWNER/NAME" in err


# ---- Neuronpedia -----------------------------------------------------------------------------------
# NeuronpediaDashboardFeature.to_dict() / NeuronpediaDashboardActivation.to_dict() in SAEDashboard
# (sae_dashboard/neuronpedia/neuronpedia_dashboard.py), the batches Neuronpedia's uploader reads
FEATURE_SCHEMA = {"feature_index": int, "neuron_alignment_indices": list, "neuron_alignment_values": list,
                  "neuron_alignment_l1": list, "correlated_neurons_indices": list, "correlated_neurons_l1": list,
                  "correlated_neurons_pearson": list, "correlated_features_indices": list,
                  "correlated_features_l1": list, "correlated_features_pearson": list, "neg_str": list,
                  "neg_values": list, "pos_str": list, "pos_values": list, "frac_nonzero": float,
                  "freq_hist_data_bar_values": list, "freq_hist_data_bar_heights": list,
                  "logits_hist_data_bar_heights": list, "logits_hist_data_bar_values": list, "n_prompts_total": int,
                  "n_tokens_in_prompt": int, "dataset": str, "decoder_weights_dist": list, "activations": list}
ACTIVATION_SCHEMA = {"bin_min": (int, float), "bin_max": (int, float), "bin_contains": (int, float),
                     "tokens": list, "values": list}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("np")
    make_window_store(root / "store", n_shards=1, windows_per_shard=10)
    make_run(root / "run", d_sae=12, bias=-0.8)
    patch = pytest.MonkeyPatch()
    patch.setattr(tables, "token_strings", lambda tokenizer, ids: {int(i): f"tok{int(i)}" for i in ids})
    try:
        analyze(root / "run", root / "store", options=AnalyzeOptions(n_top=4, context_radius=3, with_model=False),
                log=None)
    finally:
        patch.undo()
    analysis = root / "run" / "analysis"
    # planted inputs for the parts that need a model / an explainer: a logit table and explanations
    pq.write_table(pa.table({"feature": [1, 2], "promoted": [["a", "b"], ["c"]], "promoted_values": [[2.5, 1.25], [0.5]],
                             "promoted_ids": [[5, 6], [7]], "suppressed": [["z"], ["y", "x"]],
                             "suppressed_values": [[-1.5], [-0.25, -0.125]], "suppressed_ids": [[9], [8, 7]]}),
                   analysis / "logit_effects.parquet")
    pq.write_table(pa.table({"feature": [1], "explanation": ["the letter <b>"], "explainer": ["smollm2"],
                             "detection": [0.75], "detection_control": [0.5], "fuzzing": [0.625],
                             "fuzzing_control": [0.5], "embedding": [0.875], "embedding_control": [0.5]}),
                   analysis / "explanations.parquet")
    return root


def test_neuronpedia_export_follows_the_upload_schema(analysed):
    root = analysed
    status, err, out = cli("export", root / "run", "--format", "neuronpedia", root / "np")
    assert status == 0, err
    features = pd.read_parquet(root / "run" / "analysis" / "features.parquet")
    tops = pd.read_parquet(root / "run" / "analysis" / "top_examples.parquet")
    batch = json.loads((root / "np" / "batch-0.json").read_text())
    assert set(batch) == {"model_id", "layer", "sae_set", "features"}
    assert isinstance(batch["layer"], int) and batch["model_id"] and batch["sae_set"]
    alive = features[features.n_fired > 0]
    assert sorted(f["feature_index"] for f in batch["features"]) == sorted(alive.feature.tolist())
    skipped = json.loads((root / "np" / "skipped_indexes.json").read_text())
    assert sorted(skipped["skipped_indexes"]) == sorted(features[features.n_fired == 0].feature.tolist())
    for record in batch["features"]:
        assert list(record) == list(FEATURE_SCHEMA)
        for key, kind in FEATURE_SCHEMA.items():
            assert isinstance(record[key], kind), key
        row = features[features.feature == record["feature_index"]].iloc[0]
        assert record["frac_nonzero"] == pytest.approx(round(float(row.density), 3))
        mine = tops[tops.feature == record["feature_index"]].sort_values("rank")
        top_acts = [a for a in record["activations"] if a["bin_min"] == -1]
        assert len(top_acts) == len(mine)
        for activation, (_, example) in zip(top_acts, mine.iterrows()):
            assert set(activation) == set(ACTIVATION_SCHEMA)
            assert activation["tokens"] == list(example.tokens)
            assert activation["values"] == pytest.approx([round(float(v), 3) for v in example.acts], abs=1e-9)
            assert activation["bin_max"] == pytest.approx(round(float(row.max_activation), 3))
        assert all(isinstance(a[k], kinds) for a in record["activations"] for k, kinds in ACTIVATION_SCHEMA.items())
        assert len(record["freq_hist_data_bar_values"]) == len(record["freq_hist_data_bar_heights"]) > 0
    by_index = {f["feature_index"]: f for f in batch["features"]}
    if 1 in by_index:
        assert by_index[1]["pos_str"] == ["a", "b"] and by_index[1]["pos_values"] == [2.5, 1.25]
        assert by_index[1]["neg_str"] == ["z"] and by_index[1]["neg_values"] == [-1.5]
    explanations = json.loads((root / "np" / "explanations.json").read_text())
    assert explanations == [{"modelId": batch["model_id"], "layer": f"{batch['layer']}-{batch['sae_set']}",
                             "index": "1", "description": "the letter <b>", "explanationModelName": "smollm2",
                             "typeName": "sae-explain",
                             "scores": {"detection": 0.75, "fuzzing": 0.625, "embedding": 0.875,
                                        "detection_control": 0.5, "fuzzing_control": 0.5, "embedding_control": 0.5}}]
    assert "nan" not in (root / "np" / "batch-0.json").read_text().lower()
    status, err, _ = cli("export", root / "run", "--format", "neuronpedia", root / "np")
    assert status == 2 and "--force" in err


def test_neuronpedia_export_needs_an_analysis(trained, tmp_path):
    status, err, _ = cli("export", trained, "--format", "neuronpedia", tmp_path / "np")
    assert status == 2 and "sae analyze" in err and len(err.strip().splitlines()) == 1
    assert not Path(tmp_path / "np").exists()
