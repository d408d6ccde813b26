"""What a store is on disk: the manifest's name, the held-out rule, shard names, the manifest digest.
Format reference: docs/files.md."""
from __future__ import annotations

import hashlib
import json

import torch

FORMAT = "sae-activation-store/1"
MANIFEST = "manifest.json"
HELD_OUT_MODULUS = 20
HELD_OUT_RULE = "(doc_id * 2654435761) mod 2**32 mod 20 == 0"


def is_held_out(doc_ids: torch.Tensor) -> torch.Tensor:
    """The fixed held-out rule on document ids (about 1 document in 20). [n] int64 -> [n] bool."""
    doc_ids = torch.as_tensor(doc_ids, dtype=torch.int64)
    return ((doc_ids * 2654435761) % (2**32)) % HELD_OUT_MODULUS == 0


def shard_name(index: int, rank: int | None = None) -> str:
    return f"shard_{index:05d}.safetensors" if rank is None else f"shard_r{rank:03d}_{index:05d}.safetensors"


def manifest_digest(manifest: dict) -> str:
    """A short digest of what defines a store's contents (for config.json of runs trained on it)."""
    keys = ["model", "layers", "site", "d_model", "n_tokens", "context_size", "dataset", "dtype", "shards"]
    blob = json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
