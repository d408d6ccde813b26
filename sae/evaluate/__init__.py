"""Evaluation (`sae eval`, `sae sweep`): scoring trained SAEs.

    scores.py    the one held-out scorer (FVU, MSE, L0, dead fraction ...), used by eval AND by training's summary
    metrics.py   `evaluate`: reconstruction, downstream (spliced CE/KL) and probing figures -> RUN/eval.json
    probing.py   sparse probing on the store's labels
    absorption.py  first-letter feature absorption (SAEBench)
    tpp.py       targeted probe perturbation on the store's labels (SAEBench)
    splice.py    an SAE's reconstruction in place of a site's activation (sae.splice), zero ablation
    steer.py     features set to chosen values / removed at a site (sae.steer, sae.ablate)
    sweep.py     a grid of variants trained and scored in one pass over the data
    grid.py      a sweep's grid file: one entry per SAE with its own variant, knobs, width and learning rate

May import: sae.errors, sae.files, sae.devices, sae.distributed, sae.lm, sae.store, sae.variants, sae.runs,
sae.interop; sweep.py also sae.train. Never the commands or the dashboard.
"""
from sae.lazy import exports

# sae sweep's training budget per SAE (here, not in sweep.py, so that `sae sweep --help` shows it without torch):
# the default grid (23 SAEs at 8×) trains in about 10 minutes on 2 CPU cores
DEFAULT_TOKENS = 65_536

__getattr__, __all__ = exports(__name__, {
    "evaluate": "sae.evaluate.metrics",
    "format_table": "sae.evaluate.metrics",
    "EVAL_FILE": "sae.evaluate.metrics",
    "splice": "sae.evaluate.splice",
    "zero_ablate": "sae.evaluate.splice",
    "run_sweep": "sae.evaluate.sweep",
})
