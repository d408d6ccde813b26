"""Collection (`sae collect`): run a language model over a dataset's packed windows and write one site's
activations at several layers to an activation store.

    loop.py   the collection loop: options, resume bookkeeping, shards, the manifest, norm statistics
    rows.py   the rows one batch contributes, and a shard's tensors
    ranks.py  under torchrun: each rank's share of the documents, window numbers, its share of --tokens
    progress.py  the run's progress appended to the store's per-shard index; --resume rebuilt from it
    norms.py  the stored rows' norm statistics, kept while collecting
    shard_writer.py  the background thread that writes finished shards, in order, while the model runs
    early.py  what is settled before the model loads: an already complete store, the layers; the empty
              folder a failed run leaves

May import: sae.errors, sae.files, sae.progress, sae.distributed, sae.devices, sae.data, sae.lm, sae.store.
"""
from sae.collect.loop import CollectOptions, CollectResult, collect  # noqa: F401
