"""`topk` (Gao et al. 2024): keep each token's k largest ReLU pre-activations, zero the rest; AuxK on by default.

codes = TopK_k(ReLU((x − b_dec) W_enc + b_enc)), x̂ = codes W_dec + b_dec; loss = FVU of the batch + α · AuxK.
AuxK: the k_aux = min(d_in / 2, #dead) largest pre-activations among dead latents (ctx.dead_mask) reconstruct the
main model's residual e = x − x̂, *detached*, as ê = Σ aux codes · W_dec — without b_dec, which x̂ already holds
(adding it again is the classic bug); AuxK = min(1, #dead / k_aux) · ‖e − ê‖² / Σ‖x − mean x‖².
Training runs on the sparse kernels (sae.kernels): the encoder product is the only dense work.
"""
from __future__ import annotations

import torch
from torch import nn

from sae.errors import UserError
from sae.kernels.autograd import Selection, count_latents, dense_codes, sparse_decode, sync_free, topk_select
from sae.variants.base import SAE, Knob, LossOutput, StepContext, kaiming_pair, register, squared_distance
from sae.kernels.matmul import addmm
from sae.variants.base import total_variance as global_total_variance


@register
class TopKSAE(SAE):
    name = "topk"
    all_parameters_used = True     # every parameter gets a gradient every step: DDP needs no unused-parameter search
    KNOBS = {
        "k": Knob(32, "latents kept per token", int, positive=True),
        "auxk_coefficient": Knob(1 / 32, "weight α of the AuxK loss that revives dead latents (0: off)", float,
                                 minimum=0.0),
    }
    unit_norm_decoder = True

    @classmethod
    def check_knobs(cls, d_in, d_sae, knobs):
        super().check_knobs(d_in, d_sae, knobs)
        if knobs["k"] >= d_sae:
            raise UserError(f"--k must be smaller than d_sae ({d_sae}) for {cls.name}, got {knobs['k']}")

    def build(self) -> None:
        W_enc, W_dec = kaiming_pair(self.d_in, self.d_sae)
        # [d_in, d_sae], stored latent-major (a transposed view of [d_sae, d_in]): the sparse backward builds
        # its gradient latent-major, so autograd accumulates it without a 10 MB transposing copy per step
        self.W_enc = nn.Parameter(W_enc.t().contiguous().t())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))      # [d_sae]
        self.W_dec = nn.Parameter(W_dec)                        # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))       # [d_in]

    # ---- selection: what differs between topk, batchtopk and matryoshka -------------------------
    def select(self, x: torch.Tensor, dead_mask: torch.Tensor | None) -> Selection:
        aux_on = dead_mask is not None and self.knobs["auxk_coefficient"] > 0 and (
            sync_free(x) or bool(dead_mask.any()))           # on a GPU: always, masked (no host read)
        return topk_select(x, self.W_enc, self.b_enc, b_dec=self.b_dec, k=self.knobs["k"],
                           aux_mask=dead_mask if aux_on else None, k_aux=self.d_in // 2)

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        sel = topk_select(x, self.W_enc, self.b_enc, b_dec=self.b_dec, k=self.knobs["k"])
        return dense_codes(sel.values, sel.indices, self.d_sae)  # [batch, d_sae]

    def decode_scaled(self, codes: torch.Tensor) -> torch.Tensor:
        return addmm(self.b_dec, codes, self.W_dec)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor):
        """decode(encode(x)) and the fire counts without the dense [n, d_sae] codes: a sparse decode of
        the selection (per-token top-k only; subclasses that encode otherwise use the dense default)."""
        if type(self).encode_scaled is not TopKSAE.encode_scaled:
            return super().reconstruct(x)
        x_scaled = x.to(self.input_scale.dtype) * self.input_scale
        sel = topk_select(x_scaled, self.W_enc, self.b_enc, b_dec=self.b_dec, k=self.knobs["k"])
        x_hat = sparse_decode(sel.values, sel.indices, self.W_dec) + self.b_dec        # [n, d_in] scaled
        live = (sel.values > 0).reshape(-1)
        counts = torch.bincount(sel.indices.reshape(-1)[live], minlength=self.d_sae)   # [d_sae]
        return x_hat / self.input_scale, counts

    def remove_parallel_gradient(self) -> None:
        """Nothing to do: every decoder gradient of the TopK family comes from sparse_decode with
        unit_rows=unit_norm_decoder, whose backward already removed the component along each row (a
        new loss term on W_dec must go through sparse_decode too, or call super() here)."""

    # ---- loss ------------------------------------------------------------------------------------
    def reconstruction_loss(self, sel: Selection, x_target: torch.Tensor, total_variance: torch.Tensor):
        """Main term: the batch FVU of the sparse reconstruction. Returns (loss, x_hat, logged stats with "fvu")."""
        x_hat = sparse_decode(sel.values, sel.indices, self.W_dec, sel.order, unit_rows=self.unit_norm_decoder,
                              offsets=sel.offsets) + self.b_dec
        squared_error = squared_distance(x_hat, x_target)                     # x_hat [batch, d_in]
        fvu = squared_error / total_variance
        return fvu, x_hat, {"fvu": fvu.detach(), "squared_error": squared_error.detach()}

    def auxk_loss(self, sel: Selection, x_target: torch.Tensor, x_hat: torch.Tensor,
                  total_variance: torch.Tensor, n_dead: int) -> torch.Tensor:
        residual = (x_target - x_hat).detach()                                      # [batch, d_in]
        residual_hat = sparse_decode(sel.aux_values, sel.aux_indices, self.W_dec, unit_rows=self.unit_norm_decoder)  # no b_dec
        scale = n_dead / max(1, sel.aux_indices.shape[1])     # a device tensor on a GPU (no host read)
        scale = scale.clamp(max=1.0) if torch.is_tensor(scale) else min(1.0, scale)
        return scale * squared_distance(residual_hat, residual) / total_variance

    def losses(self, x_input, x_target, ctx: StepContext):
        """(x_hat, selection, named loss terms with gradients, logged stats)."""
        sel = self.select(x_input, ctx.dead_mask)
        total_variance = global_total_variance(x_target)  # the global batch's under DDP
        recon, x_hat, stats = self.reconstruction_loss(sel, x_target, total_variance)
        terms = {"recon": recon}
        if sel.aux_indices.shape[1] > 0:
            n_dead = ctx.dead_mask.sum() if sync_free(x_input) else int(ctx.dead_mask.sum())
            terms["auxk"] = self.knobs["auxk_coefficient"] * self.auxk_loss(sel, x_target, x_hat,
                                                                              total_variance, n_dead)
        return x_hat, sel, terms, stats

    def training_loss(self, x_input, x_target, ctx: StepContext) -> LossOutput:
        x_hat, sel, terms, stats = self.losses(x_input, x_target, ctx)
        loss = sum(terms.values())
        live = (sel.values > 0).reshape(-1)
        fire_counts = count_latents(sel.indices, live.float(), self.d_sae)   # [d_sae]
        squared_error = stats.pop("squared_error", None)      # the trainer's FVU reuses it
        return LossOutput(loss, x_hat.detach(), fire_counts.long(),
                          {**{name: value.detach() for name, value in terms.items()}, **stats}, squared_error)
