"""Analysis (`sae analyze`, `sae export --format html`): the per-feature data the dashboard shows.

    pipeline.py      `analyze`: one streaming pass over the store, then the tables, written atomically
    feature_pass.py  per-batch feature statistics (density, histograms, top and sampled examples)
    topk_stream.py   the streaming top-k keeper
    tables.py        features.parquet, top_examples.parquet and the rest
    extras.py        logit effects, nearest features, token strings
    render.py        escaping and shading text for HTML (shared with the dashboard)
    html_export.py   static, self-contained HTML pages

May import: sae.errors, sae.files, sae.devices, sae.lm, sae.store, sae.runs. Never the trainer.
"""
from __future__ import annotations

import importlib

# name -> the submodule that defines it (imported on first use: importing the package stays light)
_EXPORTS = {
    "analyze": "sae.analyze.pipeline",
    "AnalyzeOptions": "sae.analyze.pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
