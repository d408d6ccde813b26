"""A SAELens activation cache, read lazily as an ActivationStore.

SAELens's CacheActivationsRunner writes a Hugging Face `datasets` folder (save_to_disk): one row per
sequence, one Array2D column [context_size, d_in] per hook name (e.g. blocks.6.hook_resid_post), and
in recent versions a `token_ids` column [context_size]. Older versions wrote shard_0/, shard_1/ ...
each such a folder. Arrow files are memory-mapped; each record batch's activations are viewed, without
a copy, as a [sequences × context_size, d_in] array, and each becomes one virtual shard of the store.
Rows are tokens in cache order: row r is position r % context_size of sequence r // context_size.
Each sequence counts as one document for the held-out rule (doc_id = sequence index).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from sae.errors import UserError
from sae.interop.naming import parse_hook
from sae.store import HELD_OUT_MODULUS, HELD_OUT_RULE, ActivationStore, ShardInfo

STATE = "state.json"
INFO = "dataset_info.json"


def _dataset_dirs(path: Path) -> list[Path]:
    if (path / STATE).is_file() and (path / INFO).is_file():
        return [path]
    shards = [p for p in path.glob("shard_*") if (p / STATE).is_file()] if path.is_dir() else []
    return sorted(shards, key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else 0)


def is_saelens_cache(path) -> bool:
    """A `datasets` folder (or folder of shard_N folders) with at least one Array2D column."""
    path = Path(path)
    dirs = _dataset_dirs(path) if path.is_dir() else []
    if not dirs:
        return False
    try:
        features = json.loads((dirs[0] / INFO).read_text()).get("features", {})
    except (OSError, json.JSONDecodeError):
        return False
    return any(isinstance(f, dict) and f.get("_type") == "Array2D" for f in features.values())


class _FlatColumn:
    """A per-sequence column of the Arrow table seen as per-token rows: chunk c holds sequences
    [seq_starts[c], seq_starts[c+1]) as a read-only numpy view [n_seq_c * context, width]."""

    def __init__(self, chunked, context: int, width: int):
        import pyarrow as pa   # here, not at import: `sae train` on an ordinary store never needs it
        self.context, self.width = context, width
        self.views, starts = [], [0]
        for chunk in chunked.chunks:
            storage = chunk.storage if hasattr(chunk, "storage") else chunk
            values = storage
            while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type) \
                    or pa.types.is_large_list(values.type):
                values = values.flatten()  # honours the chunk's offset: no copy
            flat = values.to_numpy(zero_copy_only=False) if values.null_count else values.to_numpy(zero_copy_only=True)
            self.views.append(flat.reshape(len(chunk) * context, width))
            starts.append(starts[-1] + len(chunk))
        self.seq_starts = np.asarray(starts)
        self.row_starts = self.seq_starts * context

    def slice(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) (global token indices) as a new array."""
        out = np.empty((hi - lo, self.width), dtype=self.views[0].dtype if self.views else np.float32)
        first = int(np.searchsorted(self.row_starts, lo, side="right")) - 1
        at = lo
        for c in range(max(first, 0), len(self.views)):
            start = int(self.row_starts[c])
            if start >= hi:
                break
            take_lo, take_hi = max(at, start) - start, min(hi, int(self.row_starts[c + 1])) - start
            out[at - lo: at - lo + take_hi - take_lo] = self.views[c][take_lo:take_hi]
            at += take_hi - take_lo
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Given global token indices (any order), their rows (only those rows are read from disk)."""
        out = np.empty((len(rows), self.width), dtype=self.views[0].dtype)
        chunk_of = np.searchsorted(self.row_starts, rows, side="right") - 1
        for c in np.unique(chunk_of):
            where = np.nonzero(chunk_of == c)[0]
            out[where] = self.views[c][rows[where] - self.row_starts[c]]
        return out


class SAELensCacheStore(ActivationStore):
    """ActivationStore's reading API over a SAELens activation cache (no files are written)."""

    def __init__(self, path):  # noqa: D401 - does not call ActivationStore.__init__ (no manifest)
        import datasets
        self.path = Path(path)
        dirs = _dataset_dirs(self.path)
        if not dirs:
            raise UserError(f"{self.path} is not a SAELens activation cache (no datasets state.json)")
        parts = [datasets.load_from_disk(str(d)) for d in dirs]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        hooks = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Array2D)]
        if not hooks:
            raise UserError(f"{self.path} has no Array2D activation column (SAELens caches have one per hook)")
        shapes = {tuple(dataset.features[h].shape) for h in hooks}
        if len(shapes) > 1:
            raise UserError(f"{self.path}: hook columns differ in shape {sorted(shapes)}; one store needs one width")
        context, d_model = shapes.pop()
        self.context_size, self.d_model = int(context), int(d_model)
        self.hooks = hooks
        parsed = [parse_hook(h) for h in hooks]
        sites = {site for _, site in parsed}
        by_layer = all(layer is not None for layer, _ in parsed) and len(sites) == 1 \
            and len({layer for layer, _ in parsed}) == len(hooks)
        self.layers = [layer for layer, _ in parsed] if by_layer else list(hooks)
        self._hook_of = dict(zip(self.layers, hooks))
        table = dataset.data.table
        self._columns_flat = {h: _FlatColumn(table.column(h), self.context_size, self.d_model) for h in hooks}
        self._tokens = _FlatColumn(table.column("token_ids"), self.context_size, 1) \
            if "token_ids" in dataset.column_names else None
        first = self._columns_flat[hooks[0]]
        self.n_sequences = int(first.seq_starts[-1])
        self.n_rows = self.n_sequences * self.context_size
        self.shards = [ShardInfo(f"chunk_{i:05d}", int(first.row_starts[i + 1] - first.row_starts[i]),
                                 int(first.row_starts[i])) for i in range(len(first.views))]
        self._seq_starts = first.seq_starts
        self._handles, self._columns = {}, {}
        self._segments, self.metas = {}, None      # the split is computed from doc_id when first asked for
        fingerprints = [json.loads((d / STATE).read_text()).get("_fingerprint", "") for d in dirs]
        self.manifest = {
            "format": "saelens-activation-cache", "model": None, "layers": self.layers,
            "site": sites.pop() if by_layer else None, "d_model": self.d_model, "n_tokens": self.n_rows,
            "context_size": self.context_size, "dataset": str(self.path), "dtype": str(first.views[0].dtype),
            "shards": [s.name for s in self.shards], "shard_rows": [s.n_rows for s in self.shards],
            "held_out": {"rule": HELD_OUT_RULE, "modulus": HELD_OUT_MODULUS, "doc_id": "sequence index"},
            "hook_names": hooks, "fingerprints": fingerprints, "source": "saelens-cache",
        }

    def __repr__(self) -> str:
        return f"SAELensCacheStore({str(self.path)!r}, rows={self.n_rows}, d_model={self.d_model}, hooks={self.hooks})"

    @property
    def digest(self) -> str:
        blob = json.dumps({k: self.manifest[k] for k in ("hook_names", "fingerprints", "n_tokens", "d_model")},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def has_windows(self) -> bool:
        return self._tokens is not None

    @property
    def has_labels(self) -> bool:
        return False

    def tensor_names(self, shard_index: int) -> list[str]:
        names = [f"activations.{layer}" for layer in self.layers] + ["doc_id", "position", "window_index"]
        return names + (["token_ids", "window_tokens"] if self._tokens is not None else [])

    def _layer_of_name(self, name: str):
        key = name[len("activations."):]
        for layer in self.layers:
            if str(layer) == key:
                return layer
        raise UserError(f"the cache has no {name} (layers: {self.layers})")

    def read(self, shard_index: int, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        shard = self.shards[shard_index]
        stop = shard.n_rows if stop is None else min(stop, shard.n_rows)
        lo, hi = shard.start + start, shard.start + stop
        rows = torch.arange(lo, hi, dtype=torch.int64)
        if name.startswith("activations."):
            hook = self._hook_of[self._layer_of_name(name)]
            return torch.from_numpy(self._columns_flat[hook].slice(lo, hi))
        if name == "doc_id":
            return rows // self.context_size
        if name == "position":
            return (rows % self.context_size).to(torch.int32)
        if name == "window_index":
            return rows // self.context_size - int(self._seq_starts[shard_index])
        if name == "token_ids" and self._tokens is not None:
            return torch.from_numpy(self._tokens.slice(lo, hi)[:, 0].astype(np.int32))
        if name == "window_tokens" and self._tokens is not None:
            first, last = shard.start, shard.start + shard.n_rows
            flat = self._tokens.slice(first, last)[:, 0].astype(np.int32)
            return torch.from_numpy(flat.reshape(-1, self.context_size))
        raise UserError(f"the SAELens cache has no column {name!r}")

    def read_shard(self, shard_index: int, name: str) -> torch.Tensor:
        return self.read(shard_index, name)

    def gather(self, layer, global_indices: torch.Tensor, tensor: str = "activations",
               dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Activations of global row indices in any order (the training batches): only those rows are read
        (a cache holds no transcoder targets)."""
        if tensor != "activations":
            raise UserError("a SAELens activation cache holds no transcoder targets")
        rows = self.rows(layer, global_indices)
        return rows if dtype is None else rows.to(dtype)

    def rows(self, layer, global_indices: torch.Tensor) -> torch.Tensor:
        """Activations of global row indices (sorted or not) as float32 [len(idx), d_model]; reads only those rows."""
        hook = self._hook_of[self.resolve_layer(layer)]
        indices = torch.as_tensor(global_indices, dtype=torch.int64).numpy()
        if len(indices) == 0:
            return torch.empty(0, self.d_model, dtype=torch.float32)
        return torch.from_numpy(self._columns_flat[hook].take(indices)).float()
