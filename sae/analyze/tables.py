"""Turn the streaming pass's state into RUN/analysis/*.parquet (columns fixed in docs/DESIGN.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae.analyze.bands import interval_entries
from sae.analyze.extras import (logit_effects, nearest_features, token_strings, try_load_tokenizer,
                                try_unembedding)


def _list_array(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def _nullable(values: np.ndarray, present: bool, type_) -> pa.Array:
    return pa.array(values, type=type_) if present else pa.nulls(len(values), type=type_)


def kept_entries(keeper):
    """Flatten a TopKeeper's filled slots: (feature, slot, act, row, contexts) sorted by feature, slot."""
    feature, slot = (keeper.rows >= 0).nonzero(as_tuple=True)                              # row-major: sorted
    contexts = keeper.contexts_of(feature, slot)                                           # [E, W] or None
    return (feature.cpu(), slot.cpu(), keeper.acts[feature, slot].cpu(), keeper.rows[feature, slot].cpu(),
            None if contexts is None else contexts.cpu())


def _row_columns(store, rows: torch.Tensor) -> dict:
    """Per-row store columns for global rows: shard, window_index, position, doc_id, label, token_id."""
    starts = torch.tensor([s.start for s in store.shards], dtype=torch.int64)
    shard_of = torch.searchsorted(starts, rows, right=True) - 1
    out = {"shard": shard_of}
    names = set(store.tensor_names(0)) if store.shards else set()
    for name in ("window_index", "position", "doc_id", "label", "token_ids"):
        if name not in names:
            continue
        column = torch.full((len(rows),), -1, dtype=torch.int64)
        for s in torch.unique(shard_of).tolist():
            where = (shard_of == s).nonzero().squeeze(1)
            column[where] = store.read_shard(s, name).long()[rows[where] - store.shards[s].start]
        out[name] = column
    return out


def examples_table(store, feature, act, rows, contexts, radius: int, decode, extra: dict | None = None) -> pa.Table:
    """Rows of top_examples / interval_examples: one example each, with its context tokens and acts."""
    n = len(feature)
    cols = _row_columns(store, rows)
    if contexts is not None and n:
        width = 2 * radius + 1
        context_size = int(store.manifest.get("context_size") or 0)
        token_grid = torch.zeros(n, width, dtype=torch.int64)
        valid = torch.zeros(n, width, dtype=torch.bool)
        offsets = torch.arange(-radius, radius + 1)
        for s in torch.unique(cols["shard"]).tolist():
            where = (cols["shard"] == s).nonzero().squeeze(1)
            windows = store.read_shard(s, "window_tokens").long()                         # [w, context]
            size = windows.shape[1] if not context_size else min(context_size, windows.shape[1])
            places = cols["position"][where][:, None] + offsets[None, :]                  # [e, W]
            inside = (places >= 0) & (places < size)
            token_grid[where] = windows[cols["window_index"][where][:, None], places.clamp(0, size - 1)]
            valid[where] = inside
        lengths = valid.sum(dim=1)
        center = (~valid[:, :radius]).sum(dim=1)
        center = radius - center
        flat_ids = token_grid[valid].numpy()
        flat_acts = contexts[valid].numpy().astype(np.float32)
    else:
        has_tokens = "token_ids" in cols
        lengths = torch.full((n,), 1 if has_tokens else 0, dtype=torch.int64)
        center = torch.zeros(n, dtype=torch.int64)
        flat_ids = cols["token_ids"].numpy() if has_tokens else np.zeros(0, dtype=np.int64)
        flat_acts = act.numpy().astype(np.float32) if has_tokens else np.zeros(0, dtype=np.float32)
    offsets_np = np.concatenate([[0], np.cumsum(lengths.numpy())])
    strings = decode(flat_ids)
    shard_names = [s.name for s in store.shards]
    columns = {
        "feature": pa.array(feature.numpy().astype(np.int64)),
        **({} if extra is None else extra),
        "activation": pa.array(act.numpy().astype(np.float32)),
        "shard": pa.array([shard_names[i] for i in cols["shard"].tolist()], type=pa.string()),
        "window_index": _nullable(cols.get("window_index", torch.zeros(n)).numpy().astype(np.int64),
                                  "window_index" in cols, pa.int64()),
        "position": _nullable(cols.get("position", torch.zeros(n)).numpy().astype(np.int64), "position" in cols,
                              pa.int64()),
        "row": pa.array(rows.numpy().astype(np.int64)),
        "doc_id": _nullable(cols.get("doc_id", torch.zeros(n)).numpy().astype(np.int64), "doc_id" in cols, pa.int64()),
        "label": _nullable(cols.get("label", torch.zeros(n)).numpy().astype(np.int64), "label" in cols, pa.int64()),
        "token_ids": _list_array(offsets_np, pa.array(np.asarray(flat_ids, dtype=np.int64))),
        "tokens": _list_array(offsets_np, strings),
        "acts": _list_array(offsets_np, pa.array(flat_acts, type=pa.float32())),
        "center": pa.array(center.numpy().astype(np.int64)),
    }
    return pa.table(columns)


def _decoder(tokenizer):
    """flat token ids (numpy) -> pa.Array of their strings, decoding each distinct id once."""
    def decode(flat_ids) -> pa.Array:
        flat_ids = np.asarray(flat_ids, dtype=np.int64)
        if len(flat_ids) == 0:
            return pa.array([], type=pa.string())
        unique, inverse = np.unique(flat_ids, return_inverse=True)
        lookup = token_strings(tokenizer, unique.tolist())
        return pa.array([lookup[int(i)] for i in unique], type=pa.string()).take(pa.array(inverse))
    return decode


def _top_tokens(entries, k: int = 5):
    """Per feature: the k token ids with the largest activation-weighted count over its top examples and
    reservoir sample (center tokens, each (feature, row) counted once). Returns {feature: [(id, weight)]}"""
    feature, act, token = entries
    if len(feature) == 0:
        return {}
    vocab = int(token.max()) + 1
    pair, inverse = torch.unique(feature * vocab + token, return_inverse=True)
    weight = torch.zeros(len(pair), dtype=torch.float64).index_add_(0, inverse, act.double().abs())
    pair_feature = pair // vocab
    order = torch.argsort(-weight, stable=True)
    order = order[torch.argsort(pair_feature[order], stable=True)]
    _, counts = torch.unique_consecutive(pair_feature[order], return_counts=True)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    keep = order[(torch.arange(len(order)) - first) < k]
    result: dict[int, list] = {}
    for f, p, w in zip(pair_feature[keep].tolist(), (pair[keep] % vocab).tolist(), weight[keep].tolist()):
        result.setdefault(f, []).append((p, w))
    return result


def write_tables(out_dir: Path, stats, model, store, meta: dict, options, notes: list) -> None:
    d_sae, radius = stats.d_sae, options.context_radius
    tokenizer, why = try_load_tokenizer(meta.get("model"), local_only=not options.with_model)
    if tokenizer is None:
        notes.append(f"tokens are shown as ids: {why}")
    decode = _decoder(tokenizer)

    # ---- examples ----------------------------------------------------------------------------
    feature, slot, act, rows, contexts = kept_entries(stats.top)
    top_table = examples_table(store, feature, act, rows, contexts, radius, decode,
                               extra={"rank": pa.array(slot.numpy().astype(np.int64))})
    pq.write_table(top_table, out_dir / "top_examples.parquet")
    i_feature, i_act, i_rows, i_contexts, band, band_lo, band_hi, i_rank = interval_entries(
        stats, options.n_bands, options.per_band)
    interval_table = examples_table(store, i_feature, i_act, i_rows, i_contexts, radius, decode, extra={
        "rank": pa.array(i_rank.numpy().astype(np.int64)),   # order inside its band (random, from the reservoir)
        "band": pa.array(band.numpy().astype(np.int64)), "band_lo": pa.array(band_lo.numpy()),
        "band_hi": pa.array(band_hi.numpy())})
    pq.write_table(interval_table, out_dir / "interval_examples.parquet")

    # ---- per-feature statistics ---------------------------------------------------------------
    n_tokens = max(stats.n_tokens, 1)
    fire_count = stats.fire_count.cpu()
    density = fire_count.double() / n_tokens
    mean = stats.act_sum.cpu() / (n_tokens if stats.signed else fire_count.clamp(min=1).double())
    max_score = stats.max_score.cpu()
    res_feature, _, res_act, res_rows, _ = kept_entries(stats.reservoir)
    all_feature = torch.cat([feature, res_feature])
    all_rows = torch.cat([rows, res_rows])
    all_act = torch.cat([act, res_act])
    unique_key, first_index = np.unique((all_feature * (len(store) + 1) + all_rows).numpy(), return_index=True)
    first_index = torch.from_numpy(first_index)
    cols = _row_columns(store, all_rows[first_index]) if len(first_index) else {}
    top_tokens = {}
    if "token_ids" in cols:
        top_tokens = _top_tokens((all_feature[first_index], all_act[first_index], cols["token_ids"]))
    token_text = token_strings(tokenizer, [t for pairs in top_tokens.values() for t, _ in pairs])
    top_tokens_str, auto_label = [], []
    for f in range(d_sae):
        words = [token_text[t] for t, _ in top_tokens.get(f, [])]
        top_tokens_str.append(json.dumps(words, ensure_ascii=False))
        short = [w.strip() for w in words if w.strip()][:3]
        auto_label.append(" / ".join(dict.fromkeys(short)))
    nearest, nearest_cos = nearest_features(model.W_dec.detach(), options.n_nearest)
    columns = {
        "feature": pa.array(np.arange(d_sae, dtype=np.int64)),
        "density": pa.array(density.numpy()), "max_activation": pa.array(max_score.numpy().astype(np.float32)),
        "mean_activation": pa.array(mean.numpy().astype(np.float32)), "n_fired": pa.array(fire_count.numpy()),
        "top_tokens": pa.array(top_tokens_str, type=pa.string()), "auto_label": pa.array(auto_label, type=pa.string()),
    }
    label_names = meta.get("label_names") or []
    means, f1 = stats.label_means(), stats.label_f1()
    if means is not None:
        best = f1.cpu().argmax(dim=1)
        best_f1 = f1.cpu().gather(1, best[:, None]).squeeze(1)
        columns["best_label"] = pa.array([label_names[b] if v > 0 else None
                                          for b, v in zip(best.tolist(), best_f1.tolist())], type=pa.string())
        columns["best_label_f1"] = pa.array(best_f1.numpy())
        offsets = np.arange(d_sae + 1) * len(label_names)
        columns["label_means"] = _list_array(offsets, pa.array(means.cpu().numpy().reshape(-1)))
    else:
        columns["best_label"] = pa.nulls(d_sae, type=pa.string())
        columns["best_label_f1"] = pa.nulls(d_sae, type=pa.float64())
        columns["label_means"] = pa.nulls(d_sae, type=pa.list_(pa.float64()))
    k = nearest.shape[1]
    offsets = np.arange(d_sae + 1) * k
    columns["nearest"] = _list_array(offsets, pa.array(nearest.numpy().reshape(-1)))
    columns["nearest_cos"] = _list_array(offsets, pa.array(nearest_cos.numpy().reshape(-1)))
    pq.write_table(pa.table(columns), out_dir / "features.parquet")

    # ---- histograms ------------------------------------------------------------------------------
    hist = stats.histograms().cpu().numpy()
    n_bins = hist.shape[1]
    pq.write_table(pa.table({"feature": pa.array(np.arange(d_sae, dtype=np.int64)),
                             "counts": _list_array(np.arange(d_sae + 1) * n_bins, pa.array(hist.reshape(-1)))}),
                   out_dir / "histograms.parquet")
    alive = density[density > 0]
    density_edges = np.linspace(-8, 0, 33)
    counts, _ = np.histogram(np.clip(np.log10(alive.numpy()), -8, 0), bins=density_edges)
    meta.update(density_hist_edges=density_edges.tolist(), density_hist_counts=counts.tolist(),
                n_dead=int((fire_count == 0).sum()))

    # ---- logit effects ---------------------------------------------------------------------------
    meta["logit_effects"] = False
    if not options.with_model:
        notes.append("logit effects skipped (--no-model)")
        return
    unembedding, why = try_unembedding(meta.get("model"), options.model_dtype)
    if unembedding is None:
        notes.append(f"logit effects skipped: {why}")
        return
    W_U, norm_weight, family = unembedding
    if W_U.shape[1] != model.d_in:
        notes.append(f"logit effects skipped: the unembedding has width {W_U.shape[1]}, the SAE {model.d_in}")
        return
    device = model.W_dec.device
    up_ids, up_values, down_ids, down_values = logit_effects(
        model.W_dec_raw.detach(), W_U.to(device), None if norm_weight is None else norm_weight.to(device), family,
        options.n_logits)
    k = up_ids.shape[1]
    offsets = np.arange(d_sae + 1) * k
    pq.write_table(pa.table({
        "feature": pa.array(np.arange(d_sae, dtype=np.int64)),
        "promoted": _list_array(offsets, decode(up_ids.numpy().reshape(-1))),
        "promoted_values": _list_array(offsets, pa.array(up_values.numpy().reshape(-1))),
        "suppressed": _list_array(offsets, decode(down_ids.numpy().reshape(-1))),
        "suppressed_values": _list_array(offsets, pa.array(down_values.numpy().reshape(-1))),
        "promoted_ids": _list_array(offsets, pa.array(up_ids.numpy().reshape(-1))),
        "suppressed_ids": _list_array(offsets, pa.array(down_ids.numpy().reshape(-1))),
    }), out_dir / "logit_effects.parquet")
    meta["logit_effects"] = True
