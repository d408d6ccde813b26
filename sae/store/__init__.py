"""Activation stores: sharded safetensors files plus manifest.json, written by `sae collect` and by live
training's --save-activations, read by training, eval and analysis.

    layout.py   the manifest's name, the held-out rule, shard names, the manifest digest
    reader.py   ActivationStore: lazy, memory-mapped reading; seekable training batches
    writer.py   shards under a temporary name then renamed; from_tensors
    index.py    per-shard metadata (index.jsonl): rows, held-out row ranges, norm sums, a collection's progress
    split.py    the train / held-out split as runs of rows, and the shuffled batch plan over it

May import: sae.errors, sae.files. Nothing else of the project.
"""
from sae.files import write_atomic_bytes, write_json  # noqa: F401  (older import path)
from sae.store.layout import (FORMAT, HELD_OUT_MODULUS, HELD_OUT_RULE, MANIFEST, is_held_out,  # noqa: F401
                              manifest_digest, shard_name)
from sae.store.reader import ActivationStore, ShardInfo  # noqa: F401
from sae.store.writer import write_shard  # noqa: F401

from_tensors = ActivationStore.from_tensors
