"""Analysis (`sae analyze`, `sae export --format html`): the per-feature data the dashboard shows.

    pipeline.py      `analyze`: one streaming pass over the store, then the tables, written atomically
    feature_pass.py  per-batch feature statistics (density, histograms, top and sampled examples)
    topk_stream.py   the streaming top-k keeper
    bands.py         interval samples: per-band samples of each feature's full activation distribution
    tables.py        features.parquet, top_examples.parquet and the rest
    extras.py        logit effects, nearest features, token strings
    render.py        escaping and shading text for HTML (shared with the dashboard)
    html_export.py   static, self-contained HTML pages

May import: sae.errors, sae.files, sae.progress, sae.devices, sae.lm, sae.store, sae.runs. Never the trainer.
"""
from sae.lazy import exports

__getattr__, __all__ = exports(__name__, {
    "analyze": "sae.analyze.pipeline",
    "AnalyzeOptions": "sae.analyze.pipeline",
})
