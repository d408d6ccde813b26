"""Writing stores: one shard at a time under a temporary name (then renamed), and `from_tensors` for
activations a user already has."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae.errors import UserError
from sae.files import replace_durably, write_json
from sae.store import index as store_index
from sae.store.layout import FORMAT, HELD_OUT_MODULUS, HELD_OUT_RULE, MANIFEST, shard_name


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write one safetensors shard under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    replace_durably(tmp, path)


def write_from_tensors(path, activations: torch.Tensor, layer=0, overwrite: bool = False, shard_rows: int = 65536,
                 model: str | None = None, site: str | None = None, dataset: str | None = None,
                 targets: torch.Tensor | None = None, target_site: str | None = None, **optional_columns) -> Path:
    """Write a store from activations a user already has ([n, d] tensor) plus optional per-row columns
    (doc_id, label, token_ids, position, window_index; window_tokens is per shard and not accepted here).
    Rows without doc_id get doc_id = row index // 128 (pseudo-documents for the held-out rule).
    targets ([n, d], with target_site naming it): each row's transcoder target, stored as targets.<layer>."""
    path = Path(path)
    activations = torch.as_tensor(activations)
    if activations.ndim != 2 or activations.shape[0] == 0:
        raise UserError(f"activations must be a non-empty [n, d] tensor, got shape {tuple(activations.shape)}")
    if activations.is_floating_point() and not bool(torch.isfinite(activations).all()):
        bad = int((~torch.isfinite(activations)).any(dim=1).sum())
        raise UserError(f"activations hold NaN or Inf in {bad} of {activations.shape[0]} rows: drop or fix them first")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} is not empty: refusing to overwrite it")
    path.mkdir(parents=True, exist_ok=True)
    n, d_model = activations.shape
    columns = {k: torch.as_tensor(v) for k, v in optional_columns.items() if v is not None}
    for name, column in columns.items():
        if column.shape[0] != n:
            raise UserError(f"column {name} has {column.shape[0]} rows, activations have {n}")
    columns.setdefault("doc_id", torch.arange(n, dtype=torch.int64) // 128)
    if (targets is None) != (target_site is None) or (targets is not None and tuple(targets.shape) != (n, d_model)):
        raise UserError(f"targets need a target_site and the activations' shape {(n, d_model)}")
    dtypes = {"doc_id": torch.int64, "label": torch.int64, "window_index": torch.int64,
              "token_ids": torch.int32, "position": torch.int32}
    shards, shard_rows_list, metas = [], [], []
    for i, lo in enumerate(range(0, n, shard_rows)):
        hi = min(lo + shard_rows, n)
        tensors = {f"activations.{layer}": activations[lo:hi]}
        if targets is not None:
            tensors[f"targets.{layer}"] = torch.as_tensor(targets)[lo:hi].to(activations.dtype)
        for name, column in columns.items():
            tensors[name] = column[lo:hi].to(dtypes.get(name, column.dtype))
        name = shard_name(i)
        write_shard(path / name, tensors)
        metas.append(store_index.shard_meta(name, tensors, [layer], path / name))
        shards.append(name)
        shard_rows_list.append(hi - lo)
    manifest = {
        "format": FORMAT,
        "model": model, "layers": [layer], "site": site, "d_model": int(d_model), "n_tokens": int(n),
        **({"target_site": target_site} if target_site is not None else {}),
        "context_size": None, "dataset": dataset, "dtype": str(activations.dtype).replace("torch.", ""),
        "shards": shards, "shard_rows": shard_rows_list,
        "held_out": {"rule": HELD_OUT_RULE, "modulus": HELD_OUT_MODULUS},
        "source": "from_tensors",
    }
    store_index.write(path, metas)     # per-shard metadata first: the manifest names a finished store
    write_json(path / MANIFEST, manifest)
    return path

