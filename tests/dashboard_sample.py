"""Synthetic run folders for the dashboard's tests and benchmark: analysis tables in the exact schema of
docs/DESIGN.md (RUN/analysis/*), filled with random but well-formed values, plus a tiny local causal LM
(random weights, a byte-level BPE tokenizer trained on the spot: nothing downloads).

    from dashboard_sample import write_analysis, tiny_model_dir     # tests/ is on sys.path under pytest
    write_analysis(run_dir, n_features=16384)        # the benchmark's 16,384-latent run

A test fixture, not shipped: scripts/bench_dashboard.py puts tests/ on sys.path to import it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

INJECTIONS = ('<script>window.__sae_pwned=1</script>', '<img src=x onerror="window.__sae_pwned=2">',
              '"><svg onload=window.__sae_pwned=3>')
WORDS = ("the", " market", " shares", " rose", " goal", " match", " film", " award", " minister", " vote",
         " phone", " software", ",", ".", " and", " of", "\n", " 2005", " a", " said")


def _lists(flat: np.ndarray, length: int, arrow_type) -> pa.ListArray:
    """[rows * length] values -> a list column of `length` per row."""
    offsets = np.arange(0, len(flat) + 1, length, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=arrow_type))


def _examples(rng, features: np.ndarray, activation: np.ndarray, radius: int, vocab: list[str],
              injections: bool) -> dict:
    """Columns shared by top_examples and interval_examples for len(features) rows."""
    n, width = len(features), 2 * radius + 1
    token_ids = rng.integers(0, len(vocab), size=n * width).astype(np.int64)
    tokens = np.asarray(vocab, dtype=object)[token_ids]
    if injections and n:
        for k, payload in enumerate(INJECTIONS):   # the strongest examples of feature 0 carry the payloads
            tokens[k * width + radius - 1] = payload
    acts = np.abs(rng.normal(size=(n, width))).astype(np.float32) * activation[:, None] * 0.3
    acts[:, radius] = activation
    return {
        "feature": pa.array(features.astype(np.int64)),
        "activation": pa.array(activation.astype(np.float32)),
        "shard": pa.array(["shard_00000.safetensors"] * n),
        "window_index": pa.array(rng.integers(0, 1000, size=n).astype(np.int64)),
        "position": pa.array(rng.integers(radius, 100, size=n).astype(np.int32)),
        "row": pa.array(rng.integers(0, 10**6, size=n).astype(np.int64)),
        "doc_id": pa.array(rng.integers(0, 500, size=n).astype(np.int64)),
        "label": pa.array(rng.integers(0, 5, size=n).astype(np.int64)),
        "token_ids": _lists(token_ids, width, pa.int64()),
        "tokens": _lists(tokens, width, pa.string()),
        "acts": _lists(acts.ravel(), width, pa.float32()),
        "center": pa.array(np.full(n, radius, dtype=np.int32)),
    }


def write_analysis(run_dir, n_features: int, n_top: int = 20, radius: int = 10, n_bands: int = 5,
                   per_band: int = 3, n_bins: int = 40, label_names=("business", "entertainment", "politics",
                   "sport", "tech"), vocab=None, injections: bool = True, seed: int = 0) -> Path:
    """Write RUN/analysis/{meta.json, features, top_examples, interval_examples, histograms, logit_effects}."""
    rng = np.random.default_rng(seed)
    vocab = list(vocab or WORDS)
    out = Path(run_dir) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    feats = np.arange(n_features)
    density = 10 ** rng.uniform(-5, -1, size=n_features)
    density[-max(1, n_features // 50):] = 0.0            # a few dead latents
    max_act = rng.uniform(1.0, 10.0, size=n_features).astype(np.float32)
    alive = density > 0
    n_labels = len(label_names)

    nearest = rng.integers(0, n_features, size=(n_features, 10))
    nearest_cos = np.sort(rng.uniform(0.1, 0.9, size=(n_features, 10)))[:, ::-1]
    label_means = rng.uniform(0, 1, size=(n_features, n_labels)).astype(np.float32)
    pq.write_table(pa.table({
        "feature": pa.array(feats.astype(np.int64)),
        "density": pa.array(density),
        "max_activation": pa.array(np.where(alive, max_act, 0).astype(np.float32)),
        "mean_activation": pa.array(np.where(alive, max_act / 3, 0).astype(np.float32)),
        "n_fired": pa.array((density * 10**6).astype(np.int64)),
        "top_tokens": pa.array([f"{vocab[i % len(vocab)].strip() or 'tok'} {vocab[(i * 7) % len(vocab)].strip()}"
                                for i in feats]),
        "auto_label": pa.array([f"{vocab[(i * 3) % len(vocab)].strip() or 'tok'}-ish" for i in feats]),
        "best_label": pa.array([label_names[i % n_labels] for i in feats]),
        "best_label_f1": pa.array(rng.uniform(0, 1, size=n_features)),
        "label_means": _lists(label_means.ravel(), n_labels, pa.float32()),
        "nearest": _lists(nearest.ravel().astype(np.int64), 10, pa.int64()),
        "nearest_cos": _lists(nearest_cos.ravel().astype(np.float32), 10, pa.float32()),
    }), out / "features.parquet")

    # top examples: n_top per live feature, descending activation
    live = feats[alive]
    top_features = np.repeat(live, n_top)
    ranks = np.tile(np.arange(n_top), len(live))
    top_act = (np.repeat(max_act[alive], n_top) * (1 - ranks / (n_top + 1))).astype(np.float32)
    columns = _examples(rng, top_features, top_act, radius, vocab, injections)
    columns["rank"] = pa.array(ranks.astype(np.int32))
    pq.write_table(pa.table(columns), out / "top_examples.parquet")

    # interval examples: per_band in each of n_bands equal-width bands of [0, max]
    band = np.tile(np.repeat(np.arange(n_bands), per_band), len(live))
    int_features = np.repeat(live, n_bands * per_band)
    band_lo = (np.repeat(max_act[alive], n_bands * per_band) * band / n_bands).astype(np.float32)
    band_hi = (np.repeat(max_act[alive], n_bands * per_band) * (band + 1) / n_bands).astype(np.float32)
    int_act = (band_lo + (band_hi - band_lo) * rng.uniform(0.05, 0.95, size=len(band))).astype(np.float32)
    columns = _examples(rng, int_features, int_act, radius, vocab, False)
    columns.update(band=pa.array(band.astype(np.int32)), band_lo=pa.array(band_lo), band_hi=pa.array(band_hi))
    pq.write_table(pa.table(columns), out / "interval_examples.parquet")

    edges = np.logspace(-3, 2, n_bins + 1)
    counts = rng.poisson(50, size=(n_features, n_bins)).astype(np.int64)
    counts[~alive] = 0
    pq.write_table(pa.table({"feature": pa.array(feats.astype(np.int64)),
                             "counts": _lists(counts.ravel(), n_bins, pa.int64())}), out / "histograms.parquet")

    k = 10
    promoted = np.asarray(vocab, dtype=object)[rng.integers(0, len(vocab), size=n_features * k)]
    if injections:
        promoted[0] = INJECTIONS[0]
    pq.write_table(pa.table({
        "feature": pa.array(feats.astype(np.int64)),
        "promoted": _lists(promoted, k, pa.string()),
        "promoted_values": _lists(np.sort(rng.uniform(0, 2, size=n_features * k))[::-1].astype(np.float32), k,
                                  pa.float32()),
        "suppressed": _lists(np.asarray(vocab, dtype=object)[rng.integers(0, len(vocab), size=n_features * k)],
                             k, pa.string()),
        "suppressed_values": _lists(-rng.uniform(0, 2, size=n_features * k).astype(np.float32), k, pa.float32()),
    }), out / "logit_effects.parquet")

    log_density = np.log10(density[alive])
    hist_counts, hist_edges = np.histogram(log_density, bins=30)
    meta = {"n_tokens": 10**6, "n_features": n_features, "model": "synthetic", "layer": 0, "site": "resid_post",
            "variant": "relu", "has_contexts": True, "label_names": list(label_names),
            "hist_bin_edges": edges.tolist(), "density_hist_edges": hist_edges.tolist(),
            "density_hist_counts": hist_counts.tolist(), "fire_threshold": 0.0, "context_radius": radius,
            "signed_codes": False}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def tiny_model_dir(path, corpus=None, hidden: int = 32, layers: int = 3, seed: int = 0) -> Path:
    """A random-weight Llama (hidden 32) with a byte-level BPE tokenizer, saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    corpus = list(corpus or ["".join(WORDS)] * 4 + list(INJECTIONS))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path
