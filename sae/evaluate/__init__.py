"""Evaluation (`sae eval`, `sae sweep`): scoring trained SAEs.

    scores.py    the one held-out scorer (FVU, MSE, L0, dead fraction ...), used by eval AND by training's summary
    metrics.py   `evaluate`: reconstruction, downstream (spliced CE/KL) and probing figures -> RUN/eval.json
    probing.py   sparse probing on the store's labels
    splice.py    an SAE's reconstruction in place of a site's activation (sae.splice), zero ablation
    sweep.py     a grid of variants trained and scored in one pass over the data

May import: sae.errors, sae.files, sae.devices, sae.distributed, sae.lm, sae.store, sae.variants, sae.runs,
sae.interop; sweep.py also sae.train. Never the commands or the dashboard.
"""
from sae.lazy import exports

__getattr__, __all__ = exports(__name__, {
    "evaluate": "sae.evaluate.metrics",
    "format_table": "sae.evaluate.metrics",
    "EVAL_FILE": "sae.evaluate.metrics",
    "splice": "sae.evaluate.splice",
    "zero_ablate": "sae.evaluate.splice",
    "run_sweep": "sae.evaluate.sweep",
})
