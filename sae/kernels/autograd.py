"""The TopK family's fast path: sparse encoder selection and sparse decoding with hand-written backwards.

Training a TopK-style SAE needs one dense product, the encoder's (2·d_in·d_sae FLOP a token). Everything
else touches only the k selected latents of each token:

- `topk_select(x, W_enc, b_enc, k, b_dec=...)` — forward: pre = (x − b_dec) @ W_enc + b_enc (one product,
  sae.matmul), then the exact top-k per token from a strided-block prefilter (`topk_rows`, a few times faster
  than torch.topk over the whole row), ReLU; or, with batch_k, the batch's batch_k largest entries
  (BatchTopK / Matryoshka) in a flat form with per-token offsets, no padding; optionally an auxiliary top-k
  among dead latents' columns only (AuxK).
  Backward: the weight gradient as an `embedding_bag` over the latent-sorted selections (a bag per latent,
  reading only the selected rows of x); no dense [batch, d_sae] gradient is ever formed.
- `list_entries(support)` and `decode_listed(values, listing, W_dec)` — the same sparse decoder for the
  penalty variants (jumprelu, gated, l1) once their codes are sparse: their firing entries listed token by
  token, every term of the loss on those [n] entries; on the CPU only, where listing costs no host sync.
- `sparse_decode(values, indices, W_dec)` — forward: `embedding_bag` gather-and-sum of the selected
  decoder rows. Backward: the value gradient by a sampled dense-dense product at the selected entries,
  the decoder gradient by the same latent-major `embedding_bag`; with unit_rows, the gradient component
  along each unit decoder row is removed from the dot products already at hand.

Shapes: x [batch, d_in], W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
values/indices [batch, k] (values ≥ 0; a slot with value 0 contributes nothing and gets no gradient),
or flat [n] with offsets [batch + 1] (see Selection).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae.kernels.matmul import raw_addmm
from sae import distributed
from sae.kernels import native

# Host reads (bool(), int(), nonzero, data-dependent shapes) are free on the CPU, where the fast path uses them
# to skip work; on a GPU each one is a sync that stalls the step. sync_free() picks the fixed-shape form
# (AuxK over a masked row, BatchTopK with at most `k` (4·k) slots a token, counts by index_add) on every device
# but the CPU; tests set SYNC_FREE_ON_CPU to run the GPU's form on the CPU with host reads counted.
SYNC_FREE_ON_CPU = False


def sync_free(tensor: torch.Tensor) -> bool:
    """True where a training step must not read the device from the host (any device but the CPU)."""
    return tensor.device.type != "cpu" or SYNC_FREE_ON_CPU


def count_latents(indices: torch.Tensor, weights: torch.Tensor, d_sae: int) -> torch.Tensor:
    """[d_sae] Σ weights per latent id (bincount without its host read of the largest id)."""
    return torch.zeros(d_sae, dtype=weights.dtype, device=indices.device).index_add_(
        0, indices.reshape(-1), weights.reshape(-1))


class Selection(NamedTuple):
    """Per-token top-k: values/indices [batch, k]. Batch top-k (a width that varies by token): values/indices
    flat [n], token by token, and offsets [batch + 1] where token b's entries start (CSR row pointers)."""
    values: torch.Tensor       # [batch, k] or [n] codes of the selected latents (≥ 0)
    indices: torch.Tensor      # [batch, k] or [n] int64 latent ids
    aux_values: torch.Tensor   # [batch, k_aux] AuxK codes among dead latents ([batch, 0] when off)
    aux_indices: torch.Tensor  # [batch, k_aux]
    order: torch.Tensor        # [n] latent-major permutation of indices.reshape(-1), shared by the backwards
    offsets: torch.Tensor | None = None   # [batch + 1] for the flat form, else None


def bag_ids(offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """[n] the bag (token) of each flat entry, from CSR row pointers [n_bags + 1] (total: n, when the caller
    knows it without reading the device)."""
    n_bags = offsets.numel() - 1
    return torch.repeat_interleave(torch.arange(n_bags, device=offsets.device), offsets.diff(),
                                   output_size=int(offsets[-1]) if total is None else total)


def latent_order(indices: torch.Tensor) -> torch.Tensor:
    """[batch*k] permutation that sorts indices.reshape(-1) by latent (stable)."""
    # int32 keys sort several times faster than int64 or float ones on CPU (radix sort)
    return torch.sort(indices.reshape(-1).to(torch.int32), stable=True).indices


def latent_major_product(weights: torch.Tensor, indices: torch.Tensor, dense: torch.Tensor, d_sae: int,
                         order: torch.Tensor | None = None, bags: torch.Tensor | None = None) -> torch.Tensor:
    """Sᵀ · dense -> [d_sae, n_cols], where S [batch, d_sae] is sparse with weights[b, j] at (b, indices[b, j]).

    Row l sums weights[b, j] · dense[b] over the selections of latent l: one `embedding_bag` over the
    latent-sorted selections, a bag per latent (an empty bag is a zero row), reading only the k selected
    rows of dense per token (in compiled code where sae.native is here, else torch's embedding_bag).
    order: latent_order(indices), when the caller already has it. Flat selections (weights/indices [n])
    pass bags [n]: the row of dense each entry belongs to."""
    order = latent_order(indices) if order is None else order
    flat_ids = indices.reshape(-1)
    found = native.latent_major(dense, flat_ids, order.long(), weights.reshape(-1).to(dense.dtype), d_sae, bags,
                                per_row=1 if bags is not None else indices.shape[1]) if flat_ids.numel() else None
    if found is not None:
        return found
    if bags is None:
        tokens = torch.div(order, indices.shape[1], rounding_mode="floor")   # [batch*k] token of each sorted entry
    else:
        tokens = bags[order]
    counts = count_latents(indices, torch.ones_like(indices.reshape(-1)), d_sae)   # [d_sae]
    offsets = counts.cumsum(0) - counts                                  # [d_sae] first selection of each latent
    return F.embedding_bag(tokens, dense, offsets, mode="sum",
                           per_sample_weights=weights.reshape(-1)[order].to(dense.dtype))


def token_major(values: torch.Tensor, indices: torch.Tensor, d_sae: int,
                offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The sparse [batch, d_sae] matrix holding values at (b, indices[b, j]), as CSR (fp32).
    Flat selections pass offsets [batch + 1]."""
    if offsets is None:
        batch, k = indices.shape
        offsets = torch.arange(0, batch * k + 1, k, device=indices.device)
    return _csr(offsets, indices.reshape(-1), values.reshape(-1).float(), (offsets.numel() - 1, d_sae))


@functools.lru_cache(maxsize=64)
def _block_count(width: int, k: int) -> int | None:
    """How many strided blocks topk_rows splits a row of `width` into: a divisor of width near √(k·width),
    above k, leaving candidates (k blocks) of at most a quarter of the row; None when no divisor fits."""
    if k < 1:
        return None
    target = math.sqrt(k * width)
    fits = [n for n in range(k + 1, width // 2 + 1) if width % n == 0 and k * (width // n) * 4 <= width]
    return min(fits, key=lambda n: abs(math.log(n / target))) if fits else None


@functools.lru_cache(maxsize=64)
def _native_block_count(width: int, k: int) -> int | None:
    """The strided blocks of the compiled top-k (sae.native): a divisor of width above k, at most half the
    row and 512, near 2k (its costs: a vector rank count over the block maxima, growing as blocks², and a
    candidate set that shrinks as blocks grow); multiples of 16 (a vector) preferred. None: no divisor fits."""
    fits = [n for n in range(k + 1, min(width // 2, 512) + 1) if width % n == 0]
    if not fits:
        return None
    aligned = [n for n in fits if n % 16 == 0] or fits
    return min(aligned, key=lambda n: abs(math.log(n / (2 * k))))


def topk_rows(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [n, k] of the k largest entries of each row of pre [n, width] (unsorted): the same
    values as torch.topk, found from a candidate set about a tenth of the row.

    The row is cut into `blocks` strided blocks (block j: columns j, j + blocks, …). Let t be the k-th
    largest block maximum. The k blocks with the largest maxima hold k entries ≥ t, so the row's k-th
    largest value v is ≥ t, and every entry ≥ v lies in a block whose maximum is ≥ v ≥ t: in one of those
    k blocks (ties at t aside, where any k such blocks already hold k entries ≥ v). The top k of the
    k·width/blocks candidates are therefore the row's top k. torch.topk's cost grows with the row width,
    so two small top-ks plus a strided max beat one wide one several times over."""
    n, width = pre.shape
    native_blocks = _native_block_count(width, k)
    if native_blocks is not None:
        found = native.topk_rows(pre, k, native_blocks)   # the same selection in compiled code (sae.native)
        if found is not None:
            return found
    blocks = _block_count(width, k)
    if blocks is None or not pre.is_contiguous():
        return pre.topk(k, dim=1, sorted=False)
    block = width // blocks
    maxima = pre.view(n, block, blocks).amax(dim=1)                       # [n, blocks]
    best_blocks = maxima.topk(k, dim=1, sorted=False).indices             # [n, k]
    offsets = torch.arange(0, width, blocks, device=pre.device)           # [block]
    columns = (best_blocks[:, None, :] + offsets[None, :, None]).reshape(n, block * k)  # [n, block*k]
    values, slots = pre.gather(1, columns).topk(k, dim=1, sorted=False)   # [n, k]
    return values, columns.gather(1, slots)


def selected_dots(dense: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """dense[b] · rows[indices[b, j]] for every selection -> shaped like indices: dense [batch, d],
    rows [d_sae, d], indices [batch, k] (or flat [n] with offsets [batch + 1]), as a sampled sparse-dense
    product (the sparse decode's torch backward; the compiled one computes these in sae_decoder_backward)."""
    pattern = token_major(torch.ones(indices.shape, device=dense.device), indices, rows.shape[0], offsets)
    return torch.sparse.sampled_addmm(pattern, dense, rows.t(), beta=0.0).values().view_as(indices)


def _csr(crow, cols, values, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # "CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, values, size, check_invariants=False)


def _entries_above(pre: torch.Tensor, bound: torch.Tensor, per_token: int):
    """(rows, cols, values) [n] of the entries of pre [batch, width] above bound, in no particular order.

    Strided block maxima (as in topk_rows) find the blocks that hold an entry above the bound; only those
    are scanned. With about per_token entries a row above the bound that reads a few percent of pre
    instead of a nonzero() pass over all of it (5.5 ms of a 50 ms BatchTopK step at 1,024 × 4,608)."""
    batch, width = pre.shape
    blocks = _block_count(width, per_token)
    hit_rows = hit_blocks = None
    if blocks is not None and pre.is_contiguous():
        maxima = pre.view(batch, width // blocks, blocks).amax(dim=1)   # [batch, blocks]: block j = cols j + blocks·i
        hit_rows, hit_blocks = (maxima > bound).nonzero(as_tuple=True)  # [h]
    if hit_rows is None or hit_rows.numel() * 4 > batch * blocks:
        # a low bound (most blocks hit): one plain pass, without block index tensors larger than pre
        rows, cols = (pre > bound).nonzero(as_tuple=True)
        return rows, cols, pre[rows, cols]
    cols = hit_blocks[:, None] + torch.arange(0, width, blocks, device=pre.device)[None, :]   # [h, block]
    values = pre[hit_rows[:, None], cols]                                # [h, block]
    slot_rows, slot_cols = (values > bound).nonzero(as_tuple=True)
    return hit_rows[slot_rows], cols[slot_rows, slot_cols], values[slot_rows, slot_cols]


def _batch_topk(pre: torch.Tensor, batch_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch_k largest positive entries of pre [batch, d_sae] over the whole batch, exactly, in the flat
    form: (values [n], latent ids [n], token of each entry [n], offsets [batch + 1]), token by token.

    A strided sample of pre gives a lower bound for the threshold (aiming at about twice batch_k candidates);
    the exact threshold is then the batch_k-th largest candidate. Should the bound overshoot (fewer than
    batch_k candidates), every positive entry is a candidate. No per-token top-k over d_sae is needed, and
    no padding: a token's entries take only as many slots as it has."""
    flat = pre.reshape(-1)
    stride = max(1, flat.numel() // 65536) | 1
    sample = flat[::stride]                                              # [~65536]
    n_top = min(sample.numel(), max(1, int(2 * batch_k * sample.numel() / flat.numel()) + 1))
    bound = torch.kthvalue(sample, sample.numel() - n_top + 1).values.clamp_min(0)   # the n_top-th largest
    # Under torch.distributed the batch is the global one: every rank takes candidates above the lowest
    # rank's bound (so each holds all of its entries above the global k-th value) and the k-th value is
    # found among all ranks' candidates. In one process both reductions return their input.
    bound = distributed.reduce_min(bound)
    global_k = batch_k * distributed.world_size()
    per_token = max(1, batch_k // max(1, pre.shape[0]))

    def above(limit: torch.Tensor):   # [n_candidates] each; the compiled pass lists them token by token
        found = native.entries_above(pre, float(limit)) if pre.device.type == "cpu" else None
        return (*_entries_above(pre, limit, per_token), False) if found is None else (*found, True)

    rows, cols, values, in_order = above(bound)
    if rows.numel() < batch_k:
        rows, cols, values, in_order = above(pre.new_zeros(()))
    every_value = distributed.all_gather_cat(values)                      # [n_candidates over all ranks]
    if every_value.numel() > global_k:
        # the global_k-th largest candidate, by selection (no sort of the candidates)
        kth = torch.kthvalue(every_value, every_value.numel() - global_k + 1).values
        keep = (values >= kth).nonzero().squeeze(1)                      # [n_kept] positions, in order
        rows, cols, values = rows[keep], cols[keep], values[keep]
    if not in_order:
        key = rows * pre.shape[1] + cols                                 # token by token, latents ascending
        order = torch.sort(key.to(torch.int32) if pre.numel() < 2**31 else key).indices
        rows, cols, values = rows[order], cols[order], values[order]
    offsets = torch.zeros(pre.shape[0] + 1, dtype=torch.int64, device=pre.device)
    offsets[1:] = torch.bincount(rows, minlength=pre.shape[0]).cumsum(0)
    return values, cols, rows, offsets


def _batch_topk_padded(pre: torch.Tensor, batch_k: int, per_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK in fixed shapes (no host read): each token's per_token largest entries [batch, per_token],
    then every entry below the batch's batch_k-th largest (over all ranks) zeroed. Equals the exact flat form
    unless a token holds more than per_token of the batch's top batch_k entries."""
    values, indices = topk_rows(pre, per_token)                         # [batch, per_token]
    every_value = distributed.all_gather_cat(values.reshape(-1))        # [ranks · batch · per_token]
    global_k = batch_k * distributed.world_size()
    if every_value.numel() > global_k:
        kth = torch.kthvalue(every_value, every_value.numel() - global_k + 1).values
        values = torch.where(values >= kth, values, values.new_zeros(()))
    return values.clamp_min(0), indices


class _TopKSelect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k, batch_k, aux_mask, k_aux):
        centred = x - b_dec.to(x.dtype)                                 # [batch, d_in]: cheaper than folding b_dec
        pre = raw_addmm(b_enc.to(x.dtype), centred, W_enc.to(x.dtype))  # into the bias (a pass over W_enc)
        padded = batch_k is not None and sync_free(pre)
        if padded:   # the GPU's BatchTopK: fixed shapes, at most k slots a token, the rest zeroed
            values, indices = _batch_topk_padded(pre, batch_k, k)       # [batch, k]
            bags, offsets = indices.new_empty(0), indices.new_empty(0)
        elif batch_k is not None:
            values, indices, bags, offsets = _batch_topk(pre, batch_k)  # [n] each, offsets [batch + 1]
        else:
            values, indices = topk_rows(pre, k)                         # [batch, k]
            values = values.clamp_min(0)
            bags, offsets = indices.new_empty(0), indices.new_empty(0)
        if aux_mask is not None and k_aux > 0 and sync_free(pre):   # k_aux fixed; live latents masked out
            aux_values, aux_indices = pre.masked_fill(~aux_mask, float("-inf")).topk(k_aux, dim=1, sorted=False)
            aux_values = aux_values.clamp_min(0)                        # [batch, k_aux]: 0 = no dead latent there
        elif aux_mask is not None and k_aux > 0:
            candidates = aux_mask.reshape(-1).nonzero().squeeze(1)     # [n_dead] latent ids
            aux_values, slots = pre.index_select(1, candidates).topk(k_aux, dim=1, sorted=False)
            aux_values = aux_values.clamp_min(0)                        # [batch, k_aux]
            aux_indices = candidates[slots]
        else:
            aux_values = pre.new_zeros(pre.shape[0], 0)
            aux_indices = torch.zeros(pre.shape[0], 0, dtype=torch.int64, device=pre.device)
        order = latent_order(indices) if any(ctx.needs_input_grad) else indices.new_empty(0)  # for the backwards
        ctx.save_for_backward(centred, W_enc, b_dec, values > 0, indices, aux_values > 0, aux_indices, order, bags)
        ctx.flat = batch_k is not None and not padded
        ctx.mark_non_differentiable(indices, aux_indices, order, offsets)
        return values, indices, aux_values, aux_indices, order, offsets

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux, _grad_aux_indices, _grad_order, _grad_offsets):
        centred, W_enc, b_dec, live, indices, aux_live, aux_indices, order, bags = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        flat = ctx.flat
        grad_sel = (grad_values if grad_values is not None else torch.zeros_like(live, dtype=centred.dtype)) * live
        sel = indices
        if aux_indices.shape[1] > 0 and grad_aux is not None:
            aux_grad = grad_aux * aux_live                                                  # [batch, k_aux]
            if flat:   # both flat: the aux entries become bags of k_aux per token
                aux_bags = torch.arange(centred.shape[0], device=centred.device).repeat_interleave(aux_indices.shape[1])
                grad_sel, sel = torch.cat([grad_sel, aux_grad.reshape(-1)]), torch.cat([sel, aux_indices.reshape(-1)])
                bags = torch.cat([bags, aux_bags])
            else:
                grad_sel, sel = torch.cat([grad_sel, aux_grad], dim=1), torch.cat([sel, aux_indices], dim=1)
            order = None                                                                    # a new sort
        grad_sel = grad_sel.float()                                          # [batch, k (+ k_aux)] or [n (+ …)]
        order = order if order is not None and order.numel() == sel.numel() else None
        bags = bags if flat else None
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        grad_b = torch.zeros(d_sae, device=centred.device).index_add_(0, sel.reshape(-1), grad_sel.reshape(-1))
        if ctx.needs_input_grad[0]:    # rarely wanted: the input is data
            W_rows = W_enc.t().float().contiguous()                                         # [d_sae, d_in]
            if flat:
                grad_x = torch.zeros(centred.shape[0], centred.shape[1], device=centred.device).index_add_(
                    0, bags, W_rows[sel] * grad_sel[:, None]).to(centred.dtype)
            else:
                grad_x = F.embedding_bag(sel, W_rows, mode="sum", per_sample_weights=grad_sel).to(centred.dtype)
        if ctx.needs_input_grad[1]:    # ∂/∂W of x W − b_dec W: (x − b_dec) ⊗ grad, only at selected entries
            grad_W = latent_major_product(grad_sel, sel, centred.float(), d_sae, order, bags).t().to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b_enc = grad_b.to(W_enc.dtype)
        if ctx.needs_input_grad[3]:   # −W_enc grad_b [d_in]; a latent-major W_enc is summed row by row
            grad_b_dec = native.weighted_row_sum(W_enc.t(), grad_b, -1.0)
            if grad_b_dec is None:
                grad_b_dec = -(W_enc.float() @ grad_b)
            grad_b_dec = grad_b_dec.to(b_dec.dtype)
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None, None


def topk_select(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                b_dec: torch.Tensor | None = None, batch_k: int | None = None,
                aux_mask: torch.Tensor | None = None, k_aux: int = 0) -> Selection:
    """Encoder ReLU((x − b_dec) W_enc + b_enc) + top-k with a sparse backward (b_dec: optional [d_in]
    centring, with its gradient through the encoder; the input itself never gets one). batch_k: keep only the batch_k largest of the
    batch's positive pre-activations (BatchTopK; k is then unused, the width varies and the selection comes in
    the flat form, with offsets). aux_mask [d_sae] bool with k_aux > 0: also select the k_aux largest
    pre-activations among the masked (dead) latents."""
    if aux_mask is not None:
        k_aux = min(int(k_aux), W_enc.shape[1] if sync_free(x) else int(aux_mask.sum()))
        aux_mask = aux_mask.to(x.device)[None, :]
    if b_dec is None:
        b_dec = torch.zeros(W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device)
    *fields, offsets = _TopKSelect.apply(x, W_enc, b_enc, b_dec, int(k), batch_k, aux_mask, int(k_aux))
    return Selection(*fields, offsets if batch_k is not None and offsets.numel() else None)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, order, offsets, unit_rows):
        ctx.save_for_backward(values, indices, W_dec, order, offsets)
        ctx.unit_rows = unit_rows
        found = native.bag_sum(W_dec, indices.reshape(-1), values.reshape(-1).to(W_dec.dtype),
                               offsets if offsets.numel() else None, per_bag=indices.shape[-1])
        if found is not None:
            return found
        if offsets.numel() == 0:
            return F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values.to(W_dec.dtype))
        return F.embedding_bag(indices, W_dec, offsets, mode="sum", per_sample_weights=values.to(W_dec.dtype),
                               include_last_offset=True)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec, order, offsets = ctx.saved_tensors
        order = order if order.numel() == indices.numel() else None
        flat = offsets.numel() > 0
        d_sae = W_dec.shape[0]
        grad_values = grad_W = None
        if ctx.needs_input_grad[2] and indices.numel():        # both gradients in one compiled pass, where here
            fused = native.decoder_backward(
                grad_out.float().contiguous(), W_dec.float().contiguous(), indices.reshape(-1),
                (order if order is not None else latent_order(indices)).long(), values.reshape(-1).float(),
                bag_ids(offsets, indices.numel()) if flat else None, per_row=1 if flat else indices.shape[1], unit_rows=ctx.unit_rows)
            if fused is not None:
                sampled, grad_W = fused
                grad_values = sampled.view_as(values).to(values.dtype) if ctx.needs_input_grad[0] else None
                return grad_values, None, grad_W.to(W_dec.dtype), None, None, None
        sampled = None
        if ctx.needs_input_grad[0] or (ctx.needs_input_grad[2] and ctx.unit_rows):
            sampled = selected_dots(grad_out.float(), W_dec.float(), indices, offsets if flat else None)
        if ctx.needs_input_grad[0]:
            grad_values = sampled.to(values.dtype)
        if ctx.needs_input_grad[2]:
            bags = bag_ids(offsets, indices.numel()) if flat else None
            grad_W = latent_major_product(values, indices, grad_out.float(), d_sae, order, bags)  # [d_sae, d_in]
            if ctx.unit_rows:
                # grad_W[l] · W_dec[l] = Σ over l's selections of values · sampled: the parallel part for free
                parallel = torch.zeros(d_sae, device=grad_W.device).index_add_(
                    0, indices.reshape(-1), (values.float() * sampled).reshape(-1))   # [d_sae]
                grad_W.addcmul_(parallel[:, None], W_dec.float(), value=-1.0)
            grad_W = grad_W.to(W_dec.dtype)
        return grad_values, None, grad_W, None, None, None


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  order: torch.Tensor | None = None, unit_rows: bool = False,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j values[b, j] · W_dec[indices[b, j]]  ->  [batch, d_in] (no bias).
    order: latent_order(indices) when known (a Selection carries it), saving a sort in the backward.
    unit_rows: W_dec's rows have unit norm and their gradient should not change that norm: the backward
    removes each row's gradient component along the row (what SAE.remove_parallel_gradient does on the
    dense gradient), from the dot products it computes anyway.
    offsets [n_bags + 1]: values/indices are flat [n], bag b summing entries offsets[b]:offsets[b+1]
    (a Selection's tokens, or any finer split of them) -> [n_bags, d_in]."""
    if offsets is None and indices.shape[1] == 0:
        return values.new_zeros(values.shape[0], W_dec.shape[1])
    if offsets is not None and indices.numel() == 0:
        return values.new_zeros(offsets.numel() - 1, W_dec.shape[1])
    if order is None:
        order = indices.new_empty(0)
    offsets = indices.new_empty(0) if offsets is None else offsets
    return _SparseDecode.apply(values, indices, W_dec, order, offsets, bool(unit_rows))


def dense_codes(values: torch.Tensor, indices: torch.Tensor, d_sae: int,
                offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter a selection into dense [batch, d_sae] codes (for encode() at inference); flat selections
    pass their offsets."""
    if offsets is None:
        return values.new_zeros(values.shape[0], d_sae).scatter_add_(1, indices, values)
    codes = values.new_zeros(offsets.numel() - 1, d_sae)
    return codes.index_put_((bag_ids(offsets), indices), values, accumulate=True)


# The most listed entries (nonzero codes, and for jumprelu its kernel's window) the sparse path takes, as a share of
# all: below the crossover with the dense products, near 1/9 at the bench's shape (scripts/bench_sparse_codes.py).
SPARSE_CODES_DENSITY = 1 / 16


class Listing(NamedTuple):
    """Entries of a [batch, d_sae] matrix, token by token (latents ascending within a token): the flat form."""
    rows: torch.Tensor      # [n] token of each entry
    cols: torch.Tensor      # [n] latent id of each entry
    offsets: torch.Tensor   # [batch + 1] where token b's entries start (CSR row pointers)


def list_entries(support: torch.Tensor, max_density: float = SPARSE_CODES_DENSITY) -> Listing | None:
    """The entries of support [batch, d_sae] (read without grad) that are > 0, when there are some and at most
    max_density of all; None otherwise, when support is not finite, and on devices where listing them would be
    a host sync (a GPU keeps its dense products, which its tensor cores make cheap)."""
    if sync_free(support) or support.dim() != 2:
        return None
    support = support.detach()
    if not bool(torch.isfinite(support.sum())):
        return None             # a NaN is never "> 0": the dense path lets it reach the loss, where the trainer stops
    most = int(max_density * support.numel())
    offsets = native.offsets_above(support, 0.0)                      # [batch + 1], where the kernels are here
    if offsets is not None:
        if not 0 < int(offsets[-1]) <= most:
            return None
        rows, cols, _ = native.entries_above(support, 0.0, offsets)   # [n] each, token by token
        return Listing(rows, cols, offsets)
    above = support > 0
    if not 0 < int(above.sum()) <= most:
        return None
    rows, cols = above.nonzero(as_tuple=True)                         # [n] each, row-major
    offsets = torch.zeros(support.shape[0] + 1, dtype=torch.int64, device=support.device)   # [batch + 1]
    offsets[1:] = torch.bincount(rows, minlength=support.shape[0]).cumsum(0)
    return Listing(rows, cols, offsets)


def decode_listed(values: torch.Tensor, listing: Listing, W_dec: torch.Tensor,
                  b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """Σ values · W_dec[cols] per token (+ b_dec) -> [batch, d_in]: values [n] (with autograd) at the listed
    entries, the rest of the codes zero. The decode, W_dec's gradient and the values' gradient are sparse."""
    x_hat = sparse_decode(values, listing.cols, W_dec, offsets=listing.offsets)   # [batch, d_in]
    return x_hat if b_dec is None else x_hat + b_dec
