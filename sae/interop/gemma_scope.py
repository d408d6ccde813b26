"""Gemma Scope's SAE layout: one folder per SAE holding params.npz (JumpReLU, raw activation units):

    W_enc [d_in, d_sae], b_enc [d_sae], threshold [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
    pre = x @ W_enc + b_enc;  codes = pre * (pre > threshold);  x_hat = codes @ W_dec + b_dec

It loads as this project's `jumprelu` variant, which computes pre = (x - b_dec) @ W_enc + b_enc' with
θ = exp(log_threshold): the encoder bias absorbs b_dec @ W_enc (b_enc' = b_enc + b_dec @ W_enc), so the codes
and the reconstruction equal the formula above. The archive is read with numpy's allow_pickle=False: an
object array (a pickle) inside it is refused.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from sae.errors import UserError

PARAMS = "params.npz"
NEEDED = ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")


def is_gemma_scope(path) -> bool:
    return (Path(path) / PARAMS).is_file()


def _shapes(path: Path) -> dict[str, tuple]:
    """{name: shape} of the arrays in params.npz, read from the headers alone (no array is loaded)."""
    shapes = {}
    try:
        with zipfile.ZipFile(path / PARAMS) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)(handle)
                shapes[member[:-4]] = tuple(header[0])
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        raise UserError(f"{path / PARAMS} is not a readable .npz archive ({type(error).__name__})") from None
    return shapes


def _dims(path: Path) -> tuple[int, int]:
    shapes = _shapes(path)
    missing = [name for name in NEEDED if name not in shapes]
    if missing:
        raise UserError(f"{path / PARAMS} has no {', '.join(missing)} (a Gemma Scope JumpReLU SAE needs "
                        f"{', '.join(NEEDED)})")
    if len(shapes["W_enc"]) != 2:
        raise UserError(f"{path / PARAMS}: W_enc has shape {shapes['W_enc']}, expected [d_in, d_sae]")
    d_in, d_sae = shapes["W_enc"]
    need = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "threshold": (d_sae,), "b_dec": (d_in,)}
    for name, shape in need.items():
        if tuple(shapes[name]) != shape:
            raise UserError(f"{path / PARAMS}: {name} has shape {tuple(shapes[name])}, W_enc {d_in}x{d_sae} "
                            f"implies {shape}")
    return int(d_in), int(d_sae)


def _guess_layer(path: Path):
    for part in reversed(path.resolve().parts):
        match = re.fullmatch(r"layer_(\d+)", part)
        if match:
            return int(match.group(1))
    return None


def _guess_site(path: Path):
    for part in reversed(path.resolve().parts):
        for tag, site in (("-res", "resid_post"), ("-mlp", "mlp_out"), ("-att", "attn_z")):
            if re.search(rf"gemma-scope.*{tag}(-|$)", part):
                return site
    return None


def describe_gemma_scope(path, release: dict | None = None) -> dict:
    """The config.json-like description of a Gemma Scope folder (array headers only). `release`: what the
    registry says of it (model, site, layer, release, sae_id, repo); otherwise layer and site are guessed
    from the folder names (layer_12/..., gemma-scope-2b-pt-res/...) where they say it."""
    path = Path(path)
    d_in, d_sae = _dims(path)
    release = release or {}
    layer = release.get("layer", _guess_layer(path))
    site = release.get("site", _guess_site(path))
    source = {"format": "gemma_scope", "path": str(path)}
    source.update({k: release[k] for k in ("release", "sae_id", "repo") if k in release})
    return {"variant": "jumprelu", "d_in": d_in, "d_sae": d_sae, "knobs": {}, "layer": layer, "site": site,
            "model": release.get("model"), "fire_threshold": 0.0, "signed_codes": False, "source": source}


def read_params(path) -> dict:
    """params.npz as float32 torch tensors (allow_pickle=False: an object array is refused)."""
    import torch
    path = Path(path)
    _dims(path)
    try:
        with np.load(path / PARAMS, allow_pickle=False) as archive:
            return {name: torch.from_numpy(np.asarray(archive[name], dtype=np.float32)) for name in NEEDED}
    except ValueError as error:   # "Object arrays cannot be loaded when allow_pickle=False"
        raise UserError(f"{path / PARAMS} holds an object array (a pickle), which this tool does not read: "
                        f"{error}") from None


def load_gemma_scope(path, device="cpu", release: dict | None = None):
    """A Gemma Scope folder as this project's jumprelu module computing the release's formula in raw units."""
    import torch

    from sae import variants
    from sae.interop.variant_params import assign_params
    path = Path(path)
    config = describe_gemma_scope(path, release)
    p = read_params(path)
    threshold = p["threshold"]
    if bool((threshold < 0).any()):
        raise UserError(f"{path / PARAMS}: {int((threshold < 0).sum())} negative thresholds; this tool's jumprelu "
                        f"keeps θ = exp(log θ) > 0")
    model = variants.create("jumprelu", d_in=config["d_in"], d_sae=config["d_sae"])
    with torch.no_grad():
        b_enc = p["b_enc"].double() + p["b_dec"].double() @ p["W_enc"].double()   # [d_sae]
    # θ = 0 (never seen in a release) loads as 1e-30: codes differ only for 0 < pre <= 1e-30
    assign_params(model, {"W_enc": p["W_enc"], "b_enc": b_enc.float(), "W_dec": p["W_dec"], "b_dec": p["b_dec"],
                          "threshold": threshold})
    model.run_config = config
    return model.to(device).eval()
