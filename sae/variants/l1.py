"""`l1`: the overcomplete ReLU SAE with an L1 penalty, after Anthropic's April 2024 update.

codes f = ReLU((x − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec,
loss = ‖x − x̂‖² + λ · s · Σ_j f_j ‖W_dec[j]‖, with s the trainer's sparsity warm-up factor (ctx.sparsity_scale).
Weighting each code by its decoder row's norm replaces the unit-norm constraint (decoder rows are free) and makes
the penalty invariant to trading scale between encoder and decoder. Decoder rows start at norm 0.1 in random
directions, the encoder at the decoder's transpose, b_enc at zero.
"""
from __future__ import annotations

from sae.variants.base import Knob, StepContext, register
from sae.variants.relu import ReLUAutoencoder


@register
class L1SAE(ReLUAutoencoder):
    name = "l1"
    KNOBS = {"l1_coefficient": Knob(5.0, "weight λ of the L1 penalty Σ_j f_j ‖W_dec[j]‖", float, minimum=0.0)}
    unit_norm_decoder = False
    revive_dead = True

    def build(self) -> None:
        super().build()
        self.W_dec.data.mul_(0.1)
        self.W_enc.data.copy_(self.W_dec.data.T)

    def penalty(self, x, codes, ctx: StepContext):
        weighted = codes @ self.W_dec.norm(dim=1)                   # [batch]
        return {"l1": self.knobs["l1_coefficient"] * ctx.sparsity_scale * weighted.mean()}
