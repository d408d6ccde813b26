"""sae analyze: the streaming pass checked against brute force over a small store (direct encode of
every row), plus the bad-input paths and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sae.analyze.pipeline import AnalyzeOptions, analyze
from sae.errors import UserError
from sae.runs import save_run
from sae.store import ActivationStore, from_tensors, shard_name, write_shard
from sae.files import write_json
from sae.analyze.topk_stream import BatchContext, TopKeeper, capture_contexts
from sae import variants

D_IN, D_SAE, CONTEXT, RADIUS = 12, 40, 16, 3
LABELS = ["business", "sport", "tech"]


def make_window_store(path, n_shards=2, windows_per_shard=18, seed=0, shuffle_rows=False):
    """A store like `collect` writes: position 0 (BOS) of each window is dropped, and in every third
    window position 5 too (as if it were a special token), so positions have gaps."""
    gen = torch.Generator().manual_seed(seed)
    shards, rows_per_shard = [], []
    doc = 0
    for s in range(n_shards):
        window_tokens = torch.randint(0, 50, (windows_per_shard, CONTEXT), generator=gen, dtype=torch.int32)
        win, pos = [], []
        for w in range(windows_per_shard):
            for p in range(1, CONTEXT):
                if w % 3 == 0 and p == 5:
                    continue
                win.append(w)
                pos.append(p)
        window_index = torch.tensor(win, dtype=torch.int64)
        position = torch.tensor(pos, dtype=torch.int32)
        n = len(win)
        doc_id = (window_index // 2 + doc).to(torch.int64)
        doc += windows_per_shard // 2
        label = doc_id % len(LABELS)
        acts = torch.randn(n, D_IN, generator=gen) + 0.8 * torch.nn.functional.one_hot(label, D_IN).float()
        order = torch.randperm(n, generator=gen) if shuffle_rows else torch.arange(n)
        tensors = {"activations.0": acts[order].to(torch.float16), "token_ids": window_tokens[window_index, position.long()][order],
                   "window_tokens": window_tokens, "window_index": window_index[order], "position": position[order],
                   "doc_id": doc_id[order], "label": label[order]}
        name = shard_name(s)
        path.mkdir(parents=True, exist_ok=True)
        write_shard(path / name, tensors)
        shards.append(name)
        rows_per_shard.append(n)
    write_json(path / "manifest.json", {
        "model": None, "layers": [0], "site": "resid_post", "d_model": D_IN, "n_tokens": sum(rows_per_shard),
        "context_size": CONTEXT, "dataset": "test", "dtype": "float16", "shards": shards,
        "shard_rows": rows_per_shard, "label_names": LABELS, "held_out": {"rule": "x", "modulus": 20}})
    return ActivationStore(path)


def make_run(path, variant="relu", d_sae=D_SAE, bias=-1.0, seed=0):
    torch.manual_seed(seed)
    model = variants.create(variant, d_in=D_IN, d_sae=d_sae)
    with torch.no_grad():
        if hasattr(model, "b_enc"):
            model.b_enc.fill_(bias)
        model.input_scale.fill_(1.3)
    save_run(model, path, {"layer": 0, "site": "resid_post"})
    return model


def brute(model, store):
    """Every row's codes and its (shard, window, position), by a direct encode."""
    x = torch.cat([store.read_shard(s, "activations.0") for s in range(len(store.shards))]).float()
    with torch.no_grad():
        codes = model.encode(x)                                                  # [n, d_sae]
    shard = torch.cat([torch.full((sh.n_rows,), i) for i, sh in enumerate(store.shards)])
    return codes, shard, store.column("window_index"), store.column("position").long()


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    store = make_window_store(root / "store")
    model = make_run(root / "run")
    options = AnalyzeOptions(n_top=6, context_radius=RADIUS, n_bands=4, per_band=3, reservoir=600,
                             batch_size=40, with_model=False, n_nearest=5)
    meta = analyze(root / "run", store, options=options, log=None)
    out = root / "run" / "analysis"
    return model, store, meta, {name: pd.read_parquet(out / f"{name}.parquet") for name in
                                ("features", "top_examples", "interval_examples", "histograms")}


def test_top_examples_exact_with_contexts(analysed):
    model, store, meta, tables = analysed
    codes, shard, window, position = brute(model, store)
    top = tables["top_examples"]
    lookup = {(int(s), int(w), int(p)): i for i, (s, w, p) in enumerate(zip(shard, window, position))}
    tokens_of = [store.read_shard(s, "window_tokens") for s in range(len(store.shards))]
    checked = 0
    for feature in range(model.d_sae):
        column = codes[:, feature]
        firing = (column > 0).nonzero().squeeze(1)
        expected = column[firing].sort(descending=True).values[:6]
        got = top[top.feature == feature].sort_values("rank")
        assert list(got["rank"]) == list(range(len(expected)))
        np.testing.assert_allclose(got.activation.to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        for _, example in got.iterrows():
            row = int(example["row"])
            assert codes[row, feature].item() == pytest.approx(example.activation, rel=1e-5, abs=1e-6)
            s, w, p = int(shard[row]), int(window[row]), int(position[row])
            assert example.shard == store.shards[s].name and example.window_index == w and example.position == p
            lo, hi = max(0, p - RADIUS), min(CONTEXT, p + RADIUS + 1)
            assert list(example.token_ids) == tokens_of[s][w, lo:hi].tolist()
            assert example.center == p - lo
            want = [codes[lookup[(s, w, q)], feature].item() if (s, w, q) in lookup else 0.0 for q in range(lo, hi)]
            np.testing.assert_allclose(example.acts, want, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked > 50


def test_feature_statistics_and_histograms(analysed):
    model, store, meta, tables = analysed
    codes, *_ = brute(model, store)
    features = tables["features"].sort_values("feature")
    firing = codes > 0
    np.testing.assert_allclose(features.density, firing.float().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(features.n_fired, firing.sum(0).numpy())
    np.testing.assert_allclose(features.max_activation, codes.amax(0).numpy(), rtol=1e-5)
    mean_firing = (codes * firing).sum(0) / firing.sum(0).clamp(min=1)
    np.testing.assert_allclose(features.mean_activation, mean_firing.numpy(), rtol=1e-4, atol=1e-6)
    edges = np.asarray(meta["hist_bin_edges"])
    for feature, counts in zip(tables["histograms"].feature, tables["histograms"].counts):
        values = codes[:, feature][firing[:, feature]].double().numpy()
        bins = np.clip(np.digitize(values, edges) - 1, 0, len(edges) - 2)
        np.testing.assert_array_equal(counts, np.bincount(bins, minlength=len(edges) - 1))
    assert meta["n_dead"] == int((~firing.any(0)).sum())


def test_interval_bands(analysed):
    from sae.analyze.bands import per_bin_for, sampling_edges
    model, store, meta, tables = analysed
    codes, *_ = brute(model, store)
    interval = tables["interval_examples"]
    for feature in range(model.d_sae):
        values = codes[:, feature]
        top = values.max().item()
        fired = values[values > 0]
        got = interval[interval.feature == feature]
        if len(fired) == 0:
            assert len(got) == 0
            continue
        # band 0 comes from the reservoir, which holds every firing token here: min(per_band, tokens);
        # a higher band holds at least what the sampling bins lying wholly inside it keep (per_bin_for
        # entries of each), whatever the order of the stream
        band_of = torch.clamp((fired / top * 4).floor().long(), 0, 3)
        edges = sampling_edges()
        bin_of = (torch.bucketize(fired.double(), edges, right=True) - 1)
        for band in range(4):
            rows = got[got.band == band]
            in_band = int((band_of == band).sum())
            assert len(rows) <= min(3, in_band)
            if band == 0:
                assert len(rows) == min(3, in_band)
            else:
                lo, hi = band * top / 4, (band + 1) * top / 4
                whole = [b for b in torch.unique(bin_of).tolist() if edges[b] >= lo and edges[b + 1] <= hi]
                guaranteed = sum(min(per_bin_for(3), int((bin_of == b).sum())) for b in whole)
                assert len(rows) >= min(3, guaranteed)
            for _, example in rows.iterrows():
                assert example.band_lo == pytest.approx(band * top / 4, rel=1e-5)
                assert example.band_hi == pytest.approx((band + 1) * top / 4, rel=1e-5)
                assert example.band_lo - 1e-6 <= example.activation <= example.band_hi + 1e-6
                assert codes[int(example.row), feature].item() == pytest.approx(example.activation, rel=1e-5)
                assert example.acts[example.center] == pytest.approx(example.activation, rel=1e-5)


def test_nearest_features_by_decoder_cosine(analysed):
    model, store, meta, tables = analysed
    W = torch.nn.functional.normalize(model.W_dec.detach(), dim=1)
    cos = W @ W.T
    cos.fill_diagonal_(-2)
    features = tables["features"].sort_values("feature")
    for feature, nearest, nearest_cos in zip(features.feature, features.nearest, features.nearest_cos):
        expected = cos[feature].topk(5)
        np.testing.assert_array_equal(nearest, expected.indices.numpy())
        np.testing.assert_allclose(nearest_cos, expected.values.numpy(), rtol=1e-5, atol=1e-6)


def test_label_means_and_best_label(analysed):
    model, store, meta, tables = analysed
    codes, *_ = brute(model, store)
    labels = store.column("label")
    edges = np.asarray(meta["hist_bin_edges"])
    features = tables["features"].sort_values("feature")
    assert meta["label_names"] == LABELS
    for feature, means, best, best_f1 in zip(features.feature, features.label_means, features.best_label,
                                             features.best_label_f1):
        values = codes[:, feature]
        want = [values[labels == c].mean().item() for c in range(3)]
        np.testing.assert_allclose(means, want, rtol=1e-4, atol=1e-6)
        # the one-feature probe "code >= threshold => label", thresholds: firing, then each bin edge
        fires = (values > 0).numpy()
        bins = np.clip(np.digitize(values.double().numpy(), edges) - 1, 0, len(edges) - 2)
        scores = np.zeros(3)
        for c in range(3):
            truth = (labels == c).numpy()
            for b in range(len(edges) - 1):
                predicted = fires & (bins >= b)
                tp = (predicted & truth).sum()
                denominator = predicted.sum() + truth.sum()
                scores[c] = max(scores[c], 2 * tp / denominator if denominator else 0.0)
        assert best_f1 == pytest.approx(scores.max(), rel=1e-6, abs=1e-9)
        assert (best == LABELS[int(scores.argmax())]) if scores.max() > 0 else best is None


def test_auto_labels_and_meta(analysed):
    model, store, meta, tables = analysed
    features = tables["features"]
    assert meta["has_contexts"] and meta["context_radius"] == RADIUS and meta["n_tokens"] == len(store)
    assert any("--no-model" in note for note in meta["notes"])
    alive = features[features.n_fired > 0]
    assert all(json.loads(t) for t in alive.top_tokens)   # tokens without a tokenizer read "[id]"
    assert all(label for label in alive.auto_label)


def test_topkeeper_merges_across_batches_like_one_topk():
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(500, 30, generator=gen)                                   # [rows, latents]
    keeper = TopKeeper(7, 30, radius=1)
    keeper.MIN_POOL = 16
    entered = 0
    for lo in range(0, 500, 16):                                                  # each batch is one window
        block = scores[lo:lo + 16]
        rows, latents = (block > 0.2).nonzero(as_tuple=True)
        n = len(block)
        batch = BatchContext(block, torch.arange(lo, lo + n), torch.full((n,), lo), torch.arange(n))
        entered += keeper.offer(latents, block[rows, latents], block[rows, latents], rows, batch)
    masked = torch.where(scores > 0.2, scores, -1.0)
    expected = masked.topk(7, dim=0)
    torch.testing.assert_close(keeper.acts, expected.values.T)
    torch.testing.assert_close(keeper.rows, expected.indices.T)
    assert entered > len(keeper.pool) >= keeper.pool_used       # the pool was compacted, not grown without end
    latents, slots = torch.meshgrid(torch.arange(30), torch.arange(7), indexing="ij")
    contexts = keeper.contexts_of(latents.reshape(-1), slots.reshape(-1))        # [30 * 7, 3]
    for (latent, slot), context in zip(zip(latents.reshape(-1).tolist(), slots.reshape(-1).tolist()), contexts):
        row = int(keeper.rows[latent, slot])
        start = row - row % 16
        want = [scores[r, latent].item() if start <= r < min(start + 16, 500) else 0.0 for r in (row - 1, row, row + 1)]
        assert context.tolist() == pytest.approx(want)


def test_capture_contexts_handles_gaps_and_window_edges():
    codes = torch.arange(20.0)[:, None].repeat(1, 2)                               # code = row index
    window = torch.tensor([0] * 8 + [1] * 12)
    position = torch.tensor([1, 2, 3, 5, 6, 7, 8, 9] + list(range(12)))
    batch = BatchContext(codes, torch.arange(20), window, position)
    got = capture_contexts(batch, torch.tensor([3, 8]), torch.tensor([1, 0]), radius=2)
    # row 3 is position 5 of window 0: positions 3..7 -> rows 2, (4 missing), 3, 4, 5
    assert got[0].tolist() == [2.0, 0.0, 3.0, 4.0, 5.0]
    # row 8 is position 0 of window 1: nothing before it, rows 8, 9, 10 after; row 7 is another window
    assert got[1].tolist() == [0.0, 0.0, 8.0, 9.0, 10.0]


def test_batches_smaller_than_a_window_and_shuffled_rows(tmp_path):
    store = make_window_store(tmp_path / "store", n_shards=1, windows_per_shard=6, shuffle_rows=True, seed=5)
    model = make_run(tmp_path / "run", bias=-0.5)
    analyze(tmp_path / "run", store, options=AnalyzeOptions(n_top=3, context_radius=2, batch_size=7,
                                                            with_model=False), log=None)
    codes, shard, window, position = brute(model, store)
    top = pd.read_parquet(tmp_path / "run" / "analysis" / "top_examples.parquet")
    lookup = {(int(w), int(p)): i for i, (w, p) in enumerate(zip(window, position))}
    for _, example in top.iterrows():
        w, p = int(example.window_index), int(example.position)
        lo = max(0, p - 2)
        want = [codes[lookup[(w, q)], example.feature].item() if (w, q) in lookup else 0.0
                for q in range(lo, min(CONTEXT, p + 3))]
        np.testing.assert_allclose(example.acts, want, rtol=1e-5, atol=1e-6)


def test_signed_codes_rank_by_magnitude(tmp_path):
    store = make_window_store(tmp_path / "store", n_shards=1, windows_per_shard=8)
    model = make_run(tmp_path / "run", variant="linear", d_sae=4)
    meta = analyze(tmp_path / "run", store, options=AnalyzeOptions(n_top=5, context_radius=2, batch_size=50,
                                                                   with_model=False), log=None)
    codes, *_ = brute(model, store)
    top = pd.read_parquet(tmp_path / "run" / "analysis" / "top_examples.parquet")
    assert meta["signed_codes"] and meta["fire_threshold"] is None
    for feature in range(4):
        expected = codes[:, feature][codes[:, feature].abs().argsort(descending=True)[:5]]
        got = top[top.feature == feature].sort_values("rank").activation.to_numpy()
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
        assert (got < 0).any() or (got > 0).all()


def test_store_without_windows_analyses_everything_but_contexts(tmp_path):
    x = torch.randn(300, D_IN)
    store = from_tensors(tmp_path / "store", x, token_ids=torch.randint(0, 30, (300,)))
    model = make_run(tmp_path / "run", bias=-0.5)
    messages = []
    meta = analyze(tmp_path / "run", store, options=AnalyzeOptions(n_top=4, batch_size=64, with_model=False),
                   log=messages.append)
    assert not meta["has_contexts"] and any("window_tokens" in m for m in messages)
    codes = model.encode(x).detach()
    top = pd.read_parquet(tmp_path / "run" / "analysis" / "top_examples.parquet")
    for feature in range(model.d_sae):
        got = top[top.feature == feature].sort_values("rank")
        firing = codes[:, feature][codes[:, feature] > 0].sort(descending=True).values[:4]
        np.testing.assert_allclose(got.activation, firing.numpy(), rtol=1e-5)
        assert all(len(a) == 1 and a[0] == pytest.approx(v, rel=1e-5) for a, v in zip(got.acts, got.activation))
    features = pd.read_parquet(tmp_path / "run" / "analysis" / "features.parquet")
    assert features.best_label.isna().all()


def test_bad_input(tmp_path):
    store = from_tensors(tmp_path / "store", torch.randn(50, D_IN + 1))
    make_run(tmp_path / "run")
    with pytest.raises(UserError, match="d_in"):
        analyze(tmp_path / "run", store, options=AnalyzeOptions(with_model=False), log=None)
    good = from_tensors(tmp_path / "store2", torch.randn(50, D_IN))
    analyze(tmp_path / "run", good, options=AnalyzeOptions(with_model=False), log=None)
    with pytest.raises(UserError, match="--force"):
        analyze(tmp_path / "run", good, options=AnalyzeOptions(with_model=False), log=None)
    analyze(tmp_path / "run", good, options=AnalyzeOptions(with_model=False), force=True, log=None)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []


def test_cli(tmp_path, capsys):
    from sae.cli import main
    make_window_store(tmp_path / "store", n_shards=1, windows_per_shard=4)
    make_run(tmp_path / "run")
    with pytest.raises(SystemExit) as done:
        main(["analyze", "--run", str(tmp_path / "run"), "--activations", str(tmp_path / "store"),
              "--no-model", "--top-k", "3", "--device", "cpu"])
    assert done.value.code == 0
    assert "analysed 40 features" in capsys.readouterr().out
    assert (tmp_path / "run" / "analysis" / "meta.json").is_file()
    with pytest.raises(SystemExit) as done:
        main(["analyze", "--run", str(tmp_path / "run"), "--activations", str(tmp_path / "store"), "--no-model"])
    assert done.value.code == 2 and "--force" in capsys.readouterr().err


def test_logit_effects_through_the_unembedding(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D_IN, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config)
    with torch.no_grad():
        hf.model.norm.weight.uniform_(0.5, 2.0)
    hf.save_pretrained(tmp_path / "model")
    tiny_tokenizer(64).save_pretrained(tmp_path / "model")
    store = make_window_store(tmp_path / "store", n_shards=1, windows_per_shard=4)
    manifest = dict(store.manifest, model=str(tmp_path / "model"))
    write_json(tmp_path / "store" / "manifest.json", manifest)
    model = make_run(tmp_path / "run", d_sae=8)
    meta = analyze(tmp_path / "run", tmp_path / "store", options=AnalyzeOptions(n_logits=5, batch_size=64), log=None)
    assert meta["logit_effects"], meta["notes"]
    top = pd.read_parquet(tmp_path / "run" / "analysis" / "top_examples.parquet")
    assert all(list(tokens) == [f"w{i}" for i in ids] for tokens, ids in zip(top.tokens, top.token_ids))
    effects = pd.read_parquet(tmp_path / "run" / "analysis" / "logit_effects.parquet").sort_values("feature")
    direction = model.W_dec.detach() / model.input_scale * hf.model.norm.weight.detach()   # RMSNorm: scale only
    logits = direction @ hf.lm_head.weight.detach().T                                      # [d_sae, vocab]
    for feature, ids, values, down in zip(effects.feature, effects.promoted_ids, effects.promoted_values,
                                          effects.suppressed_ids):
        expected = logits[feature].topk(5)
        np.testing.assert_array_equal(ids, expected.indices.numpy())
        np.testing.assert_allclose(values, expected.values.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(down, logits[feature].topk(5, largest=False).indices.numpy())
        assert list(effects.promoted[feature]) == [f"w{i}" for i in ids]


def tiny_tokenizer(vocab_size):
    """A word-level tokenizer built in memory (w0 ... w{n-1}), nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", bos_token="w1", eos_token="w2")


def test_run_with_one_sae_per_layer(tmp_path):
    store = from_tensors(tmp_path / "store", torch.randn(80, D_IN))
    make_run(tmp_path / "multi" / "layer_0")
    with pytest.raises(UserError, match="--layer"):
        analyze(tmp_path / "multi", store, options=AnalyzeOptions(with_model=False), log=None)
    analyze(tmp_path / "multi", store, layer=0, options=AnalyzeOptions(with_model=False), log=None)
    assert (tmp_path / "multi" / "layer_0" / "analysis" / "features.parquet").is_file()
