"""A collection's progress on disk: one line appended to the store's per-shard index (sae.store.index) per
shard written, so the manifest is written only when a run starts and when it finishes (bytes written grow
with the store, not with the square of its shard count).

Each line carries the shard's metadata and `progress`: how far this rank got (next_window, rows,
norm_median, batch_size). `--resume` rebuilds its state from the index; a store written before the index
existed is resumed from its manifest (or torchrun progress file) and gets its index first.
"""
from __future__ import annotations

from pathlib import Path

from sae.files import read_json
from sae.store import index as store_index

PROGRESS_KEYS = ("next_window", "rows", "norm_median", "batch_size")


def index_name(d) -> str:
    """This rank's index file: index.jsonl, or index_rNNN.jsonl under torchrun (merged when the run ends)."""
    return store_index.rank_index(d.rank) if d.enabled else store_index.INDEX


def progress_path(out: Path, rank: int) -> Path:
    return out / f"progress_r{rank:03d}.json"


def small_state(state: dict) -> dict:
    """The state without its shard lists (those are in the index)."""
    return {k: v for k, v in state.items() if k not in ("shards", "shard_rows")}


def restore(out: Path, d, old_manifest: dict, state: dict, layers) -> None:
    """Fill `state` from a store being resumed (see the module docstring)."""
    metas = store_index.read(out, index_name(d), repair=True)
    if metas is None:    # a store from before the index: its manifest (or progress file) has the lists
        saved = old_manifest.get("progress", {}).get(str(d.rank)) if not d.enabled \
            else read_json(progress_path(out, d.rank), missing_ok=True)
        if saved:
            state.update(saved)
        from safetensors import safe_open
        for name in state["shards"]:      # its metadata, once, from the shards themselves
            with safe_open(str(out / name), framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys() if key == "doc_id"
                           or key in {f"activations.{layer}" for layer in layers}}
            store_index.append(out, store_index.shard_meta(name, tensors, layers, out / name), index_name(d))
        return
    state["shards"] = [m.name for m in metas]
    state["shard_rows"] = [m.rows for m in metas]
    state["rows"] = sum(state["shard_rows"])
    if metas and metas[-1].progress:
        state.update({k: v for k, v in metas[-1].progress.items() if k in PROGRESS_KEYS})
    finished = old_manifest.get("progress", {}).get(str(d.rank)) if not d.enabled \
        else read_json(progress_path(out, d.rank), missing_ok=True)
    if finished and finished.get("rows") == state["rows"]:   # a finished run: its last word on the state
        state.update({k: v for k, v in finished.items() if k in PROGRESS_KEYS + ("exhausted",)})
    for rank in range(d.world_size if d.enabled and state.get("norm_median") is None else 0):
        other = store_index.read(out, store_index.rank_index(rank)) or []
        saved = (other[-1].progress if other else None) or read_json(progress_path(out, rank), missing_ok=True) or {}
        if saved.get("norm_median") is not None:
            state["norm_median"] = saved["norm_median"]
            break


def record(out: Path, d, name: str, tensors: dict, layers, norms, state: dict) -> int:
    """Append a just-written shard's line (metadata + progress) to this rank's index. Returns bytes written."""
    meta = store_index.shard_meta(name, tensors, layers, out / name, norms,
                                  {k: state[k] for k in PROGRESS_KEYS if k in state})
    return store_index.append(out, meta, index_name(d))


def merge_ranks(out: Path, world_size: int) -> list:
    """Rank 0, at the end of a torchrun collection: the ranks' indexes as one index.jsonl (rank-major)."""
    metas = [m for rank in range(world_size) for m in (store_index.read(out, store_index.rank_index(rank)) or [])]
    store_index.write(out, metas)
    return metas
