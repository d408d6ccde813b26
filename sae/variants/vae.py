"""`vae`: a linear-Gaussian variational autoencoder (Kingma & Welling 2014).

Posterior q(z|x) = N(μ, diag σ²) with μ = (x − b_dec) W_enc + b_enc and log σ² = (x − b_dec) W_logvar + b_logvar;
z = μ + σ ⊙ ε (reparameterisation); x̂ = z W_dec + b_dec; prior N(0, I).
loss = NLL(x | x̂) + β · Σ_j max(KL_j, free_bits), KL_j = ½ E_batch[μ_j² + σ_j² − 1 − log σ_j²] (closed form).
The likelihood is Gaussian with one shared variance v set to its optimum, the batch's mean squared error
(a calibrated decoder, Rybkin et al. 2021's σ-VAE): NLL = ½ (‖x − x̂‖² / v + d_in log v) per token. A latent
dimension is then worth keeping whenever it explains more than its KL costs; with a fixed unit variance,
activations of small spread would collapse to the prior. Free bits (Kingma et al. 2016) keep a floor under each dimension's
KL against posterior collapse, and KL annealing (Bowman et al. 2016) beside it: with --kl-warmup w the KL weight
rises linearly from 0 to β over the first share w of training (0: off), so the decoder learns to use the latents
before their cost is felt. `encode` returns μ (signed, dense codes).
Collapse is measured by active units (Burda et al. 2016): latent dimensions u with Cov_x(E_q[u | x]) > 0.01,
i.e. whose posterior mean varies with the input (extra metric `active_units`, in eval.json).
Width: default d_sae = d_in (expansion above 1 is capped: surplus dimensions of a VAE only collapse).
"""
from __future__ import annotations

import torch
from torch import nn

from sae.errors import UserError
from sae.kernels.matmul import addmm
from sae.variants.base import SAE, Knob, LossOutput, StepContext, batch_fvu, kaiming_pair, register, squared_error

ACTIVE_KL = 0.01   # nats: a latent dimension with a batch-mean KL above this is "active"
ACTIVE_COVARIANCE = 0.01   # an active unit: its posterior mean's variance over inputs exceeds this (Burda et al.)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) elementwise, in closed form: ½ (μ² + σ² − 1 − log σ²)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


@register
class VariationalAutoencoder(SAE):
    name = "vae"
    KNOBS = {
        "beta": Knob(1.0, "weight β of the KL term (β-VAE)", float, minimum=0.0),
        "free_bits": Knob(0.05, "per-dimension KL floor in nats (free bits) against posterior collapse", float,
                          minimum=0.0),
        "kl_warmup": Knob(0.0, "share of training over which the KL weight rises linearly from 0 to β (KL "
                          "annealing against posterior collapse), in [0, 1]; 0: off", float),
    }
    signed_codes = True

    @classmethod
    def check_knobs(cls, d_in, d_sae, knobs):
        super().check_knobs(d_in, d_sae, knobs)
        if knobs.get("kl_warmup") is not None and not 0 <= knobs["kl_warmup"] <= 1:
            raise UserError(f"--kl-warmup must be in [0, 1] for vae, got {knobs['kl_warmup']:g}")
    unit_norm_decoder = False

    @classmethod
    def default_d_sae(cls, d_in: int, expansion: float) -> int:
        return max(1, int(round(d_in * min(expansion, 1.0))))

    def build(self) -> None:
        W_enc, W_dec = kaiming_pair(self.d_in, self.d_sae)
        self.W_enc = nn.Parameter(W_enc)                                   # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_logvar = nn.Parameter(torch.zeros(self.d_in, self.d_sae))   # [d_in, d_sae]
        self.b_logvar = nn.Parameter(torch.full((self.d_sae,), -4.0))      # start with a narrow posterior
        self.W_dec = nn.Parameter(W_dec)                                   # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centred = x - self.b_dec
        mu = addmm(self.b_enc, centred, self.W_enc)                        # [batch, d_sae]
        logvar = addmm(self.b_logvar, centred, self.W_logvar).clamp(-12.0, 8.0)  # [batch, d_sae]
        return mu, logvar

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = μ + σ ε, ε ~ N(0, I): differentiable in μ and log σ²."""
        return mu + torch.randn_like(mu) * (0.5 * logvar).exp()

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def decode_scaled(self, codes: torch.Tensor) -> torch.Tensor:
        return addmm(self.b_dec, codes, self.W_dec)

    def training_loss(self, x_input, x_target, ctx: StepContext) -> LossOutput:
        mu, logvar = self.posterior(x_input)
        x_sample = self.decode_scaled(self.sample(mu, logvar))             # [batch, d_in]
        err = squared_error(x_sample, x_target)
        noise = (err / self.d_in).detach().clamp_min(1e-6)                 # v: the optimal shared variance
        nll = 0.5 * (err / noise + self.d_in * noise.log())
        kl_dims = gaussian_kl(mu, logvar).mean(dim=0)                      # [d_sae]
        kl = kl_dims.clamp_min(self.knobs["free_bits"]).sum()
        warmup = self.knobs.get("kl_warmup") or 0.0
        anneal = min(1.0, ctx.progress / warmup) if warmup > 0 else 1.0
        loss = nll + self.knobs["beta"] * anneal * kl
        with torch.no_grad():
            x_hat = self.decode_scaled(mu)                                 # the deterministic reconstruction
        return LossOutput(loss, x_hat, None,
                          {"recon": err.detach(), "kl": kl_dims.sum().detach(),
                           "active_dims": (kl_dims.detach() > ACTIVE_KL).sum(),
                           "kl_weight": torch.tensor(self.knobs["beta"] * anneal),
                           "fvu": batch_fvu(x_hat, x_target)})

    @torch.no_grad()
    def extra_metrics(self, x: torch.Tensor) -> dict:
        mu, logvar = self.posterior(x)
        kl_dims = gaussian_kl(mu, logvar).mean(dim=0)
        return {"active_dims": int((kl_dims > ACTIVE_KL).sum()), "kl": float(kl_dims.sum()),
                "active_units": active_units(mu)}


def active_units(mu: torch.Tensor) -> int:
    """[n, d_sae] posterior means over n inputs -> how many dimensions vary with the input (variance > 0.01)."""
    return int((mu.double().var(dim=0) > ACTIVE_COVARIANCE).sum()) if len(mu) > 1 else 0
