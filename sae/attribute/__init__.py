"""Attribution graphs (`sae attribute`): which features made the model say this.

    frozen.py       norm scales and attention patterns frozen at the clean forward (hooks, attention function)
    replacement.py  the local replacement model: MLPs -> transcoder prediction + fixed error; sources layout
    sources.py      RUN folders -> one transcoder (or mlp_out SAE) per layer, checked against the model
    effects.py      direct effects: batched backward passes, contracted with every source's vector
    prune.py        influence on the target (normalised adjacency) and node/edge pruning
    graph.py        the GRAPH.json object (nodes, edges)
    pipeline.py     AttributeOptions and attribute(): the whole command

May import: sae.errors, sae.files, sae.lm, sae.runs, sae.variants. Never the trainer, collect, the commands or
the dashboard (the dashboard reads GRAPH.json files only).
"""
from sae.lazy import exports

__getattr__, __all__ = exports(__name__, {
    "attribute": "sae.attribute.pipeline",
    "AttributeOptions": "sae.attribute.pipeline",
    "ReplacementModel": "sae.attribute.replacement",
    "Part": "sae.attribute.replacement",
    "direct_effect_rows": "sae.attribute.effects",
    "prune": "sae.attribute.prune",
})
