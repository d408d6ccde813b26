"""Reading a store (`ActivationStore`): sharded safetensors files plus manifest.json (docs/files.md).

Reading is lazy: shards are memory-mapped through safetensors' safe_open and read by slices.
Training batches come from `train_batches`, whose order is a pure function of (seed, step):
rows are grouped in contiguous chunks, chunk order is shuffled per epoch, and a bounded buffer
of `buffer_chunks` chunks is shuffled row-wise, so memory stays bounded and a resumed run seeks
straight to its step.
"""
from __future__ import annotations

import atexit
import itertools
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from sae.errors import UserError
from sae.store.layout import MANIFEST, manifest_digest
from sae.store import index as store_index
from sae.store.split import BatchPlan, Segments
from sae.files import read_json


ROW_COLUMNS = ("doc_id", "token_ids", "position", "window_index", "label")   # one value a row


@dataclass
class ShardInfo:
    name: str
    n_rows: int
    start: int  # global index of its first row


class ActivationStore:
    """A lazily opened activation store. len(store) is the number of rows (tokens)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.exists():
            raise UserError(f"the store {self.path} does not exist")
        if not self.path.is_dir() or not manifest_path.is_file():
            raise UserError(f"{self.path} is not an activation store (no {MANIFEST})")
        self.manifest = read_json(manifest_path, "the store's manifest")
        missing = [key for key in ("layers", "d_model", "shards") if key not in self.manifest]
        if not isinstance(self.manifest, dict) or missing:
            raise UserError(f"{manifest_path} is damaged: it lacks {', '.join(missing) or 'its fields'}")
        self.layers: list = list(self.manifest.get("layers") or [])
        self.d_model: int = int(self.manifest["d_model"])
        self.shards: list[ShardInfo] = []
        start = 0
        # per-shard metadata (sae/store/index.py): an unfinished store lists its shards there, not in the manifest
        names, shard_rows, self.metas = store_index.resolve(self.path, self.manifest)
        if shard_rows is not None and len(shard_rows) != len(names):
            raise UserError(f"{manifest_path} is damaged: {len(names)} shards but {len(shard_rows)} row counts")
        for i, name in enumerate(names):
            meta = None if self.metas is None else self.metas[i]
            n_rows = self._check_shard(name, None if shard_rows is None else int(shard_rows[i]))
            if meta is not None:
                store_index.check(self.path, meta, n_rows)
            self.shards.append(ShardInfo(name, n_rows, start))
            start += n_rows
        self.n_rows = start
        self._segments: dict = {}
        if names == list(self.manifest.get("shards") or []) and self.manifest.get("n_tokens") is not None \
                and int(self.manifest["n_tokens"]) != self.n_rows:
            raise UserError(f"{manifest_path} is damaged: n_tokens is {self.manifest['n_tokens']}, its shards hold "
                            f"{self.n_rows} rows")
        self._handles: dict[str, object] = {}
        self._columns: dict[str, torch.Tensor] = {}

    def _check_shard(self, name: str, n_rows: int | None) -> int:
        """A shard's row count, after checking what can be checked without reading its data: the file is
        there, its header parses and covers the file, and every tensor has the manifest's rows and width."""
        path = self.path / name
        damaged = f"{self.path} is damaged: shard {name}"
        if not path.is_file():
            raise UserError(f"{damaged} is missing (collect the store again, or --resume an unfinished one)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
        except Exception as error:  # noqa: BLE001 - safetensors raises its own types for a bad file
            raise UserError(f"{damaged} cannot be read ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else 'damaged header'})") from None
        rows = n_rows if n_rows is not None else (shapes.get("doc_id") or [None])[0]
        for layer in self.layers:
            shape = shapes.get(f"activations.{layer}")
            if shape is None:
                raise UserError(f"{damaged} has no activations.{layer}")
            if list(shape) != [rows, self.d_model]:
                raise UserError(f"{damaged} holds activations.{layer} of shape {list(shape)}, the manifest says "
                                f"[{rows}, {self.d_model}]")
            if self.target_site is not None and list(shapes.get(f"targets.{layer}") or []) != [rows, self.d_model]:
                raise UserError(f"{damaged} lacks targets.{layer} of shape [{rows}, {self.d_model}] "
                                f"(the manifest's target_site is {self.target_site})")
        for column in ("doc_id", "token_ids", "position", "window_index", "label"):
            if column in shapes and shapes[column][0] != rows:
                raise UserError(f"{damaged} holds {shapes[column][0]} {column} values for {rows} rows")
        return int(rows)

    # ---- basic facts -------------------------------------------------------------------
    @staticmethod
    def from_tensors(path, activations: torch.Tensor, **kwargs) -> "ActivationStore":
        """Write a store from activations a user already has ([n, d]) and open it (see
        sae.store.writer.write_from_tensors for the optional per-row columns)."""
        from sae.store.writer import write_from_tensors
        return ActivationStore(write_from_tensors(path, activations, **kwargs))

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, rows={self.n_rows}, d_model={self.d_model}, layers={self.layers})"

    @property
    def digest(self) -> str:
        return manifest_digest(self.manifest)

    @property
    def has_windows(self) -> bool:
        return bool(self.shards) and "window_tokens" in self.tensor_names(0)

    @property
    def target_site(self) -> str | None:
        """The site stored beside the activations as `targets.<layer>` (a transcoder's target), or None."""
        return self.manifest.get("target_site")

    @property
    def has_labels(self) -> bool:
        return bool(self.shards) and "label" in self.tensor_names(0)

    def resolve_layer(self, layer=None):
        """The layer key to read: `layer` itself, or the only layer when there is one."""
        if layer is None:
            if len(self.layers) != 1:
                raise UserError(f"the store holds layers {self.layers}: pass --layer")
            return self.layers[0]
        for known in self.layers:
            if str(known) == str(layer):
                return known
        raise UserError(f"layer {layer} is not in the store (it holds {self.layers})")

    # ---- raw access ----------------------------------------------------------------------
    def _handle(self, shard_index: int):
        name = self.shards[shard_index].name
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.path / name), framework="pt")
        return self._handles[name]

    def tensor_names(self, shard_index: int) -> list[str]:
        return list(self._handle(shard_index).keys())

    def read(self, shard_index: int, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` in one shard, read through the memory map."""
        tensor_slice = self._handle(shard_index).get_slice(name)
        if stop is None and (name.startswith(("activations.", "targets.")) or name in ROW_COLUMNS):
            stop = self.shards[shard_index].n_rows         # a head() view may end inside the shard
        stop = tensor_slice.get_shape()[0] if stop is None else stop
        return tensor_slice[start:stop]

    def read_shard(self, shard_index: int, name: str) -> torch.Tensor:
        tensor = self.read(shard_index, name)
        if name == "doc_id" and self.metas is not None and self.metas[shard_index] is not None \
                and len(tensor) == self.metas[shard_index].rows:
            store_index.check_doc_ids(self.path, self.metas[shard_index], tensor)
        return tensor

    def column(self, name: str) -> torch.Tensor:
        """A per-row column (doc_id, label, token_ids, position, window_index) over the whole store."""
        if name not in self._columns:
            self._columns[name] = torch.cat([self.read_shard(i, name) for i in range(len(self.shards))]) \
                if self.shards else torch.empty(0, dtype=torch.int64)
        return self._columns[name]

    def take(self, name: str, global_indices: torch.Tensor) -> torch.Tensor:
        """A per-row column's values at sorted global rows, read shard by shard (no whole-store column)."""
        global_indices = torch.as_tensor(global_indices, dtype=torch.int64)
        bounds = torch.tensor([s.start for s in self.shards] + [self.n_rows])
        cuts = torch.searchsorted(global_indices, bounds).tolist()
        pieces = []
        for shard_index, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            if a < b:
                local = global_indices[a:b] - self.shards[shard_index].start
                lo = int(local[0])
                pieces.append(self.read(shard_index, name, lo, int(local[-1]) + 1)[local - lo])
        return torch.cat(pieces) if pieces else self.read(0, name, 0, 0)

    def held_out_mask(self) -> torch.Tensor:
        """[n] bool: rows whose document is held out by the manifest's rule (O(rows): small stores only;
        big ones go through split_size / iter_rows(split=...) / train_batches)."""
        mask = torch.zeros(self.n_rows, dtype=torch.bool)
        for start, length in self.segments("held_out").pieces():
            mask[start:start + length] = True
        return mask

    def meta(self, shard_index: int) -> "store_index.ShardMeta":
        """A shard's metadata: from the store's index, or (a store written before it) computed once from
        the shard's doc_id column and kept in memory."""
        if self.metas is None:
            self.metas = [None] * len(self.shards)
        if self.metas[shard_index] is None:
            shard = self.shards[shard_index]
            self.metas[shard_index] = store_index.ShardMeta(
                shard.name, shard.n_rows, store_index.held_out_runs(self.read_shard(shard_index, "doc_id")))
        return self.metas[shard_index]

    def segments(self, split: str) -> Segments:
        """The rows of split "train" or "held_out" as runs of contiguous rows (a few per shard)."""
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', not {split!r}")
        if split not in self._segments:
            starts, lengths = [], []
            for i, shard in enumerate(self.shards):
                runs = self.meta(i).held_out_runs
                if split == "held_out":
                    starts += [shard.start + lo for lo, _ in runs]
                    lengths += [hi - lo for lo, hi in runs]
                else:
                    edges = [0] + [x for run in runs for x in run] + [shard.n_rows]
                    starts += [shard.start + lo for lo in edges[0::2]]
                    lengths += [hi - lo for lo, hi in zip(edges[0::2], edges[1::2])]
            self._segments[split] = Segments(starts, lengths)
        return self._segments[split]

    def split_size(self, split: str) -> int:
        """Rows in split "train" or "held_out", from the per-shard metadata (no row is read)."""
        return len(self.segments(split))

    def head(self, rows: int | None = None, held_out: int | None = None) -> "ActivationStore":
        """A view of the store's first shards, cut to its first `rows` rows, or to the rows up to the
        `held_out`-th held-out row (eval and analyze --max-tokens). Same manifest and shard names."""
        import copy
        if held_out is not None:
            segments = self.segments("held_out")
            rows = self.n_rows if held_out >= len(segments) else int(segments.rows_of(torch.tensor([held_out]))[0])
        if rows is None or rows >= self.n_rows:
            return self
        view = copy.copy(self)
        view.shards, view.metas, view._segments, view._columns = [], [], {}, {}
        for i, shard in enumerate(self.shards):
            if shard.start >= rows:
                break
            n = min(shard.n_rows, rows - shard.start)
            meta = self.meta(i)
            runs = [[lo, min(hi, n)] for lo, hi in meta.held_out_runs if lo < n]
            view.shards.append(ShardInfo(shard.name, n, shard.start))
            view.metas.append(store_index.ShardMeta(shard.name, n, runs))
        view.n_rows = rows
        return view

    def rows(self, layer, global_indices: torch.Tensor, tensor: str = "activations") -> torch.Tensor:
        """Activations of the given sorted global row indices, as float32. [len(idx), d_model].
        Sorted indices fall into each shard as one contiguous run: one gather per shard touched.
        tensor="targets": the same rows of the target site."""
        layer = self.resolve_layer(layer)
        name = f"{self._tensor(tensor)}.{layer}"
        global_indices = torch.as_tensor(global_indices, dtype=torch.int64)
        n = len(global_indices)
        if n == 0:
            return torch.empty(0, self.d_model, dtype=torch.float32)
        if bool((global_indices[1:] < global_indices[:-1]).any()):
            raise ValueError("ActivationStore.rows needs sorted indices")
        bounds = torch.tensor([s.start for s in self.shards] + [self.shards[-1].start + self.shards[-1].n_rows])
        cuts = torch.searchsorted(global_indices, bounds).tolist()        # where each shard's run begins
        out = None
        for shard_index, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            if a == b:
                continue
            local = global_indices[a:b] - self.shards[shard_index].start
            lo, hi = int(local[0]), int(local[-1]) + 1
            block = self.read(shard_index, name, lo, hi)[local - lo]       # [b - a, d_model]
            if a == 0 and b == n:
                return block.float()
            if out is None:
                out = torch.empty(n, self.d_model, dtype=torch.float32)
            out[a:b] = block
        return out

    def gather(self, layer, global_indices: torch.Tensor, tensor: str = "activations",
               dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Activations of global row indices in any order, as `dtype` [len(idx), d_model] (None: the stored
        dtype): one index_select per shard touched, straight from the memory map into place (no sort, no
        scatter). tensor="targets": the same rows of the target site (a transcoder's target)."""
        name = f"{self._tensor(tensor)}.{self.resolve_layer(layer)}"
        global_indices = torch.as_tensor(global_indices, dtype=torch.int64)
        starts = torch.tensor([s.start for s in self.shards])                       # [n_shards]
        shard_of = torch.searchsorted(starts, global_indices, right=True) - 1      # [n]
        first = int(shard_of[0]) if len(global_indices) else 0
        if len(self.shards) == 1 or bool((shard_of == first).all()):
            block = self.read(first, name).index_select(0, global_indices - self.shards[first].start)
            return block if dtype is None else block.to(dtype)
        out = None
        for shard_index in shard_of.unique().tolist():
            slots = (shard_of == shard_index).nonzero().squeeze(1)                 # [n_in_shard] places in out
            local = global_indices[slots] - self.shards[shard_index].start
            block = self.read(shard_index, name).index_select(0, local)
            if out is None:
                out = torch.empty(len(global_indices), self.d_model, dtype=dtype or block.dtype)
            out.index_copy_(0, slots, block.to(out.dtype))
        return out

    # ---- iteration -----------------------------------------------------------------------
    def activations(self, layer=None, batch_size: int = 8192, split: str | None = None,
                    dtype=torch.float32) -> Iterator[torch.Tensor]:
        """Every row once, in store order, as [batch, d_model] tensors.

        split: None (all rows), "train" or "held_out" (by the manifest's doc_id rule).
        """
        for batch, _ in self.iter_rows(layer, batch_size, split, dtype):
            yield batch

    def iter_rows(self, layer=None, batch_size: int = 8192, split: str | None = None, dtype=torch.float32):
        """Like activations(), but yields (batch, global_row_indices). With a split, the batches hold
        batch_size of the split's rows each (the last fewer), gathered across shards."""
        layer = self.resolve_layer(layer)
        if split is not None:   # contiguous pieces of the split, read straight from each shard's memory map
            segments, name = self.segments(split), f"activations.{layer}"
            starts = torch.tensor([s.start for s in self.shards])
            for lo in range(0, len(segments), batch_size):
                blocks, indices = [], []
                for start, length in segments.pieces(lo, lo + batch_size):
                    shard_index = int(torch.searchsorted(starts, torch.tensor(start), right=True)) - 1
                    local = start - self.shards[shard_index].start
                    blocks.append(self.read(shard_index, name, local, local + length).to(dtype))
                    indices.append(torch.arange(start, start + length))
                yield (blocks[0] if len(blocks) == 1 else torch.cat(blocks)), torch.cat(indices)
            return
        name = f"activations.{layer}"
        for shard_index, shard in enumerate(self.shards):
            for lo in range(0, shard.n_rows, batch_size):
                hi = min(lo + batch_size, shard.n_rows)
                yield self.read(shard_index, name, lo, hi).to(dtype), torch.arange(shard.start + lo, shard.start + hi)

    def split_indices(self, split: str) -> torch.Tensor:
        """[n_split] sorted global rows of a split (O(rows): small stores and old callers)."""
        return self.segments(split).all_rows()

    def _tensor(self, tensor: str) -> str:
        if tensor == "targets" and self.target_site is None:
            raise UserError(f"the store {self.path} holds no target site: collect it with --target-site "
                            f"(e.g. --site mlp_in --target-site mlp_out)")
        return tensor

    def train_batches(self, layer=None, batch_size: int = 1024, seed: int = 0, start_step: int = 0,
                      rank: int = 0, world_size: int = 1, chunk_rows: int = 2048, buffer_chunks: int = 32,
                      prefetch: int = 0, targets: bool = False, dtype: torch.dtype | None = torch.float32,
                      device: torch.device | None = None) -> Iterator[torch.Tensor]:
        """Endless shuffled training batches ([batch_size // world_size, d_model] in `dtype`; None: the stored
        dtype, so a bf16 store travels as bf16 and the trainer upcasts on the device). device: a CUDA device
        to copy each batch to, pinned and copied in the prefetch thread (non_blocking), off the training thread.

        Batch `step` is a pure function of (seed, step): a resumed run passes start_step and sees
        exactly the batches it would have seen. Under torch.distributed each rank gets its own
        contiguous slice of the same global batch. Memory is bounded by buffer_chunks × chunk_rows rows.
        targets=True: each batch is a pair (input rows, the same rows' target site), for transcoders.
        With prefetch > 0 a background thread produces batches that many ahead: worth it when a GPU does the
        training; on the CPU the thread competes with the training for the same cores (measured on 2 cores:
        56 ms a TopK step with it, 48.5 without), so the default reads each batch in line (about 0.3 ms at 1,024 × 576).
        """
        if batch_size % world_size:
            raise UserError(f"batch size {batch_size} is not divisible by the world size {world_size}")
        segments = self.segments("train")      # runs of training rows: memory in shards, not rows
        if len(segments) < batch_size:
            raise UserError(f"the store has {len(segments)} training rows, fewer than one batch of {batch_size}")
        layer = self.resolve_layer(layer)
        plan = BatchPlan(len(segments), batch_size, seed, chunk_rows, buffer_chunks)
        per_rank = batch_size // world_size

        if targets:
            self._tensor("targets")

        def load(idx):
            if not targets:
                return self.gather(layer, idx, dtype=dtype)
            return torch.stack([self.gather(layer, idx, dtype=dtype), self.gather(layer, idx, "targets", dtype)])  # [2, batch, d]

        def produce(step):
            positions = plan.positions(step)[rank * per_rank:(rank + 1) * per_rank]   # this rank's share
            batch = load(segments.rows_of(positions))
            if device is not None and torch.device(device).type == "cuda":
                batch = batch.pin_memory().to(device, non_blocking=True)
            return tuple(batch) if targets else batch

        yield from _prefetched(produce, start_step, prefetch)


def _prefetched(produce, start_step: int, depth: int):
    """Run produce(step) for step = start_step, start_step+1, ... in a background thread."""
    steps = (produce(step) for step in itertools.count(start_step))
    return steps if depth <= 0 else in_background(steps, depth)


_END = object()


def in_background(iterator, depth: int, name: str = "sae-prefetch"):
    """Yield iterator's items, produced by a daemon thread up to `depth` ahead (batches for training, packed
    windows for collection); its exceptions are re-raised here, and the thread stops when this generator does."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_END)
        except BaseException as error:  # noqa: BLE001 - surfaced in the consumer
            slots.put(error)

    thread = threading.Thread(target=worker, daemon=True, name=name)
    _LIVE_PREFETCHERS.append((stop, thread))
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            _LIVE_PREFETCHERS.remove((stop, thread))
        except (ValueError, AttributeError, TypeError):  # already gone, or interpreter shutting down
            pass


_LIVE_PREFETCHERS: list = []


@atexit.register
def _stop_prefetchers():
    """A daemon thread still inside torch at interpreter exit aborts the process: stop them first."""
    for stop, _ in _LIVE_PREFETCHERS:
        stop.set()
    for _, thread in _LIVE_PREFETCHERS:
        thread.join(timeout=5)

