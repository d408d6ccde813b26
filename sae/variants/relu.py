"""`relu`: the plain ReLU autoencoder, undercomplete or overcomplete, trained on reconstruction alone.

codes = ReLU((x − b_dec) W_enc + b_enc), x̂ = codes W_dec + b_dec. Nothing makes it sparse: overcomplete and
unregularised it learns a dense near-identity code (the baseline the sparse variants are measured against).
"""
from __future__ import annotations

import torch
from torch import nn

from sae.kernels.matmul import addmm
from sae.variants.base import SAE, LossOutput, StepContext, batch_fvu, fired, kaiming_pair, register, squared_error


@register
class ReLUAutoencoder(SAE):
    name = "relu"
    KNOBS = {}
    unit_norm_decoder = False
    revive_dead = True

    def build(self) -> None:
        W_enc, W_dec = kaiming_pair(self.d_in, self.d_sae)
        self.W_enc = nn.Parameter(W_enc)                       # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))     # [d_sae]
        self.W_dec = nn.Parameter(W_dec)                       # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))      # [d_in]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        # x W + (b_enc − b_dec W): the bias folded first, so the [batch, d_sae] result is touched once
        bias = self.b_enc - self.b_dec @ self.W_enc              # [d_sae]
        return addmm(bias, x, self.W_enc)                        # [batch, d_sae]

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre.relu_() if not torch.is_grad_enabled() else torch.relu(pre)

    def decode_scaled(self, codes: torch.Tensor) -> torch.Tensor:
        return addmm(self.b_dec, codes, self.W_dec)              # [batch, d_in]

    def penalty(self, x: torch.Tensor, codes: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Extra loss terms (none for the plain autoencoder)."""
        return {}

    def training_loss(self, x_input, x_target, ctx: StepContext) -> LossOutput:
        codes = self.encode_scaled(x_input)                      # [batch, d_sae]
        x_hat = self.decode_scaled(codes)
        recon = squared_error(x_hat, x_target)
        terms = self.penalty(x_input, codes, ctx)
        loss = recon + sum(terms.values()) if terms else recon
        return LossOutput(loss, x_hat, fired(codes),
                          {"recon": recon.detach(), "fvu": batch_fvu(x_hat.detach(), x_target),
                           **{k: v.detach() for k, v in terms.items()}})
