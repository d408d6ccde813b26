"""`vq`: vector quantisation — each token is replaced by its nearest codebook vector (VQ-VAE's bottleneck,
van den Oord et al. 2017, with the identity as encoder).

z = x − b_dec; i = argmin_c ‖z − e_c‖; x̂ = e_i + b_dec; codes are one-hot over the codebook (d_sae =
--codebook-size), so L0 = 1. The codebook is W_dec [d_sae, d_in] (its rows are the "decoder directions").
loss = ‖x − x̂‖² (this is the codebook loss ‖sg(z) − e‖², moving codes towards their tokens, plus b_dec's
fit) + γ · ‖z − sg(e_i)‖² (the commitment loss; with an identity encoder it acts on b_dec alone).
The codebook starts at random data points; codes unused for a long time are restarted by the trainer through
revive(), at tokens that are poorly reconstructed. extra_metrics: codebook perplexity and usage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sae.kernels.matmul import addmm, mm
from sae.variants.base import SAE, Knob, LossOutput, StepContext, batch_fvu, register, squared_error


@register
class VectorQuantizer(SAE):
    name = "vq"
    KNOBS = {"commitment": Knob(0.25, "weight γ of the commitment loss ‖z − sg(e)‖²", float, minimum=0.0)}
    unit_norm_decoder = False
    revive_dead = True

    def build(self) -> None:
        self.W_dec = nn.Parameter(torch.randn(self.d_sae, self.d_in) * 0.1)   # [d_sae, d_in] the codebook
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        super().init_from_data(x)
        picks = torch.randint(len(x), (self.d_sae,), generator=torch.Generator().manual_seed(0))
        self.W_dec.copy_(x[picks.to(x.device)] - self.b_dec)
        self.W_dec.add_(torch.randn_like(self.W_dec) * 1e-3)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, d_in] scaled inputs -> [batch] index of the nearest code."""
        z = (x - self.b_dec).detach()
        dist = self.W_dec.detach().pow(2).sum(dim=1) - 2 * mm(z, self.W_dec.detach().T)   # [batch, d_sae] (+‖z‖²)
        return dist.argmin(dim=1)

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.nearest(x), self.d_sae).to(x.dtype)            # [batch, d_sae]

    def decode_scaled(self, codes: torch.Tensor) -> torch.Tensor:
        return addmm(self.b_dec, codes, self.W_dec)

    def training_loss(self, x_input, x_target, ctx: StepContext) -> LossOutput:
        index = self.nearest(x_input)                                         # [batch]
        chosen = self.W_dec[index]                                            # [batch, d_in]
        x_hat = chosen + self.b_dec
        recon = squared_error(x_hat, x_target)
        commit = squared_error(x_input - self.b_dec, chosen.detach())
        loss = recon + self.knobs["commitment"] * commit
        counts = torch.bincount(index, minlength=self.d_sae)                  # [d_sae]
        return LossOutput(loss, x_hat, counts,
                          {"recon": recon.detach(), "commitment": commit.detach(),
                           "fvu": batch_fvu(x_hat.detach(), x_target), **usage(counts)})

    @torch.no_grad()
    def revive(self, dead_mask: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor) -> int:
        """Restart unused codes at tokens drawn in proportion to their squared reconstruction error."""
        dead = dead_mask.nonzero().squeeze(1)
        if len(dead) == 0:
            return 0
        errors = (x - x_hat).pow(2).sum(dim=1)                                # [n]
        probs = errors / errors.sum() if errors.sum() > 0 else torch.full_like(errors, 1 / len(errors))
        picks = torch.multinomial(probs, len(dead), replacement=len(dead) > len(errors))
        self.W_dec[dead] = x[picks] - self.b_dec
        return len(dead)

    @torch.no_grad()
    def extra_metrics(self, x: torch.Tensor) -> dict:
        counts = torch.bincount(self.nearest(x), minlength=self.d_sae)
        return {k: float(v) for k, v in usage(counts).items()}


def usage(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Codebook perplexity exp(H(p)) of the code frequencies p, and the share of codes used at least once."""
    p = counts.float() / counts.sum().clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return {"perplexity": entropy.exp(), "usage": (counts > 0).float().mean()}
