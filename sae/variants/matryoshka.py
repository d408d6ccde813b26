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
from sae.kernels.autograd import Selection, bag_ids, count_latents, sparse_decode
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
        self.register_buffer("group_end_ids", torch.tensor(self.group_ends), persistent=False)  # [groups]

    def reconstruction_loss(self, sel: Selection, x_target, total_variance):
        """Every prefix's reconstruction from one sparse decode: the selected entries are split into bags per
        (token, group) — a flat selection lists a token's entries in latent order, so its groups are
        consecutive — decoded at once, and summed cumulatively over the groups."""
        batch, n_groups = x_target.shape[0], len(self.group_ends)
        values, indices, order, offsets = sel.values, sel.indices, sel.order, sel.offsets
        if offsets is None:                                   # a per-token selection: flatten in latent order
            indices, slots = indices.sort(dim=1)
            values, order = values.gather(1, slots).reshape(-1), None
            offsets = torch.arange(0, indices.numel() + 1, indices.shape[1], device=indices.device)
            indices = indices.reshape(-1)
        total = None if sel.offsets is not None else indices.numel()     # known without a host read
        bags = bag_ids(offsets, total) * n_groups + torch.searchsorted(self.group_end_ids, indices, right=True)  # [n], ascending
        bag_offsets = torch.zeros(batch * n_groups + 1, dtype=torch.int64, device=indices.device)
        bag_offsets[1:] = count_latents(bags, torch.ones_like(bags), batch * n_groups).cumsum(0)
        parts = sparse_decode(values, indices, self.W_dec, order, unit_rows=self.unit_norm_decoder,
                              offsets=bag_offsets)
        squared, residual = _PrefixResiduals.apply(parts.view(batch, n_groups, -1), x_target - self.b_dec)
        per_group = squared / total_variance                      # [groups] each prefix's batch FVU
        terms = {f"fvu_group{i}": fvu.detach() for i, fvu in enumerate(per_group.unbind())}
        terms["fvu"] = per_group[-1].detach()                                         # the whole dictionary's
        terms["squared_error"] = squared[-1].detach()                                 # Σ‖x − x̂‖²
        return per_group.mean(), x_target - residual, terms


class _PrefixResiduals(torch.autograd.Function):
    """squared [groups] with squared[g] = ‖target − Σ_{h ≤ g} parts[:, h]‖², and the last residual [batch, d]
    (no gradient), from parts [batch, groups, d] and target [batch, d]: one running residual, two passes a
    group forward and three backward, instead of autograd's graph of a subtraction, a square and a sum per
    group. Backward: ∂/∂parts[:, h] = −Σ_{g ≥ h} 2 w_g r_g and ∂/∂target = Σ_g 2 w_g r_g (w = the grad of
    squared), with the r_g rebuilt from the last residual going back (r_{g−1} = r_g + parts[:, g])."""

    @staticmethod
    def forward(ctx, parts, target):
        residual = target.clone()                                                     # [batch, d]
        squared = []
        for g in range(parts.shape[1]):
            residual.sub_(parts[:, g])
            squared.append(torch.dot(residual.reshape(-1), residual.reshape(-1)))
        ctx.save_for_backward(parts, residual)
        ctx.mark_non_differentiable(residual)
        return torch.stack(squared), residual

    @staticmethod
    def backward(ctx, grad_squared, _grad_residual):
        parts, last = ctx.saved_tensors
        residual = last.clone()                                                       # r_{G-1}
        running = torch.zeros_like(last)                                              # Σ_{g ≥ h} 2 w_g r_g
        grad_parts = torch.empty_like(parts)
        for g in range(parts.shape[1] - 1, -1, -1):
            running.addcmul_(residual, 2 * grad_squared[g])                             # (no host sync)
            torch.neg(running, out=grad_parts[:, g])
            if g:
                residual.add_(parts[:, g])                                            # r_{g-1}
        return grad_parts, running
