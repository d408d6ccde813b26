"""Freezing a transformers model's nonlinearities at their values on the clean forward: normalisation scales
and attention patterns. With both frozen (and the MLPs replaced, see replacement.py) the residual stream is an
affine function of what is written into it, so gradients are exact direct effects.

    with Freezer(hf_model) as freezer:
        freezer.mode = "record";  hf_model(input_ids=ids)     # clean pass: scales and patterns stored
        freezer.mode = "frozen";  hf_model(input_ids=ids_b)   # any batch of copies: linear in the residual

Norms: RMSNorm (Llama, Mistral, Qwen, Phi-3 ...; Gemma's (1 + weight)) and nn.LayerNorm (GPT-2, GPT-NeoX):
the per-position divisor is stored and detached; LayerNorm's centering stays (it is linear). Attention: a
function registered in transformers' AttentionInterface that, recording, computes the eager causal softmax
pattern and, frozen, applies the stored pattern (detached) to the values. Norms on queries and keys only
(Qwen 3, OLMo 2) are left alone: queries and keys no longer matter once the pattern is frozen.
"""
from __future__ import annotations

import torch
from torch import nn

from sae.errors import UserError

ATTENTION_NAME = "sae_frozen"
_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm", "key_layernorm")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (as the models compute norms and softmax), else as it is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _norm_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.LayerNorm):
        return "layer"
    name = type(module).__name__
    if name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
        return "rms_gemma" if name.startswith("Gemma") else "rms"
    return None


def _eps(module: nn.Module) -> float:
    for key in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, key, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise UserError(f"cannot read the epsilon of {type(module).__name__}: attribution does not support this norm")


class Freezer:
    """Hooks on every residual-path norm plus the frozen attention function (see the module docstring)."""

    def __init__(self, hf_model: nn.Module):
        self.hf = hf_model
        self.mode = "record"
        self.scales: dict[int, torch.Tensor] = {}       # id(norm) -> [1, n_pos, 1] divisor, clean pass
        self.patterns: dict[int, torch.Tensor] = {}     # id(attention) -> [1, n_heads, n_pos, n_pos]
        self._handles: list = []
        self._saved_impl = None
        self.norms = [(name, module, kind) for name, module in hf_model.named_modules()
                      if (kind := _norm_kind(module)) and name.rsplit(".", 1)[-1] not in _QK_NORMS]

    # ---- norms --------------------------------------------------------------------------------
    def _norm_hook(self, module, kind):
        def hook(mod, args, output):
            x = args[0]
            x32 = _wide(x)
            if kind == "layer":
                centred = x32 - x32.mean(-1, keepdim=True)
                if self.mode == "record":
                    self.scales[id(mod)] = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + mod.eps).detach()
                normed = centred / self._scale(mod, x)
                if mod.weight is not None:
                    normed = normed * _wide(mod.weight)
                if mod.bias is not None:
                    normed = normed + _wide(mod.bias)
                return normed.to(output.dtype)
            if self.mode == "record":
                self.scales[id(mod)] = torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + _eps(mod)).detach()
            normed = (x32 / self._scale(mod, x)).to(x.dtype)
            weight = (1.0 + _wide(mod.weight)) if kind == "rms_gemma" else mod.weight
            return (weight * normed).to(output.dtype)
        return hook

    def _scale(self, module, x) -> torch.Tensor:
        scale = self.scales.get(id(module))
        if scale is None or scale.shape[-2] != x.shape[-2]:
            raise UserError("the frozen model was run on a different prompt than the clean pass recorded")
        return scale

    # ---- attention ----------------------------------------------------------------------------
    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The AttentionInterface function: query/key/value [batch, heads, n_pos, d_head] -> ([batch, n_pos,
        heads, d_head], pattern)."""
        n_heads = query.shape[1]
        repeat = n_heads // value.shape[1]
        values = value.repeat_interleave(repeat, dim=1) if repeat > 1 else value      # [batch, heads, n, d_head]
        if self.mode == "record":
            keys = key.repeat_interleave(n_heads // key.shape[1], dim=1) if key.shape[1] != n_heads else key
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            scores = (_wide(query) @ _wide(keys).transpose(-1, -2)) * scaling         # [batch, heads, n, n]
            n = scores.shape[-1]
            causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            window = kwargs.get("sliding_window")
            if isinstance(window, int) and window > 0:
                near = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(-window + 1)
                scores = scores.masked_fill(~near, float("-inf"))
            self.patterns[id(module)] = torch.softmax(scores, dim=-1).detach()
        pattern = self.patterns.get(id(module))
        if pattern is None or pattern.shape[-1] != values.shape[-2]:
            raise UserError("the frozen model was run on a different prompt than the clean pass recorded")
        out = pattern.to(values.dtype) @ values                                        # [batch, heads, n, d_head]
        return out.transpose(1, 2).contiguous(), None

    # ---- context ------------------------------------------------------------------------------
    def __enter__(self) -> "Freezer":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, self.attention)
        config = self.hf.config
        self._saved_impl = config._attn_implementation
        config._attn_implementation = ATTENTION_NAME
        for _, module, kind in self.norms:
            self._handles.append(module.register_forward_hook(self._norm_hook(module, kind)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.hf.config._attn_implementation = self._saved_impl
