"""A loaded language model and what the rest of the project reads off it (no loading, no hooks here)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

_FINAL_NORM_NAMES = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                     "norm", "ln_f", "final_layer_norm")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    family: str
    n_layers: int
    d_model: int
    is_causal: bool
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    special_ids: set = field(default_factory=set)
    note: str = ""


def _hf(model) -> nn.Module:
    return model.model if isinstance(model, LoadedModel) else model


def unembedding(loaded) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_U [vocab, d_model], final norm weight [d_model] or None) for logit-effect tables."""
    hf = _hf(loaded)
    out = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if out is not None and hasattr(out, "weight"):
        weight = out.weight
    else:
        weight = hf.get_input_embeddings().weight
    norm_weight = None
    for path in _FINAL_NORM_NAMES:
        try:
            norm = hf.get_submodule(path)
        except AttributeError:
            continue
        if getattr(norm, "weight", None) is not None:
            norm_weight = norm.weight.detach()
            break
    return weight.detach(), norm_weight


def describe(loaded: LoadedModel) -> str:
    return f"{loaded.name} ({loaded.family}, {loaded.n_layers} layers, d_model {loaded.d_model})"


def check_context_size(loaded, context_size: int) -> None:
    """Refuse a --context-size beyond what the model can take (its position limit), before any work."""
    config = getattr(_hf(loaded), "config", None)
    limit = next((getattr(config, key) for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
                  if isinstance(getattr(config, key, None), int)), None)
    if limit is not None and context_size > limit:
        from sae.errors import UserError
        raise UserError(f"--context-size {context_size} is more than {loaded.name} takes ({limit} positions)")
