"""Training (`sae train`): one trainer for every registered variant, on a store or live from a model.

    trainer.py    TrainOptions, Trainer (the step, schedules, dead latents, logging), train_on_store
    checkpoint.py run-folder checkpoints and resume
    optim.py      Adam with the unit-norm decoder's renormalisation in the same pass
    report.py     what a finished run prints
    live.py       live training: one SAE per layer from one forward pass (`sae train --model`)
    producer.py   live training's producer thread and its --save-activations writer
    sharded.py    --shard-latents: the latents of one very wide TopK SAE split across ranks

May import: sae.errors, sae.files, sae.devices, sae.distributed, sae.data, sae.lm, sae.store, sae.collect,
sae.variants, sae.kernels, sae.runs, sae.interop, sae.evaluate.scores. Never the commands or the dashboard.
"""
from __future__ import annotations

import importlib

# name -> the submodule that defines it (imported on first use: importing the package stays light)
_EXPORTS = {
    "TrainOptions": "sae.train.options",
    "Trainer": "sae.train.trainer",
    "train_on_store": "sae.train.trainer",
    "TrainingDiverged": "sae.train.options",
    "LiveOptions": "sae.train.live",
    "train_live": "sae.train.live",
    "train_sharded_on_store": "sae.train.sharded",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
