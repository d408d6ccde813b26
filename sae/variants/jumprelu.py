"""`jumprelu` (Rajamanoharan et al. 2024; Gemma Scope): a ReLU with a learned per-latent jump threshold θ.

pre = (x − b_dec) W_enc + b_enc, codes = pre · H(pre − θ), x̂ = codes W_dec + b_dec,
loss = ‖x − x̂‖² + λ · s · Σ_j H(pre_j − θ_j)  (an L0 penalty, averaged over the batch).
H has no useful derivative, so θ learns through straight-through estimators with a kernel-density pseudo-
gradient: with the rectangle kernel K(u) = 1[|u| < ½] and bandwidth ε,
  ∂/∂θ [pre · H(pre − θ)] := −(θ/ε) K((pre − θ)/ε),   ∂/∂θ H(pre − θ) := −(1/ε) K((pre − θ)/ε),
and, as in Anthropic's January 2025 update, the L0 term's pseudo-gradient also reaches pre
(∂/∂pre H(pre − θ) := (1/ε) K((pre − θ)/ε)), so encoder and bias learn sparsity too, not the threshold alone.
θ = exp(log_threshold) stays positive; it starts small, with b_enc set so that each latent fires on a data
sample's top min(64 or --target-l0, d_sae/4)/d_sae share of tokens (a short run starts sparse, with small codes).
Codes are exactly zero below θ.

The current recipes, as knobs beside the original one:
- `--sparsity-penalty tanh` (Anthropic, January 2025): λ · Σ_j tanh(c · f_j) with c = 4 (f_j the code; decoder
  rows are unit norm) in place of the L0 count: the same push on small codes, none on large ones.
- `--pre-act-coefficient λ_p` (Anthropic, January 2025): + λ_p · Σ_j ReLU(θ_j − pre_j), which pulls every
  latent's pre-activation up toward its threshold, so latents that stopped firing come back (default 1e-3; 0: off).
- `--target-l0 T` holds the mean L0 near T (Gemma Scope 2's way): the sparsity term becomes a quadratic pull
  d_in · (L0 / T − 1)² of the batch's straight-through L0 toward T (scaled with d_in, as the reconstruction
  term is), which pushes both ways, and the thresholds start where about T latents fire per token. λ and the
  sparsity warm-up do not apply in this mode.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sae.errors import UserError
from sae.kernels.autograd import decode_listed, list_entries
from sae.kernels.matmul import addmm
from sae.variants.base import (SAE, Knob, LossOutput, StepContext, batch_fvu, encode_centred, fired, firing_quantile,
                               kaiming_pair, register, squared_error)

INITIAL_THRESHOLD = 0.1   # scaled units (inputs have about unit RMS per coordinate); before init_from_data
INITIAL_L0 = 64
TANH_SCALE = 4.0          # c of the tanh penalty (Anthropic's value)
TARGET_WEIGHT = 1.0       # the quadratic target term: TARGET_WEIGHT · d_in · (L0 / T − 1)²
PENALTIES = ("l0", "tanh")
LR_FACTOR = 2.7           # default learning rate: this times the trainer's d_sae-scaled rule (see default_lr)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = (-(threshold / eps) * rectangle((pre - threshold) / eps) * grad).sum_to_size(threshold.shape)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = rectangle((pre - threshold) / eps) * grad / eps        # [batch, d_sae]
        return kernel, -kernel.sum_to_size(threshold.shape), None


@register
class JumpReLUSAE(SAE):
    name = "jumprelu"
    KNOBS = {
        "l0_coefficient": Knob(0.5, "weight λ of the sparsity penalty (unused with --target-l0)", float,
                               minimum=0.0),
        "bandwidth": Knob(0.5, "width ε of the rectangle kernel of the threshold's pseudo-gradient", float,
                          positive=True),
        "target_l0": Knob(None, "hold the mean L0 near this value (a quadratic pull toward it in place of λ; "
                          "default: off)", float),
        "sparsity_penalty": Knob("l0", "l0 (the count, Gemma Scope) or tanh (Anthropic 2025)", str),
        "pre_act_coefficient": Knob(1e-3, "weight λ_p of the pre-activation loss Σ ReLU(θ − pre) against dead "
                                    "latents (Anthropic 2025; 0: off)", float, minimum=0.0),
    }

    @classmethod
    def check_knobs(cls, d_in, d_sae, knobs):
        super().check_knobs(d_in, d_sae, knobs)
        target = knobs.get("target_l0")
        if target is not None and not 0 < target <= d_sae:
            raise UserError(f"--target-l0 must be in (0, d_sae = {d_sae}] for jumprelu, got {target:g}")
        if knobs.get("sparsity_penalty") not in PENALTIES:
            raise UserError(f"--sparsity-penalty must be one of {', '.join(PENALTIES)} for jumprelu, "
                            f"got {knobs.get('sparsity_penalty')!r}")
    revive_dead = True
    sparse_decoding = True

    @property
    def default_lr(self) -> float:
        """LR_FACTOR × the trainer's rule 8e-4·sqrt(16384/d_sae), within [2e-4, 4e-3] (4e-3 at d_sae 4,608): log θ
        moves about lr a step, so at the rule's rate the thresholds barely leave their small start in a short run."""
        return float(min(4e-3, max(2e-4, LR_FACTOR * 8e-4 * math.sqrt(16384 / self.d_sae))))

    def build(self) -> None:
        W_enc, W_dec = kaiming_pair(self.d_in, self.d_sae)
        self.W_enc = nn.Parameter(W_enc)                         # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), float(torch.tensor(INITIAL_THRESHOLD).log())))
        self.W_dec = nn.Parameter(W_dec)                         # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        super().init_from_data(x)
        self.sparse_start(self.pre_acts(x), torch.ones(self.d_sae, dtype=torch.bool, device=x.device))

    @torch.no_grad()
    def sparse_start(self, pre: torch.Tensor, latents: torch.Tensor) -> None:
        """pre [n, m] pre-activations of the m chosen latents ([d_sae] bool) -> each fires on about
        min(T or 64, d_sae/4)/d_sae of the tokens: θ at the small INITIAL_THRESHOLD and b_enc lowered by the
        pre-activation quantile, so that firing codes start small (just above θ; a θ at the quantile itself
        would make every code at least that large) and the decoder can grow them."""
        quantile = firing_quantile(pre, self.knobs.get("target_l0") or INITIAL_L0, self.d_sae)   # [m]
        self.b_enc[latents] += INITIAL_THRESHOLD - quantile
        self.log_threshold[latents] = float(torch.tensor(INITIAL_THRESHOLD).log())

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()                          # [d_sae]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return encode_centred(x, self.W_enc, self.b_dec, self.b_enc)   # [batch, d_sae]

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def decode_scaled(self, codes: torch.Tensor) -> torch.Tensor:
        return addmm(self.b_dec, codes, self.W_dec)

    def training_loss(self, x_input, x_target, ctx: StepContext) -> LossOutput:
        pre = self.pre_acts(x_input)                              # [batch, d_sae]
        threshold, eps, batch = self.threshold, self.knobs["bandwidth"], pre.shape[0]
        # Once codes are sparse, every term but the pre-activation loss lives on the entries above θ − ε/2: the
        # firing codes and the kernel's window, where the threshold's pseudo-gradients are (list_entries: on the
        # CPU, at most 1/16 of the entries). The codes, the decode and the L0 term are then [n] vectors.
        # (a hair wider than the window: an entry at its edge, rounded either way, is listed; extra ones do no harm)
        listing = list_entries(pre.detach() - (threshold.detach() - eps * (0.5 + 1e-6)))
        if listing is None:
            pre_on, threshold_on = pre, threshold                 # [batch, d_sae], [d_sae]
        else:
            pre_on, threshold_on = pre[listing.rows, listing.cols], threshold[listing.cols]   # [n] each
        codes = _JumpReLU.apply(pre_on, threshold_on, eps)        # [batch, d_sae] or [n]
        if listing is None:
            x_hat, counts = self.decode_scaled(codes), fired(codes)
        else:
            x_hat = decode_listed(codes, listing, self.W_dec, self.b_dec)
            counts = fired(codes, listing=listing, d_sae=self.d_sae)     # [d_sae]
        recon = squared_error(x_hat, x_target)
        if self.knobs["sparsity_penalty"] == "tanh":
            sparsity = torch.tanh(TANH_SCALE * codes).sum() / batch
        else:
            sparsity = _Step.apply(pre_on, threshold_on, eps).sum() / batch
        target = self.knobs["target_l0"]
        if target is None:
            weight = self.knobs["l0_coefficient"] * ctx.sparsity_scale
            loss = recon + weight * sparsity
        else:   # a quadratic pull of the batch's straight-through L0 toward the target
            l0 = sparsity if self.knobs["sparsity_penalty"] == "l0" else _Step.apply(pre_on, threshold_on, eps).sum() / batch
            loss = recon + TARGET_WEIGHT * self.d_in * (l0 / target - 1.0).pow(2)
        terms = {"recon": recon.detach(), "sparsity": sparsity.detach(), "fvu": batch_fvu(x_hat.detach(), x_target)}
        if self.knobs["pre_act_coefficient"] > 0:
            pre_act = torch.relu(threshold - pre).sum(dim=1).mean()
            loss = loss + self.knobs["pre_act_coefficient"] * pre_act
            terms["pre_act"] = pre_act.detach()
        return LossOutput(loss, x_hat, counts, terms)

    @torch.no_grad()
    def revive(self, dead_mask, x, x_hat) -> int:
        revived = super().revive(dead_mask, x, x_hat)
        if revived:
            # a revived latent starts as sparse as a fresh one: a fixed small θ would let it fire on a large
            # share of tokens at once, and many such latents blow the reconstruction up
            self.sparse_start(self.pre_acts(x)[:, dead_mask], dead_mask)
        return revived
