"""`kl`: the classic sparse autoencoder with sigmoid codes and a KL sparsity penalty (Ng's lecture notes).

codes h = σ((x − b_dec) W_enc + b_enc) ∈ (0, 1), x̂ = h W_dec + b_dec,
loss = ‖x − x̂‖² + β · s · Σ_j KL(ρ ‖ ρ̂_j), where ρ̂_j is latent j's mean code over the batch and
KL(ρ‖ρ̂) = ρ log(ρ/ρ̂) + (1 − ρ) log((1 − ρ)/(1 − ρ̂)).
Sigmoid codes are never exactly zero, so a latent *fires* when its code exceeds τ = 0.5 (its pre-activation is
positive); L0 and dead latents are counted at that threshold (config.json records it as fire_threshold).
"""
from __future__ import annotations

import torch

from sae.errors import UserError
from sae.variants.base import Knob, LossOutput, StepContext, batch_fvu, fired, register, squared_error
from sae.variants.relu import ReLUAutoencoder

FIRE_THRESHOLD = 0.5


def kl_sparsity(rho: float, rho_hat: torch.Tensor) -> torch.Tensor:
    """Σ_j KL(Bernoulli(ρ) ‖ Bernoulli(ρ̂_j)) over the latents' mean activations rho_hat [d_sae]."""
    rho_hat = rho_hat.clamp(1e-6, 1 - 1e-6)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


@register
class KLSparseAutoencoder(ReLUAutoencoder):
    name = "kl"
    KNOBS = {
        "sparsity_target": Knob(0.02, "target mean activation ρ of each sigmoid unit, in (0, 1)", float, positive=True),
        "kl_coefficient": Knob(0.1, "weight β of the penalty Σ_j KL(ρ‖ρ̂_j)", float, minimum=0.0),
    }
    unit_norm_decoder = True
    revive_dead = True

    @classmethod
    def check_knobs(cls, d_in, d_sae, knobs):
        super().check_knobs(d_in, d_sae, knobs)
        if not 0 < knobs["sparsity_target"] < 1:
            raise UserError(f"--sparsity-target must be in (0, 1) for kl, got {knobs['sparsity_target']}")

    def build(self) -> None:
        super().build()
        self.b_enc.data.fill_(-2.0)                               # start near ρ rather than at σ(0) = 0.5

    @property
    def fire_threshold(self) -> float:
        return FIRE_THRESHOLD

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.pre_acts(x))

    def training_loss(self, x_input, x_target, ctx: StepContext) -> LossOutput:
        codes = self.encode_scaled(x_input)                       # [batch, d_sae]
        x_hat = self.decode_scaled(codes)
        recon = squared_error(x_hat, x_target)
        sparsity = kl_sparsity(self.knobs["sparsity_target"], codes.mean(dim=0))
        loss = recon + self.knobs["kl_coefficient"] * ctx.sparsity_scale * sparsity
        return LossOutput(loss, x_hat, fired(codes, FIRE_THRESHOLD),
                          {"recon": recon.detach(), "kl_sparsity": sparsity.detach(),
                           "fvu": batch_fvu(x_hat.detach(), x_target)})
