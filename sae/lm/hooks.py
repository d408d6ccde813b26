"""Hooks on a site: capture its activation (stopping the forward after the deepest layer) or replace it."""
from __future__ import annotations

import contextlib

from sae.lm.model import _hf
from sae.lm.sites import site_point


class StopForward(Exception):
    """Raised inside a hook once every requested activation is captured: cuts the forward short."""


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _input_of(args, kwargs):
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key]
    return next(iter(kwargs.values()))


@contextlib.contextmanager
def capture(model, site: str, layers, stop: bool = True):
    """Yield a dict {layer: activation [batch, seq, d]} that each forward fills.

    With stop=True the forward raises StopForward right after the last requested activation is
    taken (run it through run_until_captured), so no later layer or LM head runs.
    """
    hf = _hf(model)
    layers = list(layers)
    points = {layer: site_point(hf, site, layer) for layer in layers}
    captured: dict = {}
    handles = []

    def make(layer, point):
        def store(value):
            captured[layer] = value.detach()
            if stop and len(captured) == len(points):
                raise StopForward

        if point.kind == "input":
            return point.module.register_forward_pre_hook(
                lambda module, args, kwargs: store(_input_of(args, kwargs)), with_kwargs=True)
        return point.module.register_forward_hook(lambda module, args, output: store(_first(output)))

    try:
        for layer, point in points.items():
            handles.append(make(layer, point))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_until_captured(model, **inputs):
    """Run the forward, swallowing the StopForward that capture(stop=True) raises."""
    hf = _hf(model)
    try:
        return hf(**inputs)
    except StopForward:
        return None


@contextlib.contextmanager
def replace_site(model, site: str, layer, fn):
    """Within the block, the forward uses fn(activation [batch, seq, d]) at the site instead."""
    point = site_point(_hf(model), site, layer)
    if point.kind == "input":
        def pre_hook(module, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            key = next(k for k in ("hidden_states", "input", "x") if k in kwargs)
            return args, {**kwargs, key: fn(kwargs[key])}
        handle = point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (fn(output[0]),) + output[1:]
            if isinstance(output, list):
                return [fn(output[0])] + output[1:]
            return fn(output)
        handle = point.module.register_forward_hook(hook)
    try:
        yield point
    finally:
        handle.remove()


def site_width(model, site: str, layers) -> int:
    """The width of a site's activation rows at `layers` (d_model for the residual stream; n_heads·d_head for
    attn_z, the MLP's width for mlp_hidden), read off one short forward pass; one store holds one width."""
    import torch

    from sae.errors import UserError
    hf = _hf(model)
    device = next(hf.parameters()).device
    with torch.inference_mode(), capture(hf, site, list(layers), stop=True) as captured:
        run_until_captured(hf, input_ids=torch.zeros((1, 2), dtype=torch.long, device=device))
    widths = {layer: int(captured[layer].shape[-1]) for layer in layers}
    if len(set(widths.values())) > 1:
        raise UserError(f"site {site} has different widths at layers {widths}: collect them into separate stores")
    return next(iter(widths.values()))
