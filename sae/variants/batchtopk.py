"""`batchtopk` (Bussmann et al. 2024): top-k over the whole batch in training, a learned threshold at inference.

Training keeps the batch's k·batch largest ReLU pre-activations (tokens get more or fewer than k latents; the
mean is exactly k). A threshold θ is learned alongside as a running average of the smallest code kept in each
batch; `encode` at inference applies θ to each token on its own (codes = pre · 1[pre > θ]), never a batch top-k,
so a token's code does not depend on its batch-mates. AuxK as in `topk`.
"""
from __future__ import annotations

import torch

from sae import distributed
from sae.kernels.autograd import Selection, sync_free, topk_select
from sae.variants.base import register
from sae.kernels.matmul import addmm
from sae.variants.topk import TopKSAE

THRESHOLD_MOMENTUM = 0.9


@register
class BatchTopKSAE(TopKSAE):
    name = "batchtopk"

    def build(self) -> None:
        super().build()
        self.register_buffer("threshold", torch.tensor(-1.0))   # θ; negative until the first training batch

    def select(self, x: torch.Tensor, dead_mask: torch.Tensor | None) -> Selection:
        k = self.knobs["k"]
        aux_on = dead_mask is not None and self.knobs["auxk_coefficient"] > 0 and (
            sync_free(x) or bool(dead_mask.any()))           # on a GPU: always, masked (no host read)
        sel = topk_select(x, self.W_enc, self.b_enc, b_dec=self.b_dec, k=min(self.d_sae, 4 * k), batch_k=k * len(x),
                          aux_mask=dead_mask if aux_on else None, k_aux=self.d_in // 2)
        if self.training:
            self.update_threshold(sel.values.detach())
        return sel

    @torch.no_grad()
    def update_threshold(self, values: torch.Tensor) -> None:
        # the smallest code kept (all > 0 in the flat form); +inf for an empty selection. No host sync.
        smallest = torch.where(values > 0, values, float("inf")).min() if values.numel() else \
            values.new_full((), float("inf"))                   # zeroed slots (the GPU's padded form) skipped
        smallest = distributed.reduce_min(smallest)                              # the global batch's
        running = THRESHOLD_MOMENTUM * self.threshold + (1 - THRESHOLD_MOMENTUM) * smallest
        updated = torch.where(self.threshold < 0, smallest, running)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.threshold))

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold < 0:                                  # untrained: fall back to a per-token top-k
            return super().encode_scaled(x)
        pre = addmm(self.b_enc, x - self.b_dec, self.W_enc)     # [batch, d_sae]
        return pre * (pre > self.threshold.clamp_min(0))
