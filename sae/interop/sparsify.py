"""EleutherAI sparsify's checkpoint layout: cfg.json + sae.safetensors, one folder per hookpoint.

cfg.json holds the SparseCoderConfig fields plus d_in: activation ("topk"), k, num_latents (0: use
expansion_factor × d_in), expansion_factor, normalize_decoder, multi_topk, skip_connection, transcode.
sae.safetensors holds encoder.weight [num_latents, d_in], encoder.bias [num_latents],
W_dec [num_latents, d_in], b_dec [d_in] (W_skip [d_in, d_in] with a skip connection).
sparsify computes codes = topk_k(relu((x - b_dec) @ encoder.weight.T + encoder.bias)) and
x_hat = codes @ W_dec + b_dec: this project's `topk` variant, loaded as such.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sae.errors import UserError
from sae.files import read_json
from sae.interop.naming import parse_module_path
from sae.interop.variant_params import assign_params, centres_input, encoder_values

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"


def describe_sparsify(path: Path) -> dict:
    cfg = read_json(path / CFG)
    if not isinstance(cfg.get("d_in"), int):
        raise UserError(f"{path / CFG} has no integer d_in: not a sparsify checkpoint")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise UserError(f"{path}: sparsify activation {activation!r} is not supported (only topk)")
    if cfg.get("embed_skip"):
        raise UserError(f"{path} has a skip connection, which this tool's SAEs do not have")
    d_in = cfg["d_in"]
    d_sae = int(cfg.get("num_latents") or 0) or int(d_in * cfg.get("expansion_factor", 32))
    # sparsify saves one folder per hookpoint, named after it (layers.6, layers.6.mlp, h.6 ...)
    layer, site = parse_module_path(path.name)
    if not cfg.get("transcode") and cfg.get("skip_connection"):
        raise UserError(f"{path} is an autoencoder with a skip connection, which this tool's SAEs do not have")
    transcoder = {"transcoder": True, "skip": bool(cfg.get("skip_connection")), "site": "mlp_in",
                  "target_site": "mlp_out"} if cfg.get("transcode") else {}   # sparsify hooks the MLP module
    return {"variant": "topk", "d_in": d_in, "d_sae": d_sae, "knobs": {"k": int(cfg.get("k", 32))},
            "layer": layer, "site": site, **transcoder, "model": None, "fire_threshold": 0.0, "signed_codes": False,
            "source": {"format": "sparsify", "path": str(path), "hookpoint": path.name,
                       "multi_topk": bool(cfg.get("multi_topk", False))}}


def load_sparsify(path, device="cpu"):
    from sae import variants
    path = Path(path)
    config = describe_sparsify(path)
    if config.get("transcoder"):
        from sae.interop.transcoders import load_sparsify_transcoder
        return load_sparsify_transcoder(path / WEIGHTS, config, device).eval()
    d_in, d_sae = config["d_in"], config["d_sae"]
    tensors = {k: v.float() for k, v in load_file(str(path / WEIGHTS)).items()}
    need = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in need.items():
        if name not in tensors:
            raise UserError(f"{path / WEIGHTS} has no tensor {name!r}: not a sparsify SAE with a decoder")
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{path / WEIGHTS}: {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {shape}")
    if "W_skip" in tensors:
        raise UserError(f"{path} has a skip connection (W_skip), which this tool's SAEs do not have")
    model = variants.create("topk", d_in=d_in, d_sae=d_sae, **config["knobs"])
    W_enc = tensors["encoder.weight"].T.contiguous()  # [d_in, d_sae]
    b_dec = tensors["b_dec"]
    b_enc = tensors["encoder.bias"]
    if not centres_input(model):  # sparsify subtracts b_dec first; fold it into the bias
        b_enc = b_enc - b_dec @ W_enc
    values = {"W_dec": tensors["W_dec"], "b_dec": b_dec, **encoder_values(model, W_enc, b_enc)}
    assign_params(model, values)
    model.run_config = config
    return model.to(device).eval()


@torch.no_grad()
def to_sparsify(model) -> tuple[dict, dict]:
    """(cfg, tensors) of a topk model in sparsify's layout, the input scale folded in."""
    if getattr(model, "is_transcoder", False):
        from sae.interop.transcoders import to_sparsify as transcoder_to_sparsify
        return transcoder_to_sparsify(model)
    if model.name != "topk":
        raise UserError(f"sparsify holds TopK SAEs only; variant {model.name} cannot be written in its layout")
    scale = float(model.input_scale)
    W_enc, b_enc = model.W_enc.detach().float().cpu() * scale, model.b_enc.detach().float().cpu()
    b_dec = model.b_dec.detach().float().cpu() / scale
    if not centres_input(model):
        b_enc = b_enc + b_dec @ W_enc
    cfg = {"activation": "topk", "expansion_factor": max(1, model.d_sae // model.d_in), "normalize_decoder": True,
           "num_latents": model.d_sae, "k": int(model.knobs["k"]), "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": model.d_in}
    tensors = {"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc.contiguous(),
               "W_dec": (model.W_dec.detach().float().cpu() / scale).contiguous(), "b_dec": b_dec.contiguous()}
    return cfg, tensors
