"""Synthetic tables for the Search, Map and latent-space pages (what `sae analyze` and `sae explain` write:
explanations, token_features, anomalies, window_codes, feature_map) beside dashboard_sample's run, plus a
small store for the window texts. A fixture for scripts/bench_dashboard.py and tests, not shipped.

    from latent_sample import write_latent_tables
    write_latent_tables(run_dir, n_features=16384)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("market", "shares", "goal", "match", "film", "award", "minister", "vote", "phone", "software", "the",
         "of", "and", "said", "year", "people", "league", "bank", "music", "election")


def _lists(flat, offsets, type_):
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), pa.array(flat, type=type_))


def write_latent_tables(run_dir, n_features: int, n_windows: int = 2000, context: int = 128, vocab: int = 5000,
                        n_explained: int | None = None, seed: int = 0) -> Path:
    import torch
    from sae.files import write_json
    from sae.store import shard_name, write_shard
    rng = np.random.default_rng(seed)
    run_dir = Path(run_dir)
    out = run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    n_explained = n_features if n_explained is None else n_explained
    # explanations
    words = np.asarray(WORDS)
    texts = [" ".join(words[rng.integers(0, len(words), 4)]) for _ in range(n_explained)]
    scores = {k: rng.uniform(0.3, 1.0, n_explained) for k in ("detection", "fuzzing", "embedding")}
    controls = {f"{k}_control": rng.uniform(0.3, 0.7, n_explained) for k in ("detection", "fuzzing", "embedding")}
    pq.write_table(pa.table({"feature": np.arange(n_explained, dtype=np.int64), "explanation": texts,
                             "explainer": ["synthetic"] * n_explained, **scores, **controls,
                             "control_feature": rng.integers(0, n_features, n_explained)}),
                   out / "explanations.parquet")
    # token_features: 16 features per token
    k = 16
    offsets = np.arange(vocab + 1) * k
    pq.write_table(pa.table({
        "token_id": np.arange(vocab, dtype=np.int64),
        "token": [f" {WORDS[i % len(WORDS)]}{i // len(WORDS) or ''}" for i in range(vocab)],
        "count": rng.integers(1, 10_000, vocab),
        "features": _lists(rng.integers(0, n_features, vocab * k), offsets, pa.int64()),
        "score": _lists(np.sort(rng.uniform(0, 1, (vocab, k)), axis=1)[:, ::-1].ravel().astype(np.float32), offsets,
                        pa.float32()),
        "mean_activation": _lists(rng.uniform(0, 5, vocab * k).astype(np.float32), offsets, pa.float32()),
        "fire_rate": _lists(rng.uniform(0, 1, vocab * k).astype(np.float32), offsets, pa.float32()),
    }), out / "token_features.parquet")
    # a store of n_windows windows (its text is what the pages show)
    store = run_dir.parent / "store"
    store.mkdir(parents=True, exist_ok=True)
    window_tokens = torch.from_numpy(rng.integers(0, vocab, (n_windows, context)).astype(np.int32))
    window_index = torch.arange(n_windows).repeat_interleave(context - 1)
    position = torch.arange(1, context).repeat(n_windows).to(torch.int32)
    n = len(window_index)
    write_shard(store / shard_name(0), {"activations.6": torch.zeros(n, 4, dtype=torch.float16),
                                        "token_ids": window_tokens[window_index, position.long()],
                                        "window_tokens": window_tokens, "window_index": window_index,
                                        "position": position, "doc_id": window_index // 4})
    write_json(store / "manifest.json", {"model": None, "layers": [6], "site": "resid_post", "d_model": 4,
                                         "n_tokens": n, "context_size": context, "dataset": "synthetic",
                                         "dtype": "float16", "shards": [shard_name(0)], "shard_rows": [n],
                                         "held_out": {"rule": "x", "modulus": 20}})
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update(store=str(store), feature_map="synthetic layout")
    meta_path.write_text(json.dumps(meta))
    # anomalies (tokens for the worst 200) and window codes (32 latents each)
    error = np.sort(rng.lognormal(0, 0.5, n_windows))[::-1]
    order = rng.permutation(n_windows)
    tokens = [[WORDS[t % len(WORDS)] for t in window_tokens[w].tolist()] if r < 200 else None
              for r, w in enumerate(order)]
    errs = [rng.uniform(0, 2, context).astype(np.float32).tolist() if r < 200 else None for r in range(n_windows)]
    pq.write_table(pa.table({"shard": [shard_name(0)] * n_windows, "window_index": order.astype(np.int64),
                             "doc_id": (order // 4).astype(np.int64), "error": error,
                             "n_tokens": np.full(n_windows, context - 1), "tokens": pa.array(tokens, pa.list_(pa.string())),
                             "token_errors": pa.array(errs, pa.list_(pa.float32()))}), out / "anomalies.parquet")
    per = 32
    offsets = np.arange(n_windows + 1) * per
    pq.write_table(pa.table({"shard": [shard_name(0)] * n_windows, "window_index": np.arange(n_windows, dtype=np.int64),
                             "doc_id": np.arange(n_windows, dtype=np.int64) // 4,
                             "latents": _lists(rng.integers(0, n_features, n_windows * per).astype(np.int32), offsets,
                                               pa.int32()),
                             "values": _lists(rng.uniform(0, 3, n_windows * per).astype(np.float32), offsets,
                                              pa.float32())}), out / "window_codes.parquet")
    # feature map
    pq.write_table(pa.table({"feature": np.arange(n_features, dtype=np.int64),
                             "x": rng.normal(size=n_features).astype(np.float32),
                             "y": rng.normal(size=n_features).astype(np.float32),
                             "cluster": rng.integers(0, 32, n_features)}), out / "feature_map.parquet")
    return run_dir
