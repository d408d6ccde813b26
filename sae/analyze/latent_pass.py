"""What the dashboard's search and latent-space pages read, gathered in the same pass as the feature
statistics (sae.analyze.pipeline calls update() per batch and write() at the end):

    token_features.parquet  per token id: how often it occurs and the features that fire most on it (mean
                            code on that token, share of its occurrences they fire on, and the mean code
                            divided by the feature's largest code: the ranking score)
    anomalies.parquet       every stored context window ranked by reconstruction error: the mean over its
                            tokens of ‖x − x̂‖², divided by the store's mean ‖x‖²; the worst windows also
                            carry their tokens and per-token errors
    window_codes.parquet    per window, the 256 strongest latents of its mean code (retrieval in code space; the
                            dashboard weights them by idf, as the densest latents are strong in every window)

Per batch only the row's `per_row` strongest codes are counted for the token table, so its cost does not
grow with dense codes.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


class LatentStats:
    def __init__(self, store, d_sae: int, device="cpu", per_row: int = 16, per_token: int = 16,
                 per_window: int = 256, worst_windows: int = 200, floor: float = 0.0, signed: bool = False):
        self.store, self.d_sae, self.device = store, d_sae, device
        self.per_row, self.per_token, self.per_window = min(per_row, d_sae), per_token, min(per_window, d_sae)
        self.worst_windows, self.floor, self.signed = worst_windows, floor, signed
        names = set(store.tensor_names(0)) if store.shards else set()
        self.token_ids = store.column("token_ids").long() if "token_ids" in names else None      # [n]
        self.row_error = torch.zeros(len(store), dtype=torch.float32)                          # [n]
        self.sq_norm = 0.0
        self.keys: list[torch.Tensor] = []
        self.sums: list[torch.Tensor] = []
        self.hits: list[torch.Tensor] = []
        self.pending = 0
        self.windows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @torch.no_grad()
    def update(self, batch, codes: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Fold one batch in: codes [B, d_sae], x_hat [B, d_in] (the SAE's reconstruction of batch.x)."""
        x = batch.x.to(codes.device)
        self.row_error[batch.global_rows] = ((x - x_hat) ** 2).sum(dim=1).float().cpu()
        self.sq_norm += float((x.double() ** 2).sum())
        scores = codes.abs() if self.signed else codes
        if self.token_ids is not None:
            values, latents = scores.topk(self.per_row, dim=1)                                 # [B, per_row]
            firing = values > self.floor
            tokens = self.token_ids[batch.global_rows].to(codes.device)[:, None].expand_as(latents)
            self.keys.append((tokens[firing] * self.d_sae + latents[firing]).cpu())
            self.sums.append(values[firing].double().cpu())
            self.hits.append(torch.ones(len(self.keys[-1]), dtype=torch.float64))
            self.pending += int(firing.sum())
            if self.pending > 4_000_000:
                self._coalesce()
        if batch.window is not None:
            window = batch.window.to(codes.device)
            unique, inverse = torch.unique(window, return_inverse=True)
            sums = torch.zeros(len(unique), codes.shape[1], device=codes.device).index_add_(0, inverse, scores.float())
            counts = torch.bincount(inverse, minlength=len(unique)).clamp(min=1)[:, None]
            values, latents = (sums / counts).topk(self.per_window, dim=1)                      # [w, per_window]
            for w, v, lat in zip(unique.tolist(), values.cpu().numpy(), latents.cpu().numpy()):
                keep = v > 0
                self.windows[(batch.shard, w)] = (lat[keep].astype(np.int32), v[keep].astype(np.float32))

    def _coalesce(self) -> None:
        """Merge the (token, latent) entries gathered so far: one sum of codes and one count per pair."""
        if not self.keys:
            return
        keys, sums, hits = torch.cat(self.keys), torch.cat(self.sums), torch.cat(self.hits)
        unique, inverse = torch.unique(keys, return_inverse=True)
        self.keys = [unique]
        self.sums = [torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, sums)]
        self.hits = [torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, hits)]
        self.pending = len(unique)

    # ---- tables ----------------------------------------------------------------------------------------------
    def write(self, out_dir, stats, model, meta: dict, notes: list) -> None:
        """The three tables and feature_map.parquet into out_dir (stats: the pass's FeatureStats)."""
        from sae.analyze.extras import token_strings, try_load_tokenizer
        from sae.analyze.feature_map import write_feature_map
        tokenizer, _ = try_load_tokenizer(meta.get("model"))
        token_text = lambda ids: token_strings(tokenizer, ids)  # noqa: E731
        self._write_tokens(out_dir, stats.max_score.double().cpu(), token_text)
        self._write_windows(out_dir, token_text)
        meta["store_mean_sq_norm"] = self.sq_norm / max(len(self.store), 1)
        try:
            meta["feature_map"] = write_feature_map(out_dir, model.W_dec.detach().float().cpu().numpy())
        except Exception as error:  # noqa: BLE001 - the map is an extra: say why it is missing
            notes.append(f"feature map skipped: {type(error).__name__}: {error}")

    def _write_tokens(self, out_dir, max_score, token_text) -> None:
        if self.token_ids is None:
            return
        self._coalesce()
        if not self.keys:
            return
        keys, total, hits = self.keys[0], self.sums[0], self.hits[0]
        occurrences = torch.bincount(self.token_ids, minlength=1).double()
        token, latent = keys // self.d_sae, keys % self.d_sae
        mean = total / occurrences[token]
        score = mean / max_score[latent].clamp(min=1e-12)
        order = torch.argsort(-score, stable=True)
        order = order[torch.argsort(token[order], stable=True)]                 # by token, best score first
        token_sorted = token[order]
        _, counts = torch.unique_consecutive(token_sorted, return_counts=True)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        keep = order[(torch.arange(len(order)) - first) < self.per_token]
        t_keep = token[keep]
        ids, per = torch.unique_consecutive(t_keep, return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(per.numpy())]).astype(np.int32)
        text = token_text(ids.tolist())
        list_of = lambda values, type_: pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_))  # noqa: E731
        pq.write_table(pa.table({
            "token_id": pa.array(ids.numpy().astype(np.int64)),
            "token": pa.array([text[int(i)] for i in ids.tolist()], type=pa.string()),
            "count": pa.array(occurrences[ids].numpy().astype(np.int64)),
            "features": list_of(latent[keep].numpy().astype(np.int64), pa.int64()),
            "score": list_of(score[keep].numpy().astype(np.float32), pa.float32()),
            "mean_activation": list_of(mean[keep].numpy().astype(np.float32), pa.float32()),
            "fire_rate": list_of((hits[keep] / occurrences[t_keep]).numpy().astype(np.float32), pa.float32()),
        }), out_dir / "token_features.parquet")

    def _write_windows(self, out_dir, token_text) -> None:
        store = self.store
        if not store.has_windows or not len(store):
            return
        mean_sq = self.sq_norm / max(len(store), 1)
        window = store.column("window_index").long()
        starts = torch.tensor([s.start for s in store.shards] + [len(store)])
        shard = torch.repeat_interleave(torch.arange(len(store.shards)), starts.diff())
        key = shard * (int(window.max()) + 1) + window                                        # [n] one per window
        unique, inverse = torch.unique(key, return_inverse=True)
        error = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, self.row_error.double())
        n_tokens = torch.bincount(inverse, minlength=len(unique))
        error = error / n_tokens.clamp(min=1) / max(mean_sq, 1e-30)                             # [windows]
        first_row = torch.full((len(unique),), len(store), dtype=torch.int64).scatter_reduce_(
            0, inverse, torch.arange(len(store)), reduce="amin")
        doc_id = store.column("doc_id").long()[first_row] if "doc_id" in store.tensor_names(0) else \
            torch.full((len(unique),), -1)
        w_shard, w_index = shard[first_row], window[first_row]
        order = torch.argsort(-error)
        names = [s.name for s in store.shards]
        columns = {"shard": pa.array([names[i] for i in w_shard[order].tolist()], type=pa.string()),
                   "window_index": pa.array(w_index[order].numpy()), "doc_id": pa.array(doc_id[order].numpy()),
                   "error": pa.array(error[order].numpy()), "n_tokens": pa.array(n_tokens[order].numpy())}
        if store.has_labels:
            columns["label"] = pa.array(store.column("label").long()[first_row][order].numpy())
        tokens, errors = [], []
        position = store.column("position").long()
        for rank, w in enumerate(order.tolist()):
            if rank >= self.worst_windows:
                tokens.append(None)
                errors.append(None)
                continue
            s, wi = int(w_shard[w]), int(w_index[w])
            ids = store.read_shard(s, "window_tokens")[wi].long()                               # [context]
            rows = (inverse == w).nonzero().squeeze(1)
            per_token = np.full(len(ids), np.nan, dtype=np.float32)
            per_token[position[rows].numpy()] = (self.row_error[rows].double() / max(mean_sq, 1e-30)).numpy()
            text = token_text(ids.tolist())
            tokens.append([text[int(i)] for i in ids.tolist()])
            errors.append(per_token.tolist())
        columns["tokens"] = pa.array(tokens, type=pa.list_(pa.string()))
        columns["token_errors"] = pa.array(errors, type=pa.list_(pa.float32()))
        pq.write_table(pa.table(columns), out_dir / "anomalies.parquet")

        keys = sorted(self.windows)
        lat = [self.windows[k][0] for k in keys]
        val = [self.windows[k][1] for k in keys]
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in lat])]).astype(np.int32)
        win_key = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(w_shard.tolist(), w_index.tolist()))}
        docs = [int(doc_id[win_key[k]]) if k in win_key else -1 for k in keys]
        pq.write_table(pa.table({
            "shard": pa.array([names[s] for s, _ in keys], type=pa.string()),
            "window_index": pa.array([w for _, w in keys], type=pa.int64()),
            "doc_id": pa.array(docs, type=pa.int64()),
            "latents": pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(lat) if lat else
                                                                            np.zeros(0, np.int32), type=pa.int32())),
            "values": pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(val) if val else
                                                                           np.zeros(0, np.float32), type=pa.float32())),
        }), out_dir / "window_codes.parquet")
