"""Per-shard metadata, kept beside manifest.json as each shard is written, so that opening a store, its
held-out split and a shuffled epoch cost memory in the number of shards, not rows.

STORE/index.jsonl (under torchrun, index_rNNN.jsonl per rank until the run finishes) holds one JSON
object a shard, appended (and fsynced) right after the shard is renamed into place:

    {"name": ..., "rows": n, "bytes": file size, "held_out": count,
     "held_out_runs": [[lo, hi], ...],        # local row ranges of held-out rows (sorted, disjoint)
     "norm_sum": {layer: Σ‖x‖}, "norm_sq_sum": {layer: Σ‖x‖²},
     "progress": {...}}                         # collection only: how far the run got (for --resume)

Stores written before this file existed still open: their metadata is computed once, in memory, from
the shards' doc_id columns (sae.store.reader).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae.errors import UserError
from sae.store.layout import is_held_out

INDEX = "index.jsonl"


def rank_index(rank: int) -> str:
    return f"index_r{rank:03d}.jsonl"


@dataclass
class ShardMeta:
    name: str
    rows: int
    held_out_runs: list            # [[lo, hi], ...] local, sorted, disjoint
    bytes: int | None = None
    norm_sum: dict = field(default_factory=dict)
    norm_sq_sum: dict = field(default_factory=dict)
    progress: dict | None = None

    @property
    def held_out(self) -> int:
        return sum(hi - lo for lo, hi in self.held_out_runs)

    def to_json(self) -> dict:
        body = {"name": self.name, "rows": self.rows, "bytes": self.bytes, "held_out": self.held_out,
                "held_out_runs": self.held_out_runs, "norm_sum": self.norm_sum, "norm_sq_sum": self.norm_sq_sum}
        if self.progress is not None:
            body["progress"] = self.progress
        return body

    @classmethod
    def from_json(cls, body: dict, where: str) -> "ShardMeta":
        try:
            meta = cls(str(body["name"]), int(body["rows"]), [[int(lo), int(hi)] for lo, hi in body["held_out_runs"]],
                       None if body.get("bytes") is None else int(body["bytes"]), dict(body.get("norm_sum") or {}),
                       dict(body.get("norm_sq_sum") or {}), body.get("progress"))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where} is damaged: a line lacks name, rows or held_out_runs") from None
        last = 0
        for lo, hi in meta.held_out_runs:
            if not last <= lo < hi <= meta.rows:
                raise UserError(f"{where} is damaged: shard {meta.name} has held-out rows [{lo}, {hi}) outside "
                                f"its {meta.rows} rows or out of order")
            last = hi
        if "held_out" in body and int(body["held_out"]) != meta.held_out:
            raise UserError(f"{where} is damaged: shard {meta.name} counts {body['held_out']} held-out rows, its "
                            f"ranges hold {meta.held_out}")
        return meta


def held_out_runs(doc_ids: torch.Tensor) -> list:
    """[n] doc ids -> [[lo, hi], ...] the maximal runs of held-out rows (by the store's rule)."""
    mask = is_held_out(doc_ids).to(torch.int8)                       # [n]
    if len(mask) == 0:
        return []
    edges = torch.diff(mask, prepend=torch.zeros(1, dtype=torch.int8), append=torch.zeros(1, dtype=torch.int8))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    stops = (edges == -1).nonzero().squeeze(1).tolist()
    return [[lo, hi] for lo, hi in zip(starts, stops)]


def shard_meta(name: str, tensors: dict, layers, path: Path | None = None, norms: torch.Tensor | None = None,
               progress: dict | None = None) -> ShardMeta:
    """The metadata of a shard about to be (or just) written. norms: [n, L] float32 row norms per layer
    when the caller has them (collection does), else computed from the activations."""
    rows = int(tensors["doc_id"].shape[0])
    norm_sum, norm_sq_sum = {}, {}
    for i, layer in enumerate(layers):
        layer_norms = norms[:, i].double() if norms is not None else \
            tensors[f"activations.{layer}"].float().norm(dim=-1).double()          # [n]
        norm_sum[str(layer)] = float(layer_norms.sum())
        norm_sq_sum[str(layer)] = float(layer_norms.square().sum())
    size = path.stat().st_size if path is not None and path.exists() else None
    return ShardMeta(name, rows, held_out_runs(tensors["doc_id"]), size, norm_sum, norm_sq_sum, progress)


def append(folder: Path, meta: ShardMeta, index: str = INDEX) -> int:
    """Append one shard's line to the index and fsync it. Returns the bytes written."""
    line = (json.dumps(meta.to_json(), separators=(",", ":")) + "\n").encode()
    path = Path(folder) / index
    with open(path, "ab") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    return len(line)


def read(folder: Path, index: str = INDEX, repair: bool = False) -> list[ShardMeta] | None:
    """The index's shards in order, or None when there is no index. A last line cut short by a crash is
    ignored (and, with repair, cut off the file so that appending goes on cleanly)."""
    path = Path(folder) / index
    if not path.is_file():
        return None
    raw = path.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1]           # a torn last line has no newline
    if repair and len(keep) != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(len(keep))
    metas = []
    for number, line in enumerate(keep.decode("utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                body = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{number} is damaged (not JSON)") from None
            metas.append(ShardMeta.from_json(body, f"{path}:{number}"))
    return metas


def write(folder: Path, metas: list[ShardMeta], index: str = INDEX) -> None:
    """Write a whole index at once (temporary file, then rename): from_tensors and a finished torchrun run."""
    from sae.files import write_atomic_bytes
    payload = "".join(json.dumps(m.to_json(), separators=(",", ":")) + "\n" for m in metas).encode()
    write_atomic_bytes(Path(folder) / index, payload)


def read_all(folder: Path) -> list[ShardMeta] | None:
    """index.jsonl, or else the ranks' index_rNNN.jsonl of an unfinished torchrun collection (rank-major)."""
    metas = read(folder)
    if metas is not None:
        return metas
    rank_files = sorted(Path(folder).glob("index_r[0-9][0-9][0-9].jsonl"))
    if not rank_files:
        return None
    return [meta for path in rank_files for meta in read(folder, path.name)]


def resolve(folder: Path, manifest: dict) -> tuple[list, list | None, list[ShardMeta] | None]:
    """(shard names, their row counts or None, their metadata or None) of a store. A finished store lists its
    shards in the manifest; one still being collected (or killed) lists them in its index only."""
    names = list(manifest.get("shards") or [])
    metas = read_all(folder)
    if metas is None:
        return names, manifest.get("shard_rows"), None
    if not names and not manifest.get("complete", True):
        return [m.name for m in metas], [m.rows for m in metas], metas
    by_name = {m.name: m for m in metas}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise UserError(f"{folder} is damaged: its per-shard metadata ({INDEX}) lacks shard {missing[0]} "
                        f"(and {len(missing) - 1} more)" if len(missing) > 1 else
                        f"{folder} is damaged: its per-shard metadata ({INDEX}) lacks shard {missing[0]}")
    return names, manifest.get("shard_rows"), [by_name[name] for name in names]


def check(folder: Path, meta: ShardMeta, rows: int) -> None:
    """Refuse, in one line, a shard whose metadata disagrees with the file (its rows or its size)."""
    where = f"{folder} is damaged: the per-shard metadata of {meta.name}"
    if meta.rows != rows:
        raise UserError(f"{where} says {meta.rows} rows, the shard holds {rows}")
    if meta.bytes is not None:
        size = (Path(folder) / meta.name).stat().st_size
        if size != meta.bytes:
            raise UserError(f"{where} says {meta.bytes} bytes, the file has {size}")


def check_doc_ids(folder: Path, meta: ShardMeta, doc_ids: torch.Tensor) -> None:
    """Refuse a shard whose recorded held-out rows are not those of its doc_id column."""
    if held_out_runs(doc_ids) != meta.held_out_runs:
        raise UserError(f"{folder} is damaged: the per-shard metadata of {meta.name} records {meta.held_out} "
                        f"held-out rows that its doc_id column does not match ({int(is_held_out(doc_ids).sum())} "
                        f"held-out rows)")
