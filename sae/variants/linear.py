"""`linear`: the tied linear autoencoder on centred data, undercomplete — gradient-descent PCA.

codes = (x − b_dec) W_decᵀ (signed, dense), x̂ = codes W_dec + b_dec, loss = ‖x − x̂‖². At its minimum the rows of
W_dec span the top-d_sae principal subspace (Baldi & Hornik 1989). b_dec is the data mean (centring), set from
data before training. d_sae must be below d_in (default d_in / 8): an overcomplete tied linear map just learns
the identity.
"""
from __future__ import annotations

import torch
from torch import nn

from sae.errors import UserError
from sae.kernels.matmul import addmm, mm
from sae.variants.base import SAE, LossOutput, StepContext, batch_fvu, register, squared_error


@register
class LinearAutoencoder(SAE):
    name = "linear"
    KNOBS = {}
    signed_codes = True
    unit_norm_decoder = False

    @classmethod
    def default_d_sae(cls, d_in: int, expansion: float) -> int:
        return max(1, d_in // 8)

    @classmethod
    def check_width(cls, d_in: int, d_sae: int) -> None:
        super().check_width(d_in, d_sae)
        if d_sae >= d_in:
            raise UserError(f"linear needs d_sae < d_in (it is PCA); got d_sae {d_sae} with d_in {d_in}")

    def build(self) -> None:
        basis = torch.linalg.qr(torch.randn(self.d_in, self.d_sae)).Q   # [d_in, d_sae] orthonormal columns
        self.W_dec = nn.Parameter(basis.T.contiguous())                  # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))                # [d_in]

    @property
    def W_enc(self) -> torch.Tensor:
        """[d_in, d_sae] the tied encoder, for code that reads encoder weights (export, analysis)."""
        return self.W_dec.T

    @property
    def b_enc(self) -> torch.Tensor:
        """[d_sae] so that codes = x W_enc + b_enc (the centring folded in)."""
        return -(self.b_dec @ self.W_dec.T)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        self.b_dec.copy_(x.mean(dim=0))

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return mm(x - self.b_dec, self.W_dec.T)                          # [batch, d_sae]

    def decode_scaled(self, codes: torch.Tensor) -> torch.Tensor:
        return addmm(self.b_dec, codes, self.W_dec)                      # [batch, d_in]

    def training_loss(self, x_input, x_target, ctx: StepContext) -> LossOutput:
        x_hat = self.decode_scaled(self.encode_scaled(x_input))
        recon = squared_error(x_hat, x_target)
        return LossOutput(recon, x_hat, None, {"recon": recon.detach(), "fvu": batch_fvu(x_hat.detach(), x_target)})
