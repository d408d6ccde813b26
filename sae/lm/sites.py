"""Sites: where an activation is read, resolved to a module and whether its input or output is the activation.

A site is `resid_pre`, `resid_post`, `attn_out`, `mlp_out` (exactly what the attention / the MLP adds to the
residual stream: after Gemma 2/3- and OLMo 2-style post-norms; for post-LN BERT before the add and LayerNorm),
`mlp_in` (the MLP's input, after its pre-norm), `mlp_hidden` (the input of the MLP's output projection),
`attn_z` (the per-head attention outputs, flattened to [n_heads * d_head]: the input of the attention's
output projection), or any module path (`model.layers.6.mlp`; `{layer}` in a path is filled in; a `:input`
suffix reads the module's input). Module names are looked up and block structure is detected, so Llama-,
Mistral-, Qwen-, Gemma-, Phi-, GPT-2-, GPT-NeoX-, GPT-J- and BERT-style models work without per-model code.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sae.errors import UserError
from sae.lm.model import _hf

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_hidden", "mlp_in", "attn_z")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2", "wo", "dense_out")
_OPROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo")
# Blocks whose output is not resid_pre + attention + MLP (Gemma 3n AltUp/LAuReL, Gemma 4 per-layer inputs and
# layer scalar, Granite's residual multiplier): attn_out / mlp_out are refused there rather than approximated.
_UNSPLIT = ("altup", "laurel", "per_layer_input_gate", "layer_scalar", "residual_multiplier")


@dataclass
class SitePoint:
    module: nn.Module
    kind: str  # "input" or "output"
    path: str = ""


def block_list(model) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the transformer blocks: the longest ModuleList in the model."""
    model = _hf(model)
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    best = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if n_layers is not None and len(module) == n_layers:
                best = (path, module)
                break
            if best is None or len(module) > len(best[1]):
                best = (path, module)
    if best is None:
        raise UserError(f"{type(model).__name__} has no list of transformer blocks: use a module path as --site")
    return best


def _child(block: nn.Module, names, what: str, path: str) -> tuple[str, nn.Module]:
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise UserError(f"cannot find the {what} inside {path} ({type(block).__name__}): use a module path as --site")


def _check_layer(model, layer) -> int:
    _, blocks = block_list(model)
    if not isinstance(layer, int) or isinstance(layer, bool):
        try:
            layer = int(layer)
        except (TypeError, ValueError):
            raise UserError(f"layer {layer!r} is not an integer") from None
    if not 0 <= layer < len(blocks):
        raise UserError(f"layer {layer} is out of range: this model has layers 0..{len(blocks) - 1}")
    return layer


def site_point(model, site: str, layer) -> SitePoint:
    """The module whose input or output (first element when a tuple) is `site` at `layer`."""
    hf = _hf(model)
    if site not in SITES:
        return _module_path_point(hf, site, layer)
    layer = _check_layer(hf, layer)
    blocks_path, blocks = block_list(hf)
    block = blocks[layer]
    base = f"{blocks_path}.{layer}"
    if site == "resid_pre":
        return SitePoint(block, "input", base)
    if site == "resid_post":
        return SitePoint(block, "output", base)
    post_ln = _is_post_ln(block)
    if site in ("attn_out", "mlp_out") and not post_ln:
        _check_split(block, site, base)
    if site == "attn_out":
        if post_ln:  # BERT: attention.output.dense -> dropout -> LayerNorm(x + residual)
            return SitePoint(block.attention.output.dropout, "output", f"{base}.attention.output.dropout")
        if _is_sandwich(block):  # Gemma 2/3, OLMo 2: residual + post_attention_layernorm(attention(...))
            return SitePoint(block.post_attention_layernorm, "output", f"{base}.post_attention_layernorm")
        name, attn = _child(block, _ATTN_NAMES, "attention", base)
        return SitePoint(attn, "output", f"{base}.{name}")
    if site == "attn_z":  # the input of the attention's output projection
        if post_ln:
            return SitePoint(block.attention.output.dense, "input", f"{base}.attention.output.dense")
        name, attn = _child(block, _ATTN_NAMES, "attention", base)
        if isinstance(attn, nn.MultiheadAttention):  # its out_proj weights are used without calling the module
            raise UserError(f"attn_z: the attention in {base} ({type(attn).__name__}) does not expose its output "
                            "projection as a module: use another site")
        proj_name, proj = _child(attn, _OPROJ_NAMES, "attention output projection (for attn_z)", f"{base}.{name}")
        return SitePoint(proj, "input", f"{base}.{name}.{proj_name}")
    if site == "mlp_out":
        if post_ln:
            return SitePoint(block.output.dropout, "output", f"{base}.output.dropout")
        if _is_sandwich(block):
            return SitePoint(block.post_feedforward_layernorm, "output", f"{base}.post_feedforward_layernorm")
        name, mlp = _child(block, _MLP_NAMES, "MLP", base)
        return SitePoint(mlp, "output", f"{base}.{name}")
    if site == "mlp_in":  # what the MLP reads (after its pre-norm): what transcoders take
        if post_ln:
            return SitePoint(block.intermediate, "input", f"{base}.intermediate")
        name, mlp = _child(block, _MLP_NAMES, "MLP", base)
        return SitePoint(mlp, "input", f"{base}.{name}")
    # mlp_hidden: the input of the MLP's output projection
    if post_ln:
        return SitePoint(block.output.dense, "input", f"{base}.output.dense")
    name, mlp = _child(block, _MLP_NAMES, "MLP", base)
    down_name, down = _child(mlp, _DOWN_NAMES, "MLP output projection", f"{base}.{name}")
    return SitePoint(down, "input", f"{base}.{name}.{down_name}")


def _is_sandwich(block: nn.Module) -> bool:
    """A norm on each sublayer's output before the residual add (Gemma 2/3, OLMo 2). Told by structure, not by
    name alone: Llama's post_attention_layernorm is the MLP's pre-norm; only with a post_feedforward_layernorm
    beside it is it the attention's post-norm."""
    return (isinstance(getattr(block, "post_feedforward_layernorm", None), nn.Module)
            and isinstance(getattr(block, "post_attention_layernorm", None), nn.Module))


def _check_split(block: nn.Module, site: str, base: str) -> None:
    found = [name for name in _UNSPLIT if hasattr(block, name)]
    if found:
        raise UserError(f"{site}: {type(block).__name__} ({base}) does not add just attention + MLP to the residual "
                        f"stream (it has {found[0]}): use resid_pre/resid_post, mlp_in, attn_z or a module path")


def _is_post_ln(block: nn.Module) -> bool:
    attention = getattr(block, "attention", None)
    output = getattr(block, "output", None)
    return (attention is not None and hasattr(getattr(attention, "output", None), "LayerNorm")
            and output is not None and hasattr(output, "LayerNorm"))


def _module_path_point(hf: nn.Module, site: str, layer) -> SitePoint:
    path, kind = site, "output"
    if path.endswith(":input") or path.endswith(":output"):
        path, kind = path.rsplit(":", 1)
    if "{layer}" in path:
        path = path.replace("{layer}", str(_check_layer(hf, layer)))
    try:
        if not path:
            raise AttributeError(path)
        module = hf.get_submodule(path)
    except AttributeError:
        raise UserError(f"unknown site {site!r}: use one of {', '.join(SITES)} or a module path "
                        f"such as {block_list(hf)[0]}.0.mlp") from None
    return SitePoint(module, kind, path)


def parse_layers(text) -> list[int]:
    """'3,6,9' (or [3, 6, 9]) -> [3, 6, 9]; what --layers takes everywhere. A layer listed twice is refused."""
    items = [str(x).strip() for x in text] if isinstance(text, (list, tuple)) else \
        [part.strip() for part in str(text).split(",")]
    items = [item for item in items if item]
    if not items:
        raise UserError("--layers names no layer: give one, e.g. --layers 6 or --layers 3,6,9")
    bad = [item for item in items if not item.lstrip("-").isdigit()]
    if bad:
        raise UserError(f"--layers {text!r}: {bad[0]!r} is not a layer index (give e.g. 6 or 3,6,9)")
    layers = [int(item) for item in items]
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise UserError(f"--layers lists layer {repeated[0]} more than once")
    return layers


def layer_index(model, site: str, layer) -> int:
    """The block index a site point lives in (for early stopping order); module paths outside blocks: -1."""
    point = site_point(model, site, layer)
    blocks_path, _ = block_list(model)
    prefix = blocks_path + "."
    if point.path.startswith(prefix):
        return int(point.path[len(prefix):].split(".")[0])
    return -1
