"""Interval samples: examples drawn from each activation band of a feature's FULL activation distribution.

The bands are equal-width slices of [0, max] (SAEDashboard's "quantile groups"); max is only known at the
end of the one streaming pass. So during the pass every latent keeps a uniform sample (a reservoir of
`per_bin` entries, `TopKeeper` with pseudo-random keys) and the token count of each bin of a fixed fine
log-spaced grid (PER_DECADE bins a decade: a bin near the maximum is about a quarter of a band wide) in
a window of `span` bins below its running maximum. The window only moves up and a bin's entries can only
arrive once the maximum has reached it, so every bin still in the window at the end saw all of its
entries, and the window reaches below max/n_bands: bands 1..n-1 are covered by complete bins. Band 0
comes from the feature's plain reservoir sample (most entries lie there). At the end, each band's
examples are a weighted sample of the bins' samples (weight = the bin's token count over its kept
entries, Efraimidis-Spirakis keys), i.e. close to uniform over the band's tokens (a bin that straddles a
band edge is sampled as a whole). Memory: d_sae x span x per_bin kept entries.
"""
from __future__ import annotations

import math

import torch

from sae.analyze.topk_stream import BatchContext, TopKeeper, hash_keys

PER_DECADE = 40                  # sampling bins a decade (ratio 1.059 between edges)
LOWEST, HIGHEST = 1e-6, 1e6      # |code| below LOWEST falls in bin 0, above HIGHEST in the last bin


def sampling_edges(per_decade: int = PER_DECADE) -> torch.Tensor:
    """The fixed log-spaced grid the per-bin samples are kept on."""
    n_bins = int(round(math.log10(HIGHEST / LOWEST) * per_decade))
    return torch.logspace(math.log10(LOWEST), math.log10(HIGHEST), n_bins + 1, dtype=torch.float64)


def window_span(n_bands: int, per_decade: int = PER_DECADE) -> int:
    """Bins kept below the maximum's bin: enough to reach below max / n_bands."""
    return int(math.ceil(math.log10(max(n_bands, 1)) * per_decade)) + 2


def per_bin_for(per_band: int) -> int:
    """Entries kept per bin: a band spans several bins, so about half a band's worth each is enough."""
    return max(2, (per_band + 1) // 2)


class BandSampler:
    """Per latent and log bin (within `span` bins of the latent's running max bin), `per_bin` random entries."""

    def __init__(self, d_sae: int, n_bands: int, per_band: int, radius: int | None, device="cpu", seed: int = 0):
        self.d_sae, self.seed, self.n_bands = d_sae, seed, max(n_bands, 1)
        self.edges = sampling_edges().to(device)
        self.span = window_span(n_bands)
        self.keeper = TopKeeper(per_bin_for(per_band), d_sae * self.span, radius, device)  # set = (latent, bin % span)
        self.slot_bin = torch.full((d_sae * self.span,), -1, dtype=torch.int64, device=device)  # [d_sae * span]
        self.counts = torch.zeros(d_sae * self.span, dtype=torch.int64, device=device)          # tokens in the bin
        self.top_bin = torch.full((d_sae,), -1, dtype=torch.int64, device=device)              # [d_sae]

    def offer(self, latents: torch.Tensor, scores: torch.Tensor, acts: torch.Tensor, rows: torch.Tensor,
              context: BatchContext, running_max: torch.Tensor | None = None) -> None:
        """Firing entries of one batch (all [m]: latent, |code|, code, batch-local row). running_max ([d_sae],
        this batch included): entries below running_max / n_bands are band 0 for good (the max only grows),
        which the plain reservoir serves, so they are dropped first."""
        if running_max is not None:
            upper = scores >= running_max[latents] / self.n_bands
            latents, scores, acts, rows = latents[upper], scores[upper], acts[upper], rows[upper]
        n_bins = len(self.edges) - 1
        bins = (torch.bucketize(scores.double(), self.edges, right=True) - 1).clamp_(0, n_bins - 1)   # [m]
        self.top_bin.scatter_reduce_(0, latents, bins, reduce="amax")
        inside = bins > self.top_bin[latents] - self.span
        latents, bins, acts, rows = latents[inside], bins[inside], acts[inside], rows[inside]
        if len(latents) == 0:
            return
        slots = latents * self.span + bins % self.span                                       # [m']
        stale = self.slot_bin[slots] != bins        # the slot held a lower bin, now below the window
        if bool(stale.any()):
            cleared = torch.unique(slots[stale])
            self.keeper.clear(cleared)
            self.counts[cleared] = 0
            self.slot_bin[slots[stale]] = bins[stale]
        self.counts += torch.bincount(slots, minlength=len(self.counts))
        keys = hash_keys(context.global_rows[rows], latents, self.seed + 7919)
        self.keeper.offer(slots, keys, acts, rows, context, code_latents=latents)


def _kept(keeper: TopKeeper):
    """(set, slot, act, row, contexts) of a keeper's filled slots, on the CPU."""
    owner, slot = (keeper.rows >= 0).nonzero(as_tuple=True)
    contexts = keeper.contexts_of(owner, slot)
    return (owner.cpu(), slot.cpu(), keeper.acts[owner, slot].cpu(), keeper.rows[owner, slot].cpu(),
            None if contexts is None else contexts.cpu())


def interval_entries(stats, n_bands: int, per_band: int):
    """Up to per_band examples per equal-width band of [0, max] for every feature, each band sampled
    uniformly from all of its tokens. Returns (feature, act, row, contexts, band, band_lo, band_hi, rank)."""
    top = stats.max_score.cpu().double()                                                 # [d_sae]
    # band 0: the plain reservoir (a uniform sample of every firing entry), its entries below max / n
    r_feature, r_slot, r_act, r_rows, r_contexts = _kept(stats.reservoir)
    r_band = _band_of(r_act, top[r_feature], n_bands)
    low = r_band == 0
    r_priority = -r_slot[low].double()                                 # the reservoir's own random order
    # bands 1..n-1: the per-bin samples, weighted by how many tokens each kept entry stands for
    sampler = stats.bands
    b_set, b_slot, b_act, b_rows, b_contexts = _kept(sampler.keeper)
    b_feature = b_set // sampler.span
    b_bin = sampler.slot_bin.cpu()[b_set]
    in_window = b_bin > sampler.top_bin.cpu()[b_feature] - sampler.span
    kept_per_set = torch.bincount(b_set, minlength=sampler.keeper.scores.shape[0]).double()
    weight = sampler.counts.cpu().double()[b_set] / kept_per_set[b_set].clamp(min=1)
    u = hash_keys(b_rows, b_feature, stats.seed + 104729).clamp(min=1e-12)
    b_priority = u.log() / weight.clamp(min=1e-12)                     # Efraimidis-Spirakis: larger is chosen
    b_band = _band_of(b_act, top[b_feature], n_bands)
    high = in_window & (b_band > 0)

    feature = torch.cat([r_feature[low], b_feature[high]])
    act = torch.cat([r_act[low], b_act[high]])
    rows = torch.cat([r_rows[low], b_rows[high]])
    band = torch.cat([r_band[low], b_band[high]])
    priority = torch.cat([r_priority, b_priority[high]])
    contexts = None if r_contexts is None else torch.cat([r_contexts[low], b_contexts[high]])
    # rank inside each (feature, band) by priority, keep the first per_band
    order = torch.argsort(priority, descending=True, stable=True)
    order = order[torch.argsort((feature * n_bands + band)[order], stable=True)]
    group = (feature * n_bands + band)[order]
    _, counts = torch.unique_consecutive(group, return_counts=True)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(len(order)) - first
    chosen = order[rank < per_band]
    width = top[feature[chosen]] / n_bands
    return (feature[chosen], act[chosen], rows[chosen], None if contexts is None else contexts[chosen],
            band[chosen], (band[chosen] * width).float(), ((band[chosen] + 1) * width).float(),
            rank[rank < per_band])


def _band_of(acts: torch.Tensor, top: torch.Tensor, n_bands: int) -> torch.Tensor:
    """Equal-width band index of |act| in [0, top] ([n] each -> [n] int64)."""
    band = torch.where(top > 0, (acts.double().abs() / top.clamp_min(1e-30) * n_bands).floor(),
                       torch.zeros_like(top))
    return band.long().clamp(0, n_bands - 1)
