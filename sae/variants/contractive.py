"""`contractive` (Rifai et al. 2011): a ReLU autoencoder plus λ‖J_f(x)‖_F², the encoder Jacobian's squared
Frobenius norm, in closed form.

For codes f(x) = ReLU((x − b_dec) W_enc + b_enc), ∂f_j/∂x = 1[pre_j > 0] W_enc[:, j], so
‖J_f(x)‖_F² = Σ_j 1[pre_j > 0] ‖W_enc[:, j]‖²: an O(d_sae) term once the encoder's column norms are known.
The decoder rows are kept at unit norm, so the penalty cannot be dodged by shrinking the encoder and growing the
decoder.
"""
from __future__ import annotations

import torch

from sae.variants.base import Knob, StepContext, register
from sae.variants.relu import ReLUAutoencoder


@register
class ContractiveAutoencoder(ReLUAutoencoder):
    name = "contractive"
    KNOBS = {"contractive_coefficient": Knob(0.01, "weight λ of the Jacobian penalty ‖J_f(x)‖_F²", float, minimum=0.0)}
    unit_norm_decoder = True

    def jacobian_penalty(self, x: torch.Tensor) -> torch.Tensor:
        """[batch] ‖∂codes/∂x‖_F² for each token, in closed form."""
        active = (self.pre_acts(x) > 0).to(x.dtype)              # [batch, d_sae]
        return active @ self.W_enc.pow(2).sum(dim=0)             # [batch]

    def penalty(self, x, codes, ctx: StepContext):
        jac = (codes > 0).to(x.dtype) @ self.W_enc.pow(2).sum(dim=0)  # [batch], same as jacobian_penalty
        return {"contractive": self.knobs["contractive_coefficient"] * ctx.sparsity_scale * jac.mean()}
