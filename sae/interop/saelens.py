"""SAELens's SAE folder layout: cfg.json + sae_weights.safetensors (+ sparsity.safetensors).

SAELens (6.x) computes, in raw activation units, for every architecture:
    x_c    = x - b_dec                      (only when cfg.apply_b_dec_to_input)
    standard: codes = relu(x_c @ W_enc + b_enc)
    topk:     codes = relu(topk_k(x_c @ W_enc + b_enc))
    jumprelu: pre = x_c @ W_enc + b_enc; codes = relu(pre) * (pre > threshold)
    gated:    codes = (x_c @ W_enc + b_gate > 0) * relu(x_c @ (W_enc * exp(r_mag)) + b_mag)
    decode:   x_hat = codes @ W_dec + b_dec
with W_enc [d_in, d_sae], W_dec [d_sae, d_in]. This project's variants compute the same functions on
scaled inputs (x * input_scale); export folds the scale into W_enc, W_dec and b_dec, import leaves
input_scale at 1.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sae.errors import UserError
from sae.files import read_json
from sae.interop.naming import MODEL_IDS, hook_name, parse_hook
from sae.interop.transcoders import SAELENS_ARCHITECTURES, describe_saelens_transcoder, load_saelens_transcoder
from sae.interop.variant_params import (assign_params, centres_input, encoder_values, gated_values,
                                        read_encoder, read_gated, threshold_of)

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SPARSITY = "sparsity.safetensors"
SAELENS_VERSION = "6.0.0"   # the cfg.json format written (SAELens >= 6 reads it; the flat keys serve 5.x)

# this project's variant -> the SAELens architecture its inference function is
EXPORTABLE = {"l1": "standard", "relu": "standard", "denoising": "standard", "topk": "topk",
              "gated": "gated", "jumprelu": "jumprelu", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
# SAELens architecture (inference) -> this project's variant that computes the same function
IMPORTABLE = {"standard": "l1", "topk": "topk", "gated": "gated", "jumprelu": "jumprelu"}


# ---- reading ----------------------------------------------------------------------------------
def normalised_cfg(path: Path) -> dict:
    """cfg.json with the old (< 6.0) spellings mapped to the 6.x ones we use."""
    cfg = read_json(path / CFG)
    meta = {**(cfg.get("meta") or {}), **(cfg.get("metadata") or {})}
    for key in ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path", "hook_head_index"):
        cfg.setdefault(key, meta.get(key))
    if cfg.get("hook_name") is None and cfg.get("hook_point"):
        cfg["hook_name"] = cfg["hook_point"]
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if not cfg.get("architecture"):
        cfg["architecture"] = "topk" if activation == "topk" else "standard"
    if cfg["architecture"] == "topk" and cfg.get("k") is None:
        cfg["k"] = (cfg.get("activation_fn_kwargs") or {}).get("k", 100)  # SAELens's TopKSAEConfig default
    if cfg["architecture"] == "standard" and activation not in ("relu", None):
        raise UserError(f"{path}: SAELens activation function {activation!r} is not supported (only relu)")
    norm = cfg.get("normalize_activations")
    cfg["normalize_activations"] = "none" if norm in (None, False, "none") else \
        ("expected_average_only_in" if norm is True else norm)
    cfg.setdefault("apply_b_dec_to_input", True)
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise UserError(f"{path / CFG} has no integer {key}")
    return cfg


def describe_saelens(path: Path) -> dict:
    """The config.json-like description of a SAELens folder (no weights read)."""
    cfg = normalised_cfg(path)
    arch = cfg["architecture"]
    if arch in SAELENS_ARCHITECTURES:         # a transcoder (sae.interop.transcoders)
        return describe_saelens_transcoder(path, cfg)
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        raise UserError(f"{path} is a SAELens {arch} training checkpoint (its codes depend on the batch); SAELens "
                        f"saves these for inference as jumprelu (save_inference_model): load that folder")
    if arch not in IMPORTABLE:
        raise UserError(f"{path}: SAELens architecture {arch!r} is not supported "
                        f"(supported: {', '.join(sorted(IMPORTABLE))})")
    layer, site = parse_hook(cfg.get("hook_name"))
    knobs = {"k": int(cfg["k"])} if arch == "topk" else {}
    model_name = {hub_id: ours for ours, hub_id in MODEL_IDS.items()}.get(cfg.get("model_name"), cfg.get("model_name"))
    return {"variant": IMPORTABLE[arch], "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "knobs": knobs,
            "layer": layer, "site": site, "model": model_name, "context_size": cfg.get("context_size"),
            "fire_threshold": 0.0, "signed_codes": False,
            "source": {"format": "saelens", "path": str(path), "architecture": arch,
                       "hook_name": cfg.get("hook_name"), "dataset_path": cfg.get("dataset_path"),
                       "normalize_activations": cfg["normalize_activations"]}}


def load_saelens(path, device="cpu"):
    """A SAELens folder as this project's module computing the same encode/decode in raw units."""
    from sae import variants
    path = Path(path)
    cfg = normalised_cfg(path)
    if cfg["architecture"] in SAELENS_ARCHITECTURES:
        return load_saelens_transcoder(path, cfg, path / WEIGHTS, device).eval()
    config = describe_saelens(path)
    if cfg["normalize_activations"] in ("constant_norm_rescale", "layer_norm"):
        raise UserError(f"{path}: normalize_activations={cfg['normalize_activations']!r} rescales each token at "
                        f"run time, which this tool's SAEs do not do; only 'none' (or a folded constant) loads")
    tensors = {k: v.float() for k, v in load_file(str(path / WEIGHTS)).items()}
    arch, d_in, d_sae = cfg["architecture"], cfg["d_in"], cfg["d_sae"]
    _check_shapes(path, tensors, arch, d_in, d_sae)
    W_enc, W_dec, b_dec = tensors["W_enc"], tensors["W_dec"], tensors["b_dec"]
    scaling = tensors.get("finetuning_scaling_factor", tensors.get("scaling_factor"))
    if scaling is not None:  # decode multiplies codes by it: fold into the decoder rows
        W_dec = W_dec * scaling[:, None]
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # codes = topk(pre · ‖W_dec_j‖), decoded through W_dec_j / ‖W_dec_j‖: fold the norms into the weights
        norms = W_dec.norm(dim=1)  # [d_sae]
        W_enc, W_dec = W_enc * norms, W_dec / norms[:, None]
        tensors["b_enc"] = tensors["b_enc"] * norms
    centre_bias = b_dec if cfg["apply_b_dec_to_input"] else torch.zeros_like(b_dec)
    model = variants.create(config["variant"], d_in=d_in, d_sae=d_sae, **config["knobs"])
    values = {"W_dec": W_dec, "b_dec": b_dec}
    # SAELens subtracts centre_bias; our variant subtracts its own b_dec (or nothing): the encoder bias
    # absorbs the difference so the pre-activations agree exactly in real arithmetic.
    ours_subtract = b_dec if centres_input(model) else torch.zeros_like(b_dec)
    shift = (ours_subtract - centre_bias) @ W_enc  # [d_sae]
    if arch == "gated":
        values.update(gated_values(model, W_enc, tensors["b_gate"] + shift,
                                   tensors["r_mag"], tensors["b_mag"] + shift * tensors["r_mag"].exp()))
    else:
        values.update(encoder_values(model, W_enc, tensors["b_enc"] + shift))
        if arch == "jumprelu":
            values["threshold"] = tensors["threshold"]
    assign_params(model, values)
    model.run_config = config
    return model.to(device).eval()


def _check_shapes(path, tensors, arch, d_in, d_sae):
    need = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    need.update({"b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)} if arch == "gated" else {"b_enc": (d_sae,)})
    if arch == "jumprelu":
        need["threshold"] = (d_sae,)
    for name, shape in need.items():
        if name not in tensors:
            raise UserError(f"{path / WEIGHTS} has no tensor {name!r} (a SAELens {arch} SAE needs it)")
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{path / WEIGHTS}: {name} has shape {tuple(tensors[name].shape)}, cfg.json says {shape}")


# ---- writing ----------------------------------------------------------------------------------
@torch.no_grad()
def to_saelens(model, run_config: dict | None = None, store_manifest: dict | None = None) -> tuple[dict, dict]:
    """(cfg dict, tensors) of `model` in SAELens's layout, the input scale folded into the weights."""
    if getattr(model, "is_transcoder", False):   # SAELens's transcoder layouts (sae.interop.transcoders)
        from sae.interop.transcoders import to_saelens as transcoder_to_saelens
        return transcoder_to_saelens(model, saelens_cfg(model, "standard", False, run_config or getattr(
            model, "run_config", {}) or {}, store_manifest or {}))
    name = model.name
    if name not in EXPORTABLE:
        raise UserError(f"variant {name} has no SAELens equivalent; exportable variants: "
                        f"{', '.join(sorted(EXPORTABLE))}")
    arch = EXPORTABLE[name]
    if arch == "jumprelu" and name != "jumprelu" and float(model.threshold) < 0:
        arch = "topk"  # batchtopk/matryoshka before any training batch encode with a per-token top-k
    scale = float(model.input_scale)
    W_dec = model.W_dec.detach().float().cpu() / scale   # [d_sae, d_in] raw units
    b_dec = model.b_dec.detach().float().cpu() / scale   # [d_in]
    centred = centres_input(model)
    if arch == "gated":
        W_gate, b_gate, r_mag, b_mag = (t.detach().float().cpu() for t in read_gated(model))
        tensors = {"W_enc": W_gate * scale, "b_gate": b_gate, "r_mag": r_mag, "b_mag": b_mag}
    else:
        W_enc, b_enc = (t.detach().float().cpu() for t in read_encoder(model))
        tensors = {"W_enc": W_enc * scale, "b_enc": b_enc}
        if arch == "jumprelu":
            tensors["threshold"] = threshold_of(model).detach().float().cpu().expand(model.d_sae).clone()
    tensors.update({"W_dec": W_dec, "b_dec": b_dec})
    cfg = saelens_cfg(model, arch, centred, run_config or getattr(model, "run_config", {}) or {}, store_manifest or {})
    return cfg, {k: v.contiguous() for k, v in tensors.items()}


def saelens_cfg(model, arch: str, centred: bool, run_config: dict, manifest: dict) -> dict:
    """cfg.json in SAELens 6.x's form (architecture fields + metadata), plus the flat keys 5.x reads."""
    layer, site = run_config.get("layer"), run_config.get("site")
    model_name = run_config.get("model") or manifest.get("model")
    model_name = MODEL_IDS.get(model_name, model_name)
    meta = {"model_name": model_name, "hook_name": hook_name(site, layer), "hook_head_index": None,
            "prepend_bos": True, "context_size": manifest.get("context_size") or run_config.get("context_size"),
            "dataset_path": manifest.get("dataset") or run_config.get("dataset"),
            "sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None}
    cfg = {"architecture": arch, "d_in": model.d_in, "d_sae": model.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": centred, "normalize_activations": "none", "reshape_activations": "none"}
    if arch == "topk":
        cfg.update({"k": int(model.knobs["k"]), "rescale_acts_by_decoder_norm": False})
    cfg.update({"metadata": dict(meta), "meta": dict(meta), "sae_lens_version": SAELENS_VERSION})
    # flat keys: what SAELens < 6 reads (6.x ignores them)
    cfg.update({k: v for k, v in meta.items() if k != "sae_lens_version"})
    cfg.update({"hook_layer": layer if isinstance(layer, int) else None,
                "activation_fn": "topk" if arch == "topk" else "relu",
                "activation_fn_str": "topk" if arch == "topk" else "relu",
                "activation_fn_kwargs": {"k": int(model.knobs["k"])} if arch == "topk" else {},
                "finetuning_scaling_factor": False, "dataset_trust_remote_code": False, "neuronpedia_id": None,
                "model_from_pretrained_kwargs": {}})
    cfg["exported_by"] = {"tool": "sae", "variant": model.name, "knobs": dict(model.knobs),
                          "input_scale_folded": float(model.input_scale), "site": site, "layer": layer}
    return cfg
