"""`sae.steer` and `sae.ablate`: run a language model with some of an SAE's features set to chosen values.

    with sae.steer(hf_model, model, site="resid_post", layer=6, features={123: 8.0}):
        hf_model.generate(input_ids, ...)          # feature 123's code is 8.0 at every position
    with sae.ablate(hf_model, model, site="resid_post", layer=6, features=[123, 456]):
        logits = hf_model(input_ids).logits        # those features' contributions removed

Setting feature j's code to v moves the site's activation x by (v − f_j(x)) · d_j, where f_j(x) is the
feature's code on x and d_j = model.decoder_directions_raw()[j] its decoder direction in the
activation's own (raw) units; everything the SAE does not explain (its error term) is left as it was.
`mode="add"` adds v · d_j instead, whatever the code (SAELens's `x + a * W_dec[j]`, but in raw units:
`model.W_dec` is in the SAE's internal scaled units). Ablation is steering to 0.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

MODES = ("clamp", "add")


def _features(features) -> dict[int, float]:
    if isinstance(features, int):
        return {features: 0.0}
    if isinstance(features, dict):
        return {int(j): float(v) for j, v in features.items()}
    return {int(j): 0.0 for j in features}


def steering_fn(model, features, mode: str = "clamp"):
    """fn(x [..., d_in]) -> x with each feature j of `features` ({j: value}) set to its value (mode "clamp")
    or its direction added value times (mode "add"); the activation's dtype and device are kept."""
    if mode not in MODES:
        raise ValueError(f"unknown steering mode {mode!r}: use one of {', '.join(MODES)}")
    chosen = _features(features)
    if not chosen:
        raise ValueError("steer: no feature given")
    ids = torch.tensor(list(chosen), dtype=torch.long)                    # [m]
    for j in chosen:
        if not 0 <= j < model.d_sae:
            raise ValueError(f"feature {j} is out of range: the SAE has {model.d_sae} features")
    values = torch.tensor(list(chosen.values()), dtype=torch.float32)   # [m]
    with torch.no_grad():
        directions = model.decoder_directions_raw()[ids].detach().float()  # [m, d_in] raw units
    param = next(model.parameters(), None)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            flat = x.reshape(-1, x.shape[-1])                                # [n, d_in]
            if mode == "add":
                coefficients = values.to(x.device).expand(flat.shape[0], -1)  # [n, m]
            else:
                sae_in = flat if param is None else flat.to(device=param.device, dtype=param.dtype)
                codes = model.encode(sae_in)[:, ids.to(sae_in.device)].float().to(x.device)   # [n, m]
                coefficients = values.to(x.device) - codes
            delta = coefficients @ directions.to(x.device)                   # [n, d_in]
            return (flat.float() + delta).to(x.dtype).reshape(x.shape)
    return fn


@contextmanager
def steer(hf_model, model, site: str, layer, features: dict, mode: str = "clamp", keep_mask=None):
    """Set each feature j of `features` ({j: value}) to its value at the site (public API, docs/python-api.md).
    Positions where the yielded handle's keep_mask ([batch, seq] bool) is true are left untouched."""
    from sae.evaluate.splice import replace
    with replace(hf_model, site, layer, steering_fn(model, features, mode), keep_mask=keep_mask) as handle:
        yield handle


@contextmanager
def ablate(hf_model, model, site: str, layer, features, keep_mask=None):
    """Remove the contributions of `features` (an id, a list of ids, or {id: ignored}): steering them to 0."""
    with steer(hf_model, model, site, layer, {j: 0.0 for j in _features(features)}, keep_mask=keep_mask) as handle:
        yield handle
