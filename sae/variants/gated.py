"""`gated` (Rajamanoharan et al. 2024): separate *which* latents fire from *how strongly*.

π_gate = (x − b_dec) W_enc + b_enc decides which latents fire (f_gate = 1[π_gate > 0]); the magnitude path shares
the encoder directions, rescaled per latent: π_mag = (x − b_dec) (W_enc · exp(r_mag)) + b_mag,
codes = f_gate · ReLU(π_mag), x̂ = codes W_dec + b_dec (unit-norm decoder rows).
loss = ‖x − x̂‖² + λ · s · ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖², the last ("aux") term decoding the
gate's ReLU through a frozen copy of the decoder, so that the gate learns to reconstruct too (the L1 term
alone would only shrink it).
Sparse start (the default, --start-l0 64; 0 for the paper's zero biases): b_enc = b_mag = −q, with q each
latent's pre-activation quantile on the initial sample such that about 64 latents open per token, so training
starts sparse with small codes (a ReLU with that bias) instead of with half the latents open; a revived latent
starts the same way. At the bench's budget (512 steps) this took held-out FVU from 0.204 at L0 42.5
to 0.081 at L0 21.6 (dead 0.02% → 3.2%).
p-annealing (dictionary_learning's GatedAnneal trainer), an option: with --p-end p_e < 1 the penalty becomes
λ · s · Σ_j ReLU(π_gate)_j^p with p falling linearly from 1 to p_e over training, an L_p penalty that nears the
L0 count the gate actually pays for (1: off, the plain L1 of the paper).
"""
from __future__ import annotations

import torch
from torch import nn

from sae.errors import UserError
from sae.kernels.autograd import decode_listed, list_entries
from sae.kernels.matmul import addmm, mm
from sae.variants.base import (SAE, Knob, LossOutput, StepContext, batch_fvu, encode_centred, fired, firing_quantile,
                               kaiming_pair, register, squared_error)


@register
class GatedSAE(SAE):
    name = "gated"
    KNOBS = {"l1_coefficient": Knob(4.0, "weight λ of the L1 penalty on the gate's ReLU", float, minimum=0.0),
             "p_end": Knob(1.0, "p-annealing: the exponent of the penalty Σ ReLU(π_gate)^p falls linearly from 1 "
                           "to this value over training, in (0, 1] (1: off)", float),
             "start_l0": Knob(64.0, "sparse start: gate and magnitude biases set so that about this many "
                              "latents fire per token at step 0 (and after a revival), with small codes (0: biases "
                              "at zero, the paper's init, where about half the latents fire at first)",
                              float, minimum=0.0)}
    revive_dead = True
    sparse_decoding = True

    @classmethod
    def check_knobs(cls, d_in, d_sae, knobs):
        super().check_knobs(d_in, d_sae, knobs)
        if knobs.get("p_end") is not None and not 0 < knobs["p_end"] <= 1:
            raise UserError(f"--p-end must be in (0, 1] for gated, got {knobs['p_end']:g}")

    def build(self) -> None:
        W_enc, W_dec = kaiming_pair(self.d_in, self.d_sae)
        self.W_enc = nn.Parameter(W_enc)                        # [d_in, d_sae] gate (and magnitude) directions
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))      # [d_sae] gate bias
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))      # [d_sae] log rescaling of the magnitude path
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))      # [d_sae]
        self.W_dec = nn.Parameter(W_dec)                        # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """b_dec at the geometric median; with start_l0 > 0 each latent's gate opens on about the top
        start_l0/d_sae share of the sample's tokens, and its magnitude starts just above zero there
        (b_enc = b_mag = −quantile: at step 0 the codes are those of a ReLU with that bias)."""
        super().init_from_data(x)
        if self.knobs["start_l0"] > 0:
            self.sparse_start(self.project(x), torch.ones(self.d_sae, dtype=torch.bool, device=x.device))

    @torch.no_grad()
    def sparse_start(self, projected: torch.Tensor, latents: torch.Tensor) -> None:
        """projected [n, m]: (x − b_dec) W_enc of the m chosen latents ([d_sae] bool)."""
        quantile = firing_quantile(projected, self.knobs["start_l0"], self.d_sae)     # [m]
        self.b_enc[latents] = -quantile
        self.b_mag[latents] = -quantile * self.r_mag[latents].exp()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(x − b_dec) W_enc -> [batch, d_sae] (b_dec's gradient without a second dense product: encode_centred)."""
        return encode_centred(x, self.W_enc, self.b_dec)

    def paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projected = self.project(x)                             # [batch, d_sae]
        pi_gate = projected + self.b_enc
        pi_mag = projected * self.r_mag.exp() + self.b_mag
        return pi_gate, pi_mag

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        pi_gate, pi_mag = self.paths(x)
        return (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)

    def decode_scaled(self, codes: torch.Tensor) -> torch.Tensor:
        return addmm(self.b_dec, codes, self.W_dec)

    def training_loss(self, x_input, x_target, ctx: StepContext) -> LossOutput:
        projected = self.project(x_input)                       # [batch, d_sae]
        pi_gate = projected + self.b_enc
        listing = list_entries(pi_gate)      # once gates are sparse (CPU): every term on the open gates' [n] entries
        if listing is None:
            pi_mag = projected * self.r_mag.exp() + self.b_mag
            gate = torch.relu(pi_gate)                           # [batch, d_sae]
            codes = (pi_gate > 0).to(x_input.dtype) * torch.relu(pi_mag)
            x_hat = self.decode_scaled(codes)
            gate_hat = addmm(self.b_dec.detach(), gate, self.W_dec.detach())   # through the frozen decoder
            counts = fired(codes)
        else:
            cols = listing.cols
            open_projected = projected[listing.rows, cols]       # [n]
            gate = open_projected + self.b_enc[cols]             # [n], each > 0
            codes = torch.relu(open_projected * self.r_mag[cols].exp() + self.b_mag[cols])
            x_hat = decode_listed(codes, listing, self.W_dec, self.b_dec)
            gate_hat = decode_listed(gate, listing, self.W_dec.detach(), self.b_dec.detach())
            counts = fired(codes, listing=listing, d_sae=self.d_sae)   # [d_sae]
        recon = squared_error(x_hat, x_target)
        p = 1.0 + (self.knobs.get("p_end", 1.0) - 1.0) * ctx.progress          # p-annealing (1: the paper's L1)
        penalty = gate.sum() if p == 1.0 else (gate + 1e-12).pow(p).mul(gate > 0).sum()
        l1 = self.knobs["l1_coefficient"] * ctx.sparsity_scale * penalty / x_input.shape[0]
        aux = squared_error(gate_hat, x_target)
        return LossOutput(recon + l1 + aux, x_hat, counts,
                          {"recon": recon.detach(), "l1": l1.detach(), "aux": aux.detach(),
                           "fvu": batch_fvu(x_hat.detach(), x_target)})

    @torch.no_grad()
    def revive(self, dead_mask, x, x_hat) -> int:
        revived = super().revive(dead_mask, x, x_hat)
        self.r_mag[dead_mask] = 0.0
        self.b_mag[dead_mask] = 0.0
        if revived and self.knobs["start_l0"] > 0:   # a revived latent starts as sparse as a fresh one
            self.sparse_start(mm(x - self.b_dec, self.W_enc[:, dead_mask]), dead_mask)
        return revived
