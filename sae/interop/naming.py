"""Hook names across tools: this project's (site, layer), TransformerLens hook names (SAELens) and
module paths (sparsify)."""
from __future__ import annotations

import re

# this project's site -> TransformerLens hook suffix inside blocks.{layer}
SITE_TO_HOOK = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "mlp_hidden": "mlp.hook_post",
    "mlp_in": "ln2.hook_normalized",      # what the MLP reads (a transcoder's input)
}
HOOK_TO_SITE = {hook: site for site, hook in SITE_TO_HOOK.items()}

# model names this project uses -> the Hugging Face id other tools expect
MODEL_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hook_name(site: str | None, layer) -> str | None:
    """TransformerLens hook name for a site and layer (blocks.6.hook_resid_post); a module path or an
    unknown site is returned as it is."""
    if site in SITE_TO_HOOK and layer is not None:
        return f"blocks.{layer}.{SITE_TO_HOOK[site]}"
    return site


def parse_hook(name: str | None) -> tuple[int | None, str | None]:
    """(layer, site) from a TransformerLens hook name; (layer or None, name) when the site is not ours."""
    if not name:
        return None, None
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match:
        layer, suffix = int(match.group(1)), match.group(2)
        return layer, HOOK_TO_SITE.get(suffix, name)
    return None, name


def parse_module_path(path: str | None) -> tuple[int | None, str | None]:
    """(layer, site) from a module path such as sparsify's hookpoints (layers.6 -> resid_post,
    layers.6.mlp -> mlp_out, layers.6.self_attn -> attn_out, h.6 for GPT-2)."""
    if not path:
        return None, None
    match = re.fullmatch(r"(?:.*\.)?(?:layers|h|layer|blocks)\.(\d+)(?:\.(\w+))?", path)
    if not match:
        return None, path
    layer, child = int(match.group(1)), match.group(2)
    site = {None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out",
            "attention": "attn_out"}.get(child, path)
    return layer, site
