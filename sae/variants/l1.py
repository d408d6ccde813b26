"""`l1`: the overcomplete ReLU SAE with an L1 penalty, after Anthropic's April 2024 update.

codes f = ReLU((x − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec,
loss = ‖x − x̂‖² + λ · s · Σ_j f_j ‖W_dec[j]‖, with s the trainer's sparsity warm-up factor (ctx.sparsity_scale).
Weighting each code by its decoder row's norm replaces the unit-norm constraint (decoder rows are free) and makes
the penalty invariant to trading scale between encoder and decoder. Decoder rows start at norm 0.1 in random
directions, the encoder at the decoder's transpose, b_enc at zero.
A pre-activation loss (Anthropic, January 2025), on by default: + λ_p · Σ_j ReLU(−pre_j) ‖W_dec[j]‖, a small
pull up on every latent where it does not fire, so that latents that stop firing late (after the trainer's last
revival, at 80% of the run) come back; a latent firing on less than about λ_p/λ of the tokens is pulled up.
A dead latent is revived sparse (the trainer's resampling, then revive() below): its decoder row at the live
rows' mean norm, and b_enc lowered so that it fires on the batch's top REVIVED_L0/d_sae share of tokens with small
codes; revived at b_enc = 0 it would fire on half the tokens, pay the full L1 price at once and die again.
"""
from __future__ import annotations

import torch

from sae.kernels.autograd import decode_listed, list_entries
from sae.variants.base import (SAE, Knob, LossOutput, StepContext, batch_fvu, fired, firing_quantile, register,
                               squared_error)
from sae.variants.relu import ReLUAutoencoder

REVIVED_L0 = 64     # a revived latent fires on about this many tokens in d_sae


@register
class L1SAE(ReLUAutoencoder):
    name = "l1"
    KNOBS = {"l1_coefficient": Knob(5.0, "weight λ of the L1 penalty Σ_j f_j ‖W_dec[j]‖", float, minimum=0.0),
             "pre_act_coefficient": Knob(0.002, "weight λ_p of the pre-activation loss Σ_j ReLU(−pre_j) ‖W_dec[j]‖, "
                                         "which lifts latents that stopped firing (0: off)", float, minimum=0.0)}
    unit_norm_decoder = False
    revive_dead = True
    sparse_decoding = True

    def build(self) -> None:
        super().build()
        self.W_dec.data.mul_(0.1)
        self.W_enc.data.copy_(self.W_dec.data.T)

    def training_loss(self, x_input, x_target, ctx: StepContext) -> LossOutput:
        pre = self.pre_acts(x_input)                                 # [batch, d_sae]
        norms = self.W_dec.norm(dim=1)                               # [d_sae]
        listing = list_entries(pre)          # once codes are sparse (CPU): the firing codes as [n] vectors
        if listing is None:
            codes = torch.relu(pre)                                  # [batch, d_sae]
            x_hat, counts, l1 = self.decode_scaled(codes), fired(codes), (codes @ norms).mean()
        else:
            codes = pre[listing.rows, listing.cols]                  # [n], each > 0
            x_hat = decode_listed(codes, listing, self.W_dec, self.b_dec)
            counts = fired(codes, listing=listing, d_sae=self.d_sae)     # [d_sae]
            l1 = (codes * norms[listing.cols]).sum() / pre.shape[0]
        recon = squared_error(x_hat, x_target)
        terms = {"l1": self.knobs["l1_coefficient"] * ctx.sparsity_scale * l1}
        if self.knobs["pre_act_coefficient"] > 0:
            terms["pre_act"] = self.knobs["pre_act_coefficient"] * (torch.relu(-pre) @ norms).mean()
        return LossOutput(recon + sum(terms.values()), x_hat, counts,
                          {"recon": recon.detach(), "fvu": batch_fvu(x_hat.detach(), x_target),
                           **{name: value.detach() for name, value in terms.items()}})

    @torch.no_grad()
    def revive(self, dead_mask, x, x_hat) -> int:
        revived = SAE.revive(self, dead_mask, x, x_hat)             # unit decoder rows at poorly fit inputs
        if revived:
            alive = ~dead_mask
            if bool(alive.any()):
                self.W_dec[dead_mask] *= self.W_dec[alive].norm(dim=1).mean()
            pre = self.pre_acts(x)[:, dead_mask]                      # [batch, n_dead]
            self.b_enc[dead_mask] -= firing_quantile(pre, REVIVED_L0, self.d_sae)
        return revived
