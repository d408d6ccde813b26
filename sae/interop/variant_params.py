"""What interop needs to know about this project's variants' parameters, in one place.

Every variant with an encoder keeps W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in] (sae/variants/base.py); these helpers read and write the few that differ (gated's
gate/magnitude pair, jumprelu's threshold, batchtopk's and matryoshka's inference threshold).
"""
from __future__ import annotations

import torch


def centres_input(model) -> bool:
    """Whether the variant's encoder subtracts b_dec from its (scaled) input first."""
    return bool(getattr(model, "centre_input", getattr(type(model), "centre_input", True)))


def read_encoder(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_enc [d_in, d_sae], b_enc [d_sae]) in scaled units."""
    return model.W_enc, model.b_enc


def encoder_values(model, W_enc: torch.Tensor, b_enc: torch.Tensor) -> dict:
    return {"W_enc": W_enc, "b_enc": b_enc}


def _gate_names(model) -> tuple[str, str]:
    """Our gated variant keeps the gate in W_enc/b_enc (SAELens: W_enc/b_gate)."""
    return ("W_gate" if hasattr(model, "W_gate") else "W_enc", "b_gate" if hasattr(model, "b_gate") else "b_enc")


def read_gated(model) -> tuple[torch.Tensor, ...]:
    """(W_gate [d_in, d_sae], b_gate, r_mag, b_mag): magnitude weights are W_gate * exp(r_mag)."""
    weight, bias = _gate_names(model)
    return getattr(model, weight), getattr(model, bias), model.r_mag, model.b_mag


def gated_values(model, W_gate, b_gate, r_mag, b_mag) -> dict:
    weight, bias = _gate_names(model)
    return {weight: W_gate, bias: b_gate, "r_mag": r_mag, "b_mag": b_mag}


def threshold_of(model) -> torch.Tensor:
    """The firing threshold on pre-activations ([d_sae] or a scalar) for jumprelu-like inference."""
    if hasattr(model, "log_threshold"):
        return model.log_threshold.detach().exp()
    threshold = getattr(model, "threshold", None)
    if isinstance(threshold, torch.Tensor):  # batchtopk, matryoshka: codes = pre · 1[pre > max(θ, 0)]
        return threshold.detach().clamp_min(0)
    raise ValueError(f"variant {model.name} has no threshold")


@torch.no_grad()
def assign_params(model, values: dict) -> None:
    """Copy values into the model's parameters/buffers by name (threshold -> log_threshold when the
    variant learns its logarithm); input_scale is set to 1: the values are in raw units."""
    values = dict(values)
    if "threshold" in values and hasattr(model, "log_threshold"):
        values["log_threshold"] = values.pop("threshold").clamp_min(1e-30).log()
    state = model.state_dict()
    for name, value in values.items():
        if name not in state:
            raise ValueError(f"variant {model.name} has no parameter {name}")
        target = state[name]
        state[name] = value.to(target.dtype).reshape(target.shape) if value.numel() == target.numel() \
            else value.to(target.dtype).expand(target.shape).clone()
    state["input_scale"] = torch.ones_like(state["input_scale"])
    model.load_state_dict(state)
