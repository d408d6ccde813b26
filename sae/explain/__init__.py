"""Explanations (`sae explain`): a language model writes what each feature responds to, and the
explanation is scored on contexts the explainer never saw, beside a random-pairing control.

    contexts.py    the explaining and scoring contexts of a feature (top, interval samples, non-activating
                   ones: random spans and near misses from similar features); the two sets never share a window
    prompts.py     delphi-style prompts (activating tokens marked <<like this>>)
    explainers.py  the language models that write and judge: an in-process causal LM (batched), or an
                   OpenAI-compatible chat endpoint over HTTP
    scorers.py     detection and fuzzing (balanced accuracy), embedding (AUROC with a sentence embedder)
    writer.py      RUN/analysis/explanations.parquet, rewritten atomically after every batch (resumable)
    pipeline.py    `explain`: the loop over features, with the random-pairing controls

May import: sae.errors, sae.files, sae.devices, sae.progress, sae.lm, sae.store, sae.runs, sae.analyze (extras, the
run's layer folder).
Never the trainer, never the dashboard.
"""
from sae.lazy import exports

__getattr__, __all__ = exports(__name__, {
    "explain": "sae.explain.pipeline",
    "ExplainOptions": "sae.explain.pipeline",
})
