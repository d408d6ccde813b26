"""`sae.splice`: run a language model with an SAE's reconstruction in place of a site's activation.

    with sae.splice(hf_model, sae_model, site="resid_post", layer=6) as handle:
        handle.keep_mask = input_ids == bos_id     # optional, per batch: positions left untouched
        logits = hf_model(input_ids).logits

The hook itself is sae.models.replace_site (site resolution lives there, for every family);
this module only says what replaces the activation: the reconstruction (splice), zeros
(zero_ablate) or any function of it (replace). Positions where `keep_mask` is true keep the
original activation in every case (special tokens: BOS, EOS, padding).
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class SpliceHandle:
    """Yielded by the context managers. Set `keep_mask` ([batch, seq] bool, or None) before each
    forward; after it, `codes` holds the SAE's codes of the last forward ([batch, seq, d_sae]) when
    `record_codes` was asked for."""
    keep_mask: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    calls: int = 0


def _unwrap(hf_model):
    """Accept a sae.models.LoadedModel as well as the bare transformers model."""
    if isinstance(hf_model, torch.nn.Module):
        return hf_model
    return getattr(hf_model, "model", hf_model)


def _keep(activation: torch.Tensor, replaced: torch.Tensor, keep_mask: torch.Tensor | None) -> torch.Tensor:
    """Where keep_mask [batch, seq] is true, the original activation; elsewhere the replacement."""
    if keep_mask is None:
        return replaced
    keep_mask = keep_mask.to(activation.device)
    if keep_mask.shape != activation.shape[:-1]:
        raise ValueError(f"keep_mask has shape {tuple(keep_mask.shape)}, the activation "
                         f"{tuple(activation.shape)} (expected its leading dimensions)")
    return torch.where(keep_mask.unsqueeze(-1), activation, replaced)


@contextmanager
def replace(hf_model, site: str, layer, fn: Callable[[torch.Tensor], torch.Tensor],
            keep_mask: torch.Tensor | None = None):
    """Replace the site's activation [batch, seq, d] by fn(activation) (same shape) at every
    position except where the handle's keep_mask is true."""
    from sae.lm import replace_site

    handle = SpliceHandle(keep_mask=keep_mask)

    def hook(activation: torch.Tensor) -> torch.Tensor:
        handle.calls += 1
        replaced = fn(activation).to(activation.dtype)
        return _keep(activation, replaced, handle.keep_mask)

    with replace_site(_unwrap(hf_model), site, layer, hook):
        yield handle


@contextmanager
def splice(hf_model, sae, site: str, layer, error_term: bool = False, keep_mask: torch.Tensor | None = None,
           record_codes: bool = False):
    """The SAE's reconstruction replaces the site's activation (public API, docs/python-api.md).

    error_term=True adds the SAE's error back (x̂ + (x − x̂), computed without gradient): the forward
    is unchanged but gradients flow through the SAE's latents, as SAELens's use_error_term.
    """
    state = {}

    def reconstruct(activation: torch.Tensor) -> torch.Tensor:
        x = activation.reshape(-1, activation.shape[-1])  # [batch * seq, d_in]
        param = next(sae.parameters(), None)
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype)
        codes = sae.encode(x)  # [batch * seq, d_sae]
        x_hat = sae.decode(codes)  # [batch * seq, d_in]
        if record_codes:
            state["handle"].codes = codes.reshape(*activation.shape[:-1], -1)
        if error_term:
            x_hat = x_hat + (x - x_hat).detach()
        return x_hat.to(device=activation.device, dtype=activation.dtype).reshape(activation.shape)

    with replace(hf_model, site, layer, reconstruct, keep_mask=keep_mask) as handle:
        state["handle"] = handle
        yield handle


@contextmanager
def zero_ablate(hf_model, site: str, layer, keep_mask: torch.Tensor | None = None):
    """Zeros replace the site's activation (except where keep_mask is true)."""
    with replace(hf_model, site, layer, torch.zeros_like, keep_mask=keep_mask) as handle:
        yield handle


class _CallableModule(types.ModuleType):
    """`import sae.evaluate.splice` binds the package attribute `sae.splice` to this module, shadowing the
    function of the same name: calling the module calls the function, so `sae.splice(...)` works
    whichever was imported first."""

    def __call__(self, *args, **kwargs):
        return splice(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
