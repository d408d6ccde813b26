"""The one streaming pass of `sae analyze`: read the store in window order, encode a batch, and fold
its codes into per-latent statistics, top-N examples, a reservoir sample and per-band samples
(sae.analyze.bands), holding no more than one batch of codes at a time.

Per batch only one dense pass (torch.nonzero) finds the firing entries (code > τ; |code| > 0 for
signed codes); everything else works on that sparse list, in row chunks of about max_entries/2 entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from sae.analyze.bands import BandSampler
from sae.analyze.topk_stream import BatchContext, TopKeeper, hash_keys


def log_bin_edges(lo: float = 1e-4, hi: float = 1e4, per_decade: int = 10) -> torch.Tensor:
    """Fixed log-spaced histogram edges; values below lo fall in bin 0, above hi in the last bin."""
    n_bins = int(round(math.log10(hi / lo) * per_decade))
    return torch.logspace(math.log10(lo), math.log10(hi), n_bins + 1, dtype=torch.float64)


@dataclass
class WindowBatch:
    x: torch.Tensor                      # [B, d_in] activations, float32
    global_rows: torch.Tensor            # [B] int64
    window: torch.Tensor | None          # [B] int64 shard-local window index (None without windows)
    position: torch.Tensor | None        # [B] int64
    labels: torch.Tensor | None          # [B] int64 (-1 = unlabelled)
    shard: int


def iter_window_batches(store, layer, batch_size: int) -> Iterator[WindowBatch]:
    """Every row once, shard by shard, in (window, position) order; a batch never splits a window
    (unless one window alone is longer than batch_size) and never crosses a shard."""
    name = f"activations.{layer}"
    has_windows, has_labels = store.has_windows, store.has_labels
    for s, shard in enumerate(store.shards):
        n = shard.n_rows
        if n == 0:
            continue
        window = position = order = None
        boundaries = torch.zeros(0, dtype=torch.int64)
        if has_windows:
            window = store.read_shard(s, "window_index").long()
            position = store.read_shard(s, "position").long()
            key = window * (int(position.max()) + 1) + position
            if bool((key[1:] < key[:-1]).any()):
                order = torch.argsort(key, stable=True)
                window, position = window[order], position[order]
            boundaries = (window[1:] != window[:-1]).nonzero().squeeze(1) + 1   # first row of each window
        labels = store.read_shard(s, "label").long() if has_labels else None
        if labels is not None and order is not None:
            labels = labels[order]
        whole = store.read_shard(s, name) if order is not None else None
        lo = 0
        while lo < n:
            hi = min(lo + batch_size, n)
            if hi < n and len(boundaries):
                at = int(torch.searchsorted(boundaries, hi, right=True)) - 1   # last window start <= hi
                if at >= 0 and int(boundaries[at]) > lo:
                    hi = int(boundaries[at])
                else:
                    later = boundaries[boundaries > hi]
                    hi = int(later[0]) if len(later) else n
            if order is None:
                x = store.read(s, name, lo, hi).float()
                local = torch.arange(lo, hi)
            else:
                local = order[lo:hi]
                x = whole[local].float()
            if not bool(torch.isfinite(x).all()):
                from sae.errors import UserError
                raise UserError(f"{store.path} is damaged: shard {shard.name} holds NaN or Inf activations")
            yield WindowBatch(x, local + shard.start,
                              None if window is None else window[lo:hi],
                              None if position is None else position[lo:hi],
                              None if labels is None else labels[lo:hi], s)
            lo = hi
        del whole
        handles = getattr(store, "_handles", None)   # unmap the finished shard: its pages leave our RSS
        if isinstance(handles, dict):
            handles.pop(shard.name, None)


class FeatureStats:
    """Running per-latent statistics plus the top-N keeper, the reservoir keeper and the per-band sampler."""

    def __init__(self, d_sae: int, *, n_top: int, reservoir: int, radius: int | None, signed: bool,
                 threshold: float, n_labels: int = 0, edges: torch.Tensor | None = None, device="cpu",
                 seed: int = 0, max_entries: int = 4_000_000, n_bands: int = 5, per_band: int = 5):
        self.d_sae, self.signed, self.seed, self.max_entries = d_sae, signed, seed, max_entries
        self.floor = 0.0 if signed else float(threshold)   # a code "fires" when its score exceeds this
        self.entries_per_row = float(d_sae)                 # running estimate, sizes the row chunks
        self.edges = (log_bin_edges() if edges is None else edges).to(device)
        self.n_bins = len(self.edges) - 1
        self.n_labels = n_labels
        self.n_tokens = 0
        self.fire_count = torch.zeros(d_sae, dtype=torch.int64, device=device)              # [d_sae]
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)               # [d_sae]
        self.max_score = torch.zeros(d_sae, dtype=torch.float32, device=device)             # [d_sae]
        self.hist = torch.zeros(d_sae * self.n_bins, dtype=torch.int64, device=device)      # [d_sae * bins]
        self.label_tokens = torch.zeros(max(n_labels, 1), dtype=torch.int64, device=device)  # [L]
        self.label_sum = torch.zeros(d_sae * max(n_labels, 1), dtype=torch.float64, device=device)
        self.label_hist = torch.zeros(d_sae * n_labels * self.n_bins, dtype=torch.int64, device=device) \
            if n_labels else None                                                           # [d_sae * L * bins]
        self.top = TopKeeper(n_top, d_sae, radius, device, floor=self.floor)
        self.reservoir = TopKeeper(reservoir, d_sae, radius, device, floor=float("-inf"))
        self.bands = BandSampler(d_sae, n_bands, per_band, radius, device, seed)

    @torch.no_grad()
    def update(self, codes: torch.Tensor, batch: WindowBatch) -> None:
        """Fold one batch of codes ([B, d_sae]) in."""
        device = codes.device
        window = None if batch.window is None else batch.window.to(device)
        position = None if batch.position is None else batch.position.to(device)
        context = BatchContext(codes, batch.global_rows.to(device), window, position)
        labels = None if batch.labels is None else batch.labels.to(device)
        self.n_tokens += codes.shape[0]
        if labels is not None and self.n_labels:
            known = labels[labels >= 0]
            self.label_tokens += torch.bincount(known, minlength=self.n_labels)[: self.n_labels]
        # row chunks sized from the entries per row seen so far, so that a chunk lists about
        # max_entries/2 entries (the first chunk assumes every entry fires)
        lo = 0
        while lo < codes.shape[0]:
            hi = min(codes.shape[0], lo + max(1, int(self.max_entries / (2 * max(self.entries_per_row, 1e-3)))))
            block = codes[lo:hi]
            if self.floor == 0.0:      # firing implies non-zero: one pass, no comparison tensor
                rows, latents = block.nonzero(as_tuple=True)                               # [m] each
            else:
                rows, latents = (block > self.floor).nonzero(as_tuple=True)
            self.entries_per_row = len(rows) / (hi - lo)
            acts = block.reshape(-1).take(rows * block.shape[1] + latents)               # [m]
            scores = acts.abs() if self.signed else acts
            if not self.signed and self.floor == 0.0:
                firing = scores > 0
                if not bool(firing.all()):
                    rows, latents, acts, scores = rows[firing], latents[firing], acts[firing], scores[firing]
            self._fold(rows + lo, latents, acts, scores, labels, context)
            lo = hi

    def _fold(self, rows, latents, acts, scores, labels, context: BatchContext) -> None:
        d_sae, n_bins = self.d_sae, self.n_bins
        if len(rows) == 0:
            return
        self.fire_count += torch.bincount(latents, minlength=d_sae)
        self.act_sum += torch.bincount(latents, weights=acts.double(), minlength=d_sae)
        self.max_score.scatter_reduce_(0, latents, scores.float(), reduce="amax")
        bins = (torch.bucketize(scores.double(), self.edges, right=True) - 1).clamp_(0, n_bins - 1)
        self.hist += torch.bincount(latents * n_bins + bins, minlength=d_sae * n_bins)
        if labels is not None and self.n_labels:
            row_labels = labels[rows]
            known = row_labels >= 0
            pair = latents[known] * self.n_labels + row_labels[known]
            self.label_sum += torch.bincount(pair, weights=acts[known].double(), minlength=d_sae * self.n_labels)
            self.label_hist += torch.bincount(pair * n_bins + bins[known],
                                              minlength=d_sae * self.n_labels * n_bins)
        self.top.offer(latents, scores, acts, rows, context)
        keys = hash_keys(context.global_rows[rows], latents, self.seed)
        self.reservoir.offer(latents, 1.0 - keys, acts, rows, context)
        self.bands.offer(latents, scores, acts, rows, context, self.max_score)

    # ---- results ---------------------------------------------------------------------------
    def histograms(self) -> torch.Tensor:
        return self.hist.view(self.d_sae, self.n_bins)                                     # [d_sae, bins]

    def label_means(self) -> torch.Tensor | None:
        """[d_sae, L] mean code per label over that label's tokens (zeros included)."""
        if not self.n_labels:
            return None
        sums = self.label_sum.view(self.d_sae, self.n_labels)
        return sums / self.label_tokens.clamp(min=1).double()[None, :]

    def label_f1(self) -> torch.Tensor | None:
        """[d_sae, L] best token-level F1 of the one-feature probe "score >= t ⇒ label", t over bin edges."""
        if not self.n_labels:
            return None
        hist = self.label_hist.view(self.d_sae, self.n_labels, self.n_bins)
        true_pos = hist.flip(-1).cumsum(-1).flip(-1).double()                             # [d_sae, L, bins]
        predicted = true_pos.sum(dim=1, keepdim=True)                                     # [d_sae, 1, bins]
        positives = self.label_tokens.double()[None, :, None]                            # [1, L, 1]
        f1 = 2 * true_pos / (predicted + positives).clamp(min=1)
        return f1.amax(dim=-1)
