"""Run a language model with a transcoder's prediction in place of the MLP's output.

    with splice_transcoder(hf_model, tc, layer=6) as handle:      # sites from the run: mlp_in -> mlp_out
        logits = hf_model(input_ids).logits

A hook on the input site keeps the activation the MLP reads (mlp_in); the output site's activation (mlp_out)
is replaced by tc.predict(that input) = decode(encode(x)) + skip_term(x). error_term=True returns
y + (ŷ − ŷ.detach()): exactly the clean output in the forward (bit for bit), while gradients flow through the
transcoder's latents. Positions where keep_mask is true keep the original output (special tokens).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from sae.evaluate.splice import _unwrap, replace
from sae.lm.hooks import _first, _input_of
from sae.lm.sites import site_point


def sites_of(tc) -> tuple[str, str]:
    """(input site, target site) of a transcoder: from its run's config, else mlp_in -> mlp_out."""
    config = getattr(tc, "run_config", None) or {}
    return config.get("site") or "mlp_in", config.get("target_site") or "mlp_out"


def _stash_input(hf, site: str, layer):
    """A hook that keeps the transcoder's input (the site's activation) in stash["x"] on every forward."""
    point = site_point(hf, site, layer)
    stash: dict = {}
    if point.kind == "input":
        hook = point.module.register_forward_pre_hook(
            lambda module, args, kwargs: stash.update(x=_input_of(args, kwargs)), with_kwargs=True)
    else:
        hook = point.module.register_forward_hook(lambda module, args, output: stash.update(x=_first(output)))
    return hook, stash


@contextmanager
def splice_transcoder(hf_model, tc, layer, error_term: bool = False, keep_mask: torch.Tensor | None = None,
                      record_codes: bool = False, site: str | None = None, target_site: str | None = None):
    """The transcoder's prediction replaces the target site's activation (see the module docstring)."""
    default_site, default_target = sites_of(tc)
    site, target_site = site or default_site, target_site or default_target
    hf = _unwrap(hf_model)
    hook, stash = _stash_input(hf, site, layer)
    state = {}

    def predict(y: torch.Tensor) -> torch.Tensor:
        x = stash.pop("x")                                                   # [batch, seq, d_in] the MLP's input
        param = next(tc.parameters())
        flat = x.reshape(-1, x.shape[-1]).to(device=param.device, dtype=param.dtype)   # [batch * seq, d_in]
        codes = tc.encode(flat)                                              # [batch * seq, d_sae]
        y_hat = tc.decode(codes) + tc.skip_term(flat)                        # [batch * seq, d_in]
        if record_codes:
            state["handle"].codes = codes.reshape(*x.shape[:-1], -1)
        if error_term:
            y_flat = y.reshape(-1, y.shape[-1]).to(y_hat.dtype)
            y_hat = y_flat + (y_hat - y_hat.detach())
        return y_hat.to(device=y.device, dtype=y.dtype).reshape(y.shape)

    try:
        with replace(hf, target_site, layer, predict, keep_mask=keep_mask) as handle:
            state["handle"] = handle
            yield handle
    finally:
        hook.remove()


@contextmanager
def steer_transcoder(hf_model, tc, layer, features: dict, mode: str = "clamp", keep_mask: torch.Tensor | None = None):
    """Set each transcoder feature j of `features` ({j: value}) at the MLP output: y + (value − f_j(x))·d_j
    (mode "clamp", f_j from the MLP's input x) or y + value·d_j (mode "add"), d_j the feature's output direction
    in raw units. {j: 0.0} in clamp mode removes the feature's contribution (ablation)."""
    if mode not in ("clamp", "add"):
        raise ValueError(f"unknown steering mode {mode!r}: use clamp or add")
    site, target_site = sites_of(tc)
    hf = _unwrap(hf_model)
    ids = torch.tensor(list(features), dtype=torch.long)                             # [m]
    values = torch.tensor([float(v) for v in features.values()])                     # [m]
    with torch.no_grad():
        directions = tc.decoder_directions_raw()[ids].detach().float()               # [m, d_in]
    hook, stash = _stash_input(hf, site, layer)

    def edit(y: torch.Tensor) -> torch.Tensor:
        x = stash.pop("x")
        flat_y = y.reshape(-1, y.shape[-1]).float()                                  # [n, d]
        with torch.no_grad():
            if mode == "add":
                coefficients = values.to(y.device).expand(flat_y.shape[0], -1)       # [n, m]
            else:
                param = next(tc.parameters())
                flat_x = x.reshape(-1, x.shape[-1]).to(device=param.device, dtype=param.dtype)
                coefficients = values.to(y.device) - tc.encode(flat_x)[:, ids.to(param.device)].float().to(y.device)
        return (flat_y + coefficients @ directions.to(y.device)).to(y.dtype).reshape(y.shape)

    try:
        with replace(hf, target_site, layer, edit, keep_mask=keep_mask) as handle:
            yield handle
    finally:
        hook.remove()
