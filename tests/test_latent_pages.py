"""Search, map and latent-space tools on the planted world of test_explain (three latents that fire exactly
on three groups of trigger words): token and contrast search find the planted feature, code-space retrieval
matches brute force, interpolation at t = 0 matches sae.splice, documents of another kind are found by
reconstruction error, and every new page renders."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from test_explain import GROUPS, TRUE, build_world, documents, write_world_store, word_tokenizer

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def test_token_search_ranks_the_planted_feature_first(world):
    from dashboard.latent_data import search_token
    tokens = pq.read_table(world / "run" / "analysis" / "token_features.parquet").to_pandas()
    for g, words in enumerate(GROUPS.values()):
        for word in words[:3]:
            found = search_token(tokens, f"  {word.upper()} ")
            assert int(found["feature"].iloc[0]) == g, (word, found.head())
    from sae.store import ActivationStore
    dog = word_tokenizer(world / "tok2").convert_tokens_to_ids("Ġdog")
    stored = int((ActivationStore(world / "store").column("token_ids") == dog).sum())
    assert int(tokens.set_index("token_id").at[dog, "count"]) == stored > 0


def test_contrast_search_finds_the_planted_feature(world):
    """Codes of documents with an animal word (set A) against documents without one (set B)."""
    from dashboard.latent_data import contrast
    from sae.runs import load
    from sae.store import ActivationStore
    store, sae_model = ActivationStore(world / "store"), load(world / "run")
    x = store.read_shard(0, "activations.0").float()
    window = store.column("window_index")
    with torch.no_grad():
        codes = sae_model.encode(x).numpy()                                         # [n, d_sae]
    docs = documents()
    animals = set(GROUPS["animals"])
    with_a = [i for i, d in enumerate(docs) if animals & set(d)][:20]
    without = [i for i, d in enumerate(docs) if not animals & set(d)][:20]
    result = contrast([codes[(window == i).numpy()] for i in with_a], [codes[(window == i).numpy()] for i in without])
    assert int(result["feature"].iloc[0]) == 0
    assert result["fires_in_A"].iloc[0] == 1.0 and result["fires_in_B"].iloc[0] == 0.0


def test_similar_windows_match_brute_force(world):
    from dashboard.latent_data import build_window_index, similar_windows
    from sae.runs import load
    from sae.store import ActivationStore
    index = build_window_index(pq.read_table(world / "run" / "analysis" / "window_codes.parquet"))
    store, sae_model = ActivationStore(world / "store"), load(world / "run")
    with torch.no_grad():
        codes = sae_model.encode(store.read_shard(0, "activations.0").float())
    window = store.column("window_index").long()
    means = torch.zeros(int(window.max()) + 1, codes.shape[1]).index_add_(0, window, codes)
    means = means / torch.bincount(window)[:, None]
    idf = torch.log((len(means) + 1) / ((means > 0).sum(0) + 1))      # d_sae = 8 < 256 kept: every latent is kept
    unit = torch.nn.functional.normalize(means * idf, dim=1)
    for row in (0, 5, 17):
        w = int(index.keys["window_index"].iloc[row])
        brute = (unit @ unit[w]).numpy()
        brute[w] = -np.inf
        found = similar_windows(index, row, 5)
        assert np.allclose(found["cosine"].to_numpy(), np.sort(brute)[::-1][:5], atol=1e-5)


def test_text_search_ranks_the_matching_explanation_first():
    import pandas as pd
    from dashboard.latent_data import build_text_index, search_text
    frame = pd.DataFrame({"feature": [4, 9, 2], "explanation": list(TRUE.values())})
    assert int(search_text(build_text_index(frame), "banana fruit")["feature"].iloc[0]) == 2
    assert int(search_text(build_text_index(frame), "colours")["feature"].iloc[0]) == 9


def test_interpolation_at_t0_is_the_spliced_model(tiny_lm):
    import sae
    from dashboard.latent_data import interpolate
    from sae import variants
    loaded = tiny_lm("llama")
    torch.manual_seed(0)
    sae_model = variants.create("relu", d_in=32, d_sae=64).eval()
    ids_a, ids_b = [1, 10, 20, 30, 40], [1, 50, 60, 70]
    frame = interpolate(loaded, sae_model, "resid_post", 1, ids_a, ids_b, [0.0, 1.0], k=3)
    with torch.no_grad(), sae.splice(loaded.model, sae_model, site="resid_post", layer=1):
        expected = loaded.model(input_ids=torch.tensor([ids_a])).logits[0, -1].softmax(-1)
    at0 = frame[frame["t"] == 0.0].sort_values("rank")
    assert np.allclose(at0["probability"].to_numpy(), expected.topk(3).values.numpy(), atol=1e-5)
    assert not np.allclose(frame[frame["t"] == 1.0]["probability"].to_numpy(), at0["probability"].to_numpy())


def test_documents_of_another_kind_are_found_by_reconstruction_error(tmp_path):
    """A topk SAE trained on news-like documents only; a store of news plus 10% code-like documents (their
    words have directions the news words lack) is analysed: the anomaly ranking finds the code (ROC-AUC)."""
    from sklearn.metrics import roc_auc_score
    from sae.analyze.pipeline import AnalyzeOptions, analyze
    from sae.train.options import TrainOptions
    from sae.train.trainer import train_on_store
    tokenizer = word_tokenizer(tmp_path / "tok")
    vectors = torch.randn(len(tokenizer), 16, generator=torch.Generator().manual_seed(2))
    code_ids = tokenizer.convert_tokens_to_ids(["Ġ" + w for w in ["print", "def", "return", "x", "=", "(", ")"]])
    news_ids = [i for i in range(len(tokenizer)) if i not in code_ids]
    vectors[news_ids, 10:] = 0                        # news words live in the first ten dimensions
    train_store, _ = write_world_store(tmp_path / "train", tokenizer, documents(300, seed=1), token_vectors=vectors)
    train_on_store(train_store, "topk", tmp_path / "run", TrainOptions(tokens=30_000, batch_size=256, device="cpu",
                                                                        eval_rows=0, log_every=50),
                   knobs={"k": 4}, d_sae=32, progress=False)
    news, code = documents(180, seed=2), documents(20, seed=3, kind="code")
    store, _ = write_world_store(tmp_path / "mixed", tokenizer, news + code, token_vectors=vectors)
    analyze(tmp_path / "run", store, options=AnalyzeOptions(with_model=False), log=None)
    table = pq.read_table(tmp_path / "run" / "analysis" / "anomalies.parquet").to_pandas()
    is_code = (table["doc_id"] >= len(news)).to_numpy()
    auc = roc_auc_score(is_code, table["error"].to_numpy())
    print("anomaly ROC-AUC", auc)
    assert auc >= 0.9, auc
    # the error is the window's mean ‖x − x̂‖² over the store's mean ‖x‖², by a direct computation
    from sae.runs import load
    model = load(tmp_path / "run")
    x = store.read_shard(0, "activations.0").float()
    with torch.no_grad():
        err = ((x - model.decode(model.encode(x))) ** 2).sum(1)
    window = store.column("window_index").long()
    worst = int(table["window_index"].iloc[0])
    expected = float(err[window == worst].mean() / (x ** 2).sum(1).mean())
    assert table["error"].iloc[0] == pytest.approx(expected, rel=1e-4)


# ---- the pages render ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explained(world):
    from sae.explain.writer import ExplanationWriter
    writer = ExplanationWriter(world / "run" / "analysis" / "explanations.parquet", "hand", force=True)
    writer.add([{"feature": f, "explanation": text, "explainer": "hand", "detection": 0.9, "fuzzing": 0.8,
                 "embedding": 0.95, "detection_control": 0.5, "fuzzing_control": 0.5, "embedding_control": 0.4,
                 "explain_contexts": [], "score_contexts": [], "control_contexts": []} for f, text in TRUE.items()])
    return world


@pytest.mark.parametrize("page,widgets", [("search", {"search_mode": "Explanation text", "search_text": "fruit"}),
                                          ("search", {"search_mode": "Token", "search_token": "dog"}),
                                          ("map", {}), ("anomalies", {}), ("similar", {}), ("interpolate", {}),
                                          ("feature", {})])
def test_new_pages_render(explained, page, widgets):
    from streamlit.testing.v1 import AppTest
    os.environ["SAE_DASHBOARD_RUNS"] = str(explained / "run")
    try:
        at = AppTest.from_file(APP, default_timeout=60)
        at.query_params["page"] = page
        at.query_params["feature"] = "2"
        at.run()
        for key, value in widgets.items():      # one at a time: a widget may appear after the one before
            widget = next(w for w in list(at.radio) + list(at.text_input) if w.key == key)
            widget.set_value(value)
            at.run()
        assert not at.exception and not at.error, [e.value for e in at.exception] or [e.value for e in at.error]
        html = " ".join(str(h.proto) for h in at.get("html")) + " ".join(m.value for m in at.markdown)
        if page == "search" and widgets.get("search_mode") == "Token":
            assert "feature 0" in html
        if page == "search" and widgets.get("search_mode") == "Explanation text":
            assert "feature 2" in html
        if page == "feature":
            assert "fruits such as apple" in html
    finally:
        os.environ.pop("SAE_DASHBOARD_RUNS", None)
