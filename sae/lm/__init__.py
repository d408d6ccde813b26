"""Language models (the model stage): loading, sites, hooks.

    model.py    LoadedModel and what is read off a model (unembedding, description)
    loading.py  the embedded SmolLM2, hub ids and local folders -> LoadedModel
    sites.py    site names -> (module, input or output); --layers parsing
    hooks.py    capture a site's activation, replace it
    source.py   SourceOptions: the model, layers, site and data activations are read from

May import: sae.errors, sae.files, sae.kernels.matmul. Nothing else of the project.
"""
from sae.lm.hooks import StopForward, capture, replace_site, run_until_captured, site_width  # noqa: F401
from sae.lm.loading import (SMOLLM2, SMOLLM2_NOTE, load_model, load_tokenizer, smollm2_dir,  # noqa: F401
                            wrap)
from sae.lm.model import LoadedModel, check_context_size, describe, unembedding  # noqa: F401
from sae.lm.sites import SITES, SitePoint, block_list, layer_index, parse_layers, site_point  # noqa: F401
