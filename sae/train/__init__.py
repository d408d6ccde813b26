"""Training (`sae train`): one trainer for every registered variant, on a store or live from a model.

    trainer.py    TrainOptions, Trainer (the step, schedules, dead latents, logging), train_on_store
    checkpoint.py run-folder checkpoints and resume
    schedule.py   --checkpoint-every: steps (500) or wall time (10m)
    parallel.py   the loss module DistributedDataParallel wraps (no unused-parameter search for the TopK family)
    optim.py      Adam with the unit-norm decoder's renormalisation in the same pass
    report.py     what a finished run prints
    live.py       live training: one SAE per layer from one forward pass (`sae train --model`)
    producer.py   live training's producer thread and its --save-activations writer
    sharded.py    --shard-latents: the latents of one very wide TopK SAE split across ranks
    sharded_checkpoint.py  a sharded run's checkpoints: one part per rank and a completion marker; --resume
    finetune.py   --init-from RUN: start from an existing SAE's weights (ours or what sae.load opens)
    loggers.py    --log wandb|tensorboard|none: every training path's metrics and final eval, one run per folder

May import: sae.errors, sae.files, sae.progress, sae.devices, sae.distributed, sae.data, sae.lm, sae.store, sae.collect,
sae.variants, sae.kernels, sae.runs, sae.interop, sae.evaluate.scores. Never the commands or the dashboard.
"""
from sae.lazy import exports

__getattr__, __all__ = exports(__name__, {
    "TrainOptions": "sae.train.options",
    "Trainer": "sae.train.trainer",
    "train_on_store": "sae.train.trainer",
    "TrainingDiverged": "sae.train.options",
    "LiveOptions": "sae.train.live",
    "train_live": "sae.train.live",
    "train_sharded_on_store": "sae.train.sharded",
})
