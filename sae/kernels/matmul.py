"""The fastest exact fp32 matrix product this machine has, behind `mm`, `addmm` and `linear` (with autograd).

torch.mm on the CPU calls MKL's sgemm, which runs far below the hardware on AMD CPUs: on the 2-core Zen 5
machines of this project a [1,024, 576] × [576, 4,608] product takes 24 ms through MKL and 11 ms through
oneDNN (PyTorch's other CPU matrix library, reached by torch.ops.mkldnn._linear_pointwise), in every layout
an SAE needs (x Wᵀ, codes W, and both weight gradients). Both are IEEE fp32 with fp32 accumulation; the
results differ in rounding order only (about 1e-6 relative), so this is the same computation, faster.

On CUDA, or where oneDNN is absent, or for small products, everything falls back to torch.mm / addmm.
SAE_MATMUL=torch turns the oneDNN path off (to compare, or should a future build misbehave).
Inside `with bf16_products():` the CPU products read bf16-rounded inputs instead and round their
product to bf16 (not exact; `sae train --bf16`), twice as fast again on CPUs with bf16 units.

    sae.matmul.mm(a, b)            # a [n, k] @ b [k, m] -> [n, m]
    sae.matmul.addmm(bias, a, b)   # a @ b + bias [m], the bias added inside the product
    sae.matmul.linear(x, w, bias)  # F.linear: x [..., k] @ w[m, k]ᵀ + bias, any leading dims
"""
from __future__ import annotations

import functools
import os
import threading

import torch

_MIN_FLOP = 1 << 21   # below this the call overhead dominates and torch.mm is as good


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """True when torch.ops.mkldnn._linear_pointwise exists, works and is not switched off."""
    if os.environ.get("SAE_MATMUL", "").lower() == "torch":
        return False
    try:
        a, w = torch.ones(2, 3), torch.ones(4, 3)
        out = torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
        return bool(out.shape == (2, 4) and torch.all(out == 3))
    except Exception:  # noqa: BLE001 - a capability probe: any failure means "not here"
        return False


def _strided_ok(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is row- or column-major (oneDNN reads both), else a contiguous copy."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def _use_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device.type == "cpu" and a.dtype == torch.float32 and b.dtype == torch.float32
            and a.dim() == 2 and b.dim() == 2 and a.shape[0] * a.shape[1] * b.shape[1] >= _MIN_FLOP
            and onednn_available())


_BF16 = threading.local()


class bf16_products:
    """Within the block, CPU fp32 products of `addmm`/`mm`/`linear` read their inputs rounded to bf16
    (oneDNN accumulates in fp32 and rounds the product to bf16, as CUDA's bf16 autocast does); a bias is
    then added in fp32 and the result is fp32. For CPUs with bf16 units (AVX512-BF16, AMX), where the
    product runs 2–4× faster. Not exact: inputs and product keep 8 significant bits. `sae train --bf16`
    uses it for the training steps only; eval and analysis stay fp32. Reusable, re-entrant, per thread
    (CPU autograd runs the backward in the calling thread)."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)

    def __enter__(self):
        if not hasattr(_BF16, "saved"):
            _BF16.saved = []
        _BF16.saved.append(getattr(_BF16, "on", False))
        _BF16.on = self.enabled
        return self

    def __exit__(self, *exc):
        _BF16.on = _BF16.saved.pop()
        return False


def _onednn_addmm(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (+ bias) on oneDNN, no autograd; the caller has checked _use_onednn(a, b)."""
    if getattr(_BF16, "on", False):   # the product's result is bf16; the bias is added to it in fp32
        out = torch.ops.mkldnn._linear_pointwise(a.bfloat16(), b.t().bfloat16(), None, "none", [], "").float()
        return out if bias is None else out.add_(bias)
    bias = None if bias is None else bias.contiguous()
    return torch.ops.mkldnn._linear_pointwise(_strided_ok(a), _strided_ok(b.t()), bias, "none", [], "")


def raw_addmm(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [n, k] @ b [k, m] (+ bias [m]) with no autograd: oneDNN on the CPU in fp32, torch elsewhere."""
    if _use_onednn(a, b) and (bias is None or (bias.dim() == 1 and bias.dtype == torch.float32)):
        return _onednn_addmm(bias, a, b)
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


class _AddMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, bias, a, b):
        ctx.save_for_backward(a, b)
        ctx.has_bias = bias is not None
        return _onednn_addmm(bias, a, b)

    @staticmethod
    def backward(ctx, grad):                      # grad [n, m]
        a, b = ctx.saved_tensors
        grad_bias = grad.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[0] else None
        grad_a = raw_addmm(None, grad, b.t()) if ctx.needs_input_grad[1] else None   # [n, k]
        grad_b = None
        if ctx.needs_input_grad[2]:   # [k, m], in b's own layout (a latent-major weight gets a latent-major grad)
            transposed = not b.is_contiguous() and b.t().is_contiguous()
            grad_b = raw_addmm(None, grad.t(), a).t() if transposed else raw_addmm(None, a.t(), grad)
        return grad_bias, grad_a, grad_b


def _differentiable_onednn_addmm(bias, a, b) -> torch.Tensor:
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (bias, a, b)):
        return _onednn_addmm(bias, a, b)
    return _AddMM.apply(bias, a, b)


def addmm(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [n, k] @ b [k, m] + bias [m] (bias may be None), differentiable in all three."""
    if not _use_onednn(a, b) or (bias is not None and (bias.dim() != 1 or bias.dtype != torch.float32)):
        return a @ b if bias is None else a @ b + bias   # (under CUDA autocast the sum stays fp32)
    return _differentiable_onednn_addmm(bias, a, b)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [n, k] @ b [k, m] -> [n, m], differentiable."""
    return addmm(None, a, b)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with x [..., k], weight [m, k] -> [..., m], through addmm."""
    flat = x.reshape(-1, x.shape[-1])
    if not _use_onednn(flat, weight.t()) or (bias is not None and bias.dtype != torch.float32):
        return torch.nn.functional.linear(x, weight, bias)   # CUDA, other dtypes, small products: exactly torch's
    return _differentiable_onednn_addmm(bias, flat, weight.t()).reshape(*x.shape[:-1], weight.shape[0])


def _linear_forward(module, x):
    return linear(x, module.weight, module.bias)


def _conv1d_forward(module, x):        # transformers' Conv1D (GPT-2): x @ weight [in, out] + bias
    flat = x.reshape(-1, x.shape[-1])
    product = _differentiable_onednn_addmm if _use_onednn(flat, module.weight) else torch.addmm  # else Conv1D's own
    return product(module.bias, flat, module.weight).reshape(*x.shape[:-1], module.weight.shape[1])


def accelerate_linears(model: torch.nn.Module) -> int:
    """Route every nn.Linear (and transformers' Conv1D) of a model through `linear`/`addmm`: the same
    products, on oneDNN when they run on the CPU in fp32 (a language model's forward is mostly these).
    Hooks on the modules keep working; on CUDA each call falls through to torch. Returns how many."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:                  # transformers absent: only nn.Linear
        Conv1D = ()
    patched = 0
    for module in model.modules():
        if "forward" in vars(module):    # already patched (or a forward of the user's own)
            continue
        if type(module) is torch.nn.Linear:
            module.forward = functools.partial(_linear_forward, module)
        elif Conv1D and type(module) is Conv1D:
            module.forward = functools.partial(_conv1d_forward, module)
        else:
            continue
        patched += 1
    return patched
