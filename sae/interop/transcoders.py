"""Transcoders in other tools' layouts, out and back in (sae.variants.transcoder).

SAELens (6.x) transcoders read x (d_in) and predict y (d_out), in raw units, with no input centring:
    transcoder / skip_transcoder:                   codes = relu(x @ W_enc + b_enc)
    jumprelu_transcoder / jumprelu_skip_transcoder: pre = x @ W_enc + b_enc; codes = relu(pre) * (pre > threshold)
    y_hat = codes @ W_dec + b_dec (+ x @ W_skipᵀ, W_skip [d_out, d_in], for the skip kinds)
sparsify (cfg "transcode": true, "skip_connection"): codes = topk_k(relu(x @ encoder.weightᵀ + encoder.bias)),
    y_hat = codes @ W_dec + b_dec (+ x @ W_skipᵀ): no input centring either.
This project's variants centre the scaled input by b_dec (a target-space bias for a transcoder) and scale input
and target separately: export folds input_scale into W_enc and W_skip, target_scale into W_dec, b_dec and W_skip,
and b_dec·W_enc into the encoder bias; import does the reverse with both scales at 1. The codes are identical.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sae.errors import UserError
from sae.interop.variant_params import assign_params, centres_input, encoder_values, read_encoder, threshold_of

# this project's variant -> SAELens transcoder architecture (the skip kinds add "skip_")
SAELENS_EXPORTABLE = {"l1": "transcoder", "relu": "transcoder", "denoising": "transcoder",
                      "jumprelu": "jumprelu_transcoder", "batchtopk": "jumprelu_transcoder",
                      "matryoshka": "jumprelu_transcoder"}
SAELENS_ARCHITECTURES = {"transcoder": ("l1", False), "skip_transcoder": ("l1", True),
                         "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}


@torch.no_grad()
def raw_weights(model) -> dict:
    """W_enc [d_in, d_sae], b_enc [d_sae] (uncentred), W_dec [d_sae, d_in], b_dec [d_in], W_skip [d_out, d_in]
    (absent without skip), all in raw units: what both layouts hold."""
    x_scale, y_scale = float(model.input_scale), float(model.target_scale)
    W_enc, b_enc = (t.detach().float().cpu() for t in read_encoder(model))
    b_dec = model.b_dec.detach().float().cpu()                    # scaled target units
    if centres_input(model):
        b_enc = b_enc - b_dec @ W_enc                             # (x_s − b_dec) W + b  ==  x_s W + (b − b_dec W)
    out = {"W_enc": W_enc * x_scale, "b_enc": b_enc, "W_dec": model.W_dec.detach().float().cpu() / y_scale,
           "b_dec": b_dec / y_scale}
    if model.skip:
        out["W_skip"] = model.W_skip.detach().float().cpu() * (x_scale / y_scale)
    return {name: value.contiguous() for name, value in out.items()}


def build(variant: str, d_in: int, d_sae: int, skip: bool, weights: dict, knobs: dict | None = None):
    """A transcoder module of `variant` computing the layouts' function from raw weights (scales at 1)."""
    from sae.variants.transcoder import make_transcoder
    model = make_transcoder(variant, d_in, d_sae, skip=skip, **(knobs or {}))
    W_enc, b_enc, b_dec = weights["W_enc"], weights["b_enc"], weights["b_dec"]
    if centres_input(model):                                      # our encoder subtracts b_dec: add it back
        b_enc = b_enc + b_dec @ W_enc
    values = {"W_dec": weights["W_dec"], "b_dec": b_dec, **encoder_values(model, W_enc, b_enc)}
    if "threshold" in weights:
        values["threshold"] = weights["threshold"]
    if skip:
        values["W_skip"] = weights["W_skip"]
    assign_params(model, values)
    return model.eval()


def _check(path, tensors: dict, shapes: dict) -> None:
    for name, shape in shapes.items():
        if name not in tensors:
            raise UserError(f"{path} has no tensor {name!r}")
        if tuple(tensors[name].shape) != tuple(shape):
            raise UserError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, its config implies {shape}")


def _check_square(d_in: int, d_out: int, path) -> None:
    if d_out != d_in:
        raise UserError(f"{path}: a transcoder from {d_in} to {d_out} dimensions; this tool's transcoders map a "
                        f"site to one of the same width (MLP input -> MLP output)")


# ---- SAELens --------------------------------------------------------------------------------------------
@torch.no_grad()
def to_saelens(model, cfg_base: dict) -> tuple[dict, dict]:
    """(cfg, tensors) of a transcoder in SAELens's layout; cfg_base is the SAE cfg to extend (hooks, metadata)."""
    if model.name not in SAELENS_EXPORTABLE:
        raise UserError(f"SAELens has no {model.name} transcoder (its transcoders are relu or jumprelu: export "
                        f"{model.name} transcoders to sparsify, or train l1/relu/jumprelu/batchtopk ones)")
    arch = SAELENS_EXPORTABLE[model.name]
    if arch == "jumprelu_transcoder" and model.name != "jumprelu" and float(model.threshold) < 0:
        raise UserError(f"this {model.name} transcoder has no inference threshold yet (train it first)")
    if model.skip:
        arch = arch.replace("transcoder", "skip_transcoder")
    tensors = raw_weights(model)
    if arch.startswith("jumprelu"):
        tensors["threshold"] = threshold_of(model).detach().float().cpu().expand(model.d_sae).clone()
    config = getattr(model, "run_config", {}) or {}
    cfg = {**cfg_base, "architecture": arch, "d_out": model.d_in, "apply_b_dec_to_input": False}
    for key in ("k", "rescale_acts_by_decoder_norm"):
        cfg.pop(key, None)
    cfg["activation_fn"] = cfg["activation_fn_str"] = "relu"
    cfg["activation_fn_kwargs"] = {}
    from sae.interop.naming import hook_name
    out_hook = hook_name(config.get("target_site"), config.get("layer"))
    for meta in (cfg.get("metadata"), cfg.get("meta"), cfg):
        if isinstance(meta, dict):
            meta["hook_name_out"] = out_hook
    cfg["exported_by"] = {**cfg.get("exported_by", {}), "transcoder": True, "skip": model.skip,
                          "target_site": config.get("target_site"), "target_scale_folded": float(model.target_scale)}
    return cfg, tensors


def load_saelens_transcoder(path: Path, cfg: dict, weights: Path, device="cpu"):
    """A SAELens transcoder folder (cfg normalised by sae.interop.saelens, weights its safetensors file) as our
    transcoder module."""
    variant, skip = SAELENS_ARCHITECTURES[cfg["architecture"]]
    d_in, d_sae, d_out = cfg["d_in"], cfg["d_sae"], int(cfg.get("d_out") or cfg["d_in"])
    _check_square(d_in, d_out, path)
    if cfg["normalize_activations"] != "none":
        raise UserError(f"{path}: normalize_activations={cfg['normalize_activations']!r} is not supported for "
                        f"transcoders (only 'none')")
    tensors = {k: v.float() for k, v in load_file(str(weights)).items()}
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    shapes.update({"W_skip": (d_out, d_in)} if skip else {})
    shapes.update({"threshold": (d_sae,)} if variant == "jumprelu" else {})
    _check(weights, tensors, shapes)
    model = build(variant, d_in, d_sae, skip, tensors)
    model.run_config = describe_saelens_transcoder(path, cfg)
    return model.to(device)


def describe_saelens_transcoder(path, cfg: dict) -> dict:
    from sae.interop.naming import parse_hook
    variant, skip = SAELENS_ARCHITECTURES[cfg["architecture"]]
    layer, site = parse_hook(cfg.get("hook_name"))
    out_hook = cfg.get("hook_name_out") or (cfg.get("metadata") or {}).get("hook_name_out")
    target_site = parse_hook(out_hook)[1] if out_hook else "mlp_out"
    return {"variant": variant, "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "knobs": {}, "layer": layer,
            "site": site, "target_site": target_site, "transcoder": True, "skip": skip,
            "model": cfg.get("model_name"), "fire_threshold": 0.0, "signed_codes": False,
            "source": {"format": "saelens", "path": str(path), "architecture": cfg["architecture"],
                       "hook_name": cfg.get("hook_name"), "hook_name_out": out_hook}}


# ---- sparsify -------------------------------------------------------------------------------------------
@torch.no_grad()
def to_sparsify(model) -> tuple[dict, dict]:
    if model.name != "topk":
        raise UserError(f"sparsify holds TopK transcoders only; variant {model.name} cannot be written in its layout")
    weights = raw_weights(model)
    cfg = {"activation": "topk", "expansion_factor": max(1, model.d_sae // model.d_in), "normalize_decoder": False,
           "num_latents": model.d_sae, "k": int(model.knobs["k"]), "multi_topk": False,
           "skip_connection": bool(model.skip), "transcode": True, "d_in": model.d_in}
    tensors = {"encoder.weight": weights["W_enc"].T.contiguous(), "encoder.bias": weights["b_enc"],
               "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}
    if model.skip:
        tensors["W_skip"] = weights["W_skip"]
    return cfg, tensors


def load_sparsify_transcoder(weights: Path, config: dict, device="cpu"):
    """A sparsify transcoder (describe_sparsify's config, its safetensors file) as our topk transcoder module."""
    d_in, d_sae, skip = config["d_in"], config["d_sae"], bool(config.get("skip"))
    tensors = {k: v.float() for k, v in load_file(str(weights)).items()}
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes.update({"W_skip": (d_in, d_in)} if skip else {})
    _check(weights, tensors, shapes)
    weights = {"W_enc": tensors["encoder.weight"].T.contiguous(), "b_enc": tensors["encoder.bias"],
               "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"], **({"W_skip": tensors["W_skip"]} if skip else {})}
    model = build("topk", d_in, d_sae, skip, weights, config["knobs"])
    model.run_config = config
    return model.to(device)
