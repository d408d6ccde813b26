"""`matryoshka` (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries over BatchTopK sparsity.

The latents are split into consecutive groups (--group-sizes, summing to d_sae; default halves of halves:
d/16, d/16, d/8, d/4, d/2). Each prefix of groups must reconstruct the input on its own: the loss is the mean,
over prefixes, of the batch FVU of b_dec + Σ (selected codes of latents in the prefix) · W_dec, so the first
latents learn the coarse, general directions and later groups refine them. Selection, threshold and AuxK as in
`batchtopk`.
"""
from __future__ import annotations

import torch

from sae.errors import UserError
from sae.kernels import Selection, sparse_decode
from sae.variants.base import Knob, register
from sae.variants.batchtopk import BatchTopKSAE
from sae.variants.topk import TopKSAE


def default_groups(d_sae: int) -> list[int]:
    sizes = [d_sae // 16, d_sae // 16, d_sae // 8, d_sae // 4]
    sizes = [s for s in sizes if s > 0]
    return sizes + [d_sae - sum(sizes)]


def parse_groups(value, d_sae: int) -> list[int]:
    if value in (None, ""):
        return default_groups(d_sae)
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.replace(" ", "").split(",") if part]
        except ValueError:
            raise UserError(f"--group-sizes must be comma-separated integers, got {value!r}") from None
    return [int(v) for v in value]


@register
class MatryoshkaSAE(BatchTopKSAE):
    name = "matryoshka"
    KNOBS = {**TopKSAE.KNOBS,
             "group_sizes": Knob(None, "nested group sizes, comma-separated, summing to d_sae "
                                       "(default d/16,d/16,d/8,d/4,d/2)", str)}

    @classmethod
    def check_knobs(cls, d_in, d_sae, knobs):
        super().check_knobs(d_in, d_sae, {k: v for k, v in knobs.items() if k != "group_sizes"})
        sizes = parse_groups(knobs.get("group_sizes"), d_sae)
        if any(s <= 0 for s in sizes) or sum(sizes) != d_sae:
            raise UserError(f"--group-sizes must be positive and sum to d_sae ({d_sae}), got {sizes}")

    def build(self) -> None:
        super().build()
        self.group_sizes = parse_groups(self.knobs.get("group_sizes"), self.d_sae)
        self.group_ends = torch.tensor(self.group_sizes).cumsum(0).tolist()

    def reconstruction_loss(self, sel: Selection, x_target, total_variance):
        x_hat = self.b_dec.expand_as(x_target)
        start, per_group = 0, []
        for end in self.group_ends:
            in_group = (sel.indices >= start) & (sel.indices < end)                  # [batch, width]
            x_hat = x_hat + sparse_decode(sel.values * in_group, sel.indices, self.W_dec, sel.order,
                                          unit_rows=True)
            per_group.append((x_hat - x_target).pow(2).sum() / total_variance)
            start = end
        terms = {f"fvu_group{i}": fvu.detach() for i, fvu in enumerate(per_group)}
        terms["fvu"] = per_group[-1].detach()                                         # the whole dictionary's
        return torch.stack(per_group).mean(), x_hat, terms
