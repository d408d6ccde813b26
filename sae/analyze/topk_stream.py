"""Streaming per-latent top-N selection that never holds all codes.

A `TopKeeper` keeps, for every latent, the N entries with the largest score seen so far, in a
[N, d_sae] layout (row 0 = best), with each entry's activation, global row and (optionally) the
latent's codes on the entry's ±radius neighbouring tokens. `offer()` takes a sparse list of
candidate (latent, score, row) entries from one batch; candidates at or below a latent's running
threshold (its N-th best score) are dropped before any sorting, so after the first few batches a
batch costs almost nothing here.

The same keeper serves as a per-latent reservoir sample: give each entry a pseudo-random key
(`hash_keys`) as its score and keep the N largest keys; that is a uniform sample without
replacement of the latent's entries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchContext:
    """What context capture needs to know about the rows of one batch (all [B], batch order)."""
    codes: torch.Tensor                  # [B, d_sae] the batch's codes (contexts are read from here)
    global_rows: torch.Tensor            # [B] int64 each batch row's global index in the store
    window: torch.Tensor | None = None   # [B] int64 window id (a window's rows contiguous, by position)
    position: torch.Tensor | None = None  # [B] int64 position inside the window


def capture_contexts(ctx: BatchContext, rows: torch.Tensor, latents: torch.Tensor, radius: int) -> torch.Tensor:
    """Codes of `latents` on the tokens at positions p-radius..p+radius of each row's window.

    rows, latents: [n] batch-local rows and their latents. Returns [n, 2*radius+1] float32; slot
    radius is the row itself; positions with no row (outside the window, or dropped special tokens)
    are 0. Relies on rows of a window being contiguous and ordered by position in the batch.
    """
    width = 2 * radius + 1
    n, n_rows = rows.shape[0], ctx.codes.shape[0]
    offsets = torch.arange(-radius, radius + 1, device=rows.device)                  # [W]
    neighbours = rows[:, None] + offsets[None, :]                                    # [n, W]
    inside = (neighbours >= 0) & (neighbours < n_rows)
    neighbours = neighbours.clamp(0, n_rows - 1)
    slots = ctx.position[neighbours] - ctx.position[rows][:, None] + radius           # [n, W]
    valid = inside & (ctx.window[neighbours] == ctx.window[rows][:, None]) & (slots >= 0) & (slots < width)
    d_sae = ctx.codes.shape[1]
    values = ctx.codes.reshape(-1).take(neighbours * d_sae + latents[:, None]).float()  # [n, W]
    out = torch.zeros(n, width + 1, dtype=torch.float32, device=rows.device)
    out.scatter_(1, torch.where(valid, slots, torch.full_like(slots, width)), torch.where(valid, values, 0.0))
    return out[:, :width]


def hash_keys(global_rows: torch.Tensor, latents: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Deterministic pseudo-random keys in [0, 1) for (row, latent) pairs ([n] int64 each -> [n] float64)."""
    mask = 0xFFFFFFFF
    x = (global_rows * 2654435761 + latents * 40503 + seed * 97 + 0x9E3779B9) & mask
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & mask
    x = x ^ (x >> 16)
    return x.double() / 2.0**32


class TopKeeper:
    """Per-latent top-N of (score, activation, row[, context]) in [d_sae, N] layout, best first.

    Latent-major layout: the latents a batch touches are gathered as contiguous rows and merged with
    one topk along the last dimension."""

    MIN_POOL = 1024   # smallest context pool (rows) allocated

    def __init__(self, n_keep: int, d_sae: int, radius: int | None, device="cpu", floor: float = float("-inf")):
        self.n_keep, self.d_sae, self.radius = int(n_keep), int(d_sae), radius
        self.scores = torch.full((d_sae, n_keep), float("-inf"), dtype=torch.float64, device=device)  # [d_sae, N]
        self.acts = torch.zeros(d_sae, n_keep, dtype=torch.float32, device=device)                   # [d_sae, N]
        self.rows = torch.full((d_sae, n_keep), -1, dtype=torch.int64, device=device)                # [d_sae, N]
        # contexts live in an append-only pool; kept entries point into it (moves copy pointers only)
        self.width = 0 if radius is None else 2 * radius + 1
        self.pointer = torch.full((d_sae, n_keep), -1, dtype=torch.int64, device=device)             # [d_sae, N]
        self.pool = torch.zeros(0, self.width, dtype=torch.float32, device=device)                   # [P, W]
        self.pool_used = 0
        # a candidate must beat this (the N-th best score so far, and never less than floor)
        self.threshold = torch.full((d_sae,), float(floor), dtype=torch.float64, device=device)     # [d_sae]
        self.floor = float(floor)

    def offer(self, latents: torch.Tensor, scores: torch.Tensor, acts: torch.Tensor, rows: torch.Tensor,
              batch: BatchContext, code_latents: torch.Tensor | None = None) -> int:
        """Merge candidates (all [m]: latent, score, activation, batch-local row) into the kept sets.

        Returns how many candidates entered. Contexts are captured from `batch` for entries that enter,
        from the codes of `code_latents` ([m]) when the kept sets are not the code's latents themselves
        (e.g. one set per latent and activation band); by default from `latents`.
        """
        scores = scores.double()
        keep = scores > self.threshold[latents]
        if not bool(keep.any()):
            return 0
        code_latents = latents if code_latents is None else code_latents
        latents, scores, acts, rows = latents[keep], scores[keep], acts[keep], rows[keep]
        code_latents = code_latents[keep]
        n_keep, device = self.n_keep, latents.device
        # sort by (latent asc, score desc); rank each candidate within its latent
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[torch.argsort(latents[order], stable=True)]
        latents, scores, acts, rows = latents[order], scores[order], acts[order], rows[order]
        code_latents = code_latents[order]
        touched, counts = torch.unique_consecutive(latents, return_counts=True)          # [T]
        group = torch.repeat_interleave(torch.arange(len(touched), device=device), counts)
        rank = torch.arange(len(latents), device=device) - (torch.cumsum(counts, 0) - counts)[group]
        width = min(n_keep, int(counts.max()))
        top = rank < width
        cand = top.nonzero().squeeze(1)                                                  # into the sorted lists
        cand_scores = torch.full((len(touched), width), float("-inf"), dtype=torch.float64, device=device)
        cand_index = torch.full((len(touched), width), -1, dtype=torch.int64, device=device)
        cand_scores[group[cand], rank[cand]] = scores[cand]
        cand_index[group[cand], rank[cand]] = cand
        # merge with the kept entries of the touched latents
        merged = torch.cat([self.scores[touched], cand_scores], dim=1)                  # [T, N + C]
        new_scores, pick = merged.topk(n_keep, dim=1)                                    # [T, N], sorted
        from_old = pick < n_keep
        old_pick = pick.clamp(max=n_keep - 1)
        cand_pick = cand_index.gather(1, (pick - n_keep).clamp(0, width - 1))            # [T, N]
        from_cand = ~from_old & (cand_pick >= 0)
        chosen = cand_pick[from_cand]
        new_acts = torch.where(from_old, self.acts[touched].gather(1, old_pick), 0.0)
        new_rows = torch.where(from_old, self.rows[touched].gather(1, old_pick), -1)
        new_acts[from_cand] = acts[chosen].float()
        new_rows[from_cand] = batch.global_rows[rows[chosen]]
        if self.radius is not None:
            new_pointer = torch.where(from_old, self.pointer[touched].gather(1, old_pick), -1)
            if len(chosen):
                captured = capture_contexts(batch, rows[chosen], code_latents[chosen], self.radius)  # [n_new, W]
                new_pointer[from_cand] = self._store(captured, new_pointer, touched)
            self.pointer[touched] = new_pointer
        self.scores[touched] = new_scores
        self.acts[touched] = new_acts
        self.rows[touched] = new_rows
        self.threshold[touched] = new_scores[:, -1].clamp(min=self.floor)
        return len(chosen)

    def clear(self, latents: torch.Tensor) -> None:
        """Empty the kept sets of `latents` ([n] int64): they start again from nothing."""
        self.scores[latents] = float("-inf")
        self.acts[latents] = 0.0
        self.rows[latents] = -1
        self.pointer[latents] = -1
        self.threshold[latents] = self.floor

    def contexts_of(self, latents: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
        """[n, W] contexts of kept entries (latent, slot) (zeros where empty); None without contexts."""
        if self.radius is None:
            return None
        pointer = self.pointer[latents, slots]
        if len(self.pool) == 0:
            return torch.zeros(len(pointer), self.width, device=pointer.device)
        return self.pool[pointer.clamp(min=0)].masked_fill_((pointer < 0)[:, None], 0.0)

    def _store(self, captured: torch.Tensor, touched_pointer: torch.Tensor, touched: torch.Tensor) -> torch.Tensor:
        """Append contexts to the pool, compacting (or growing) it first when full; returns their indices.
        Live pointers are self.pointer outside `touched` plus touched_pointer (updated in place) inside."""
        n_new = captured.shape[0]
        if self.pool_used + n_new > len(self.pool):
            pointer = self.pointer.clone()
            pointer[touched] = touched_pointer
            live_mask = pointer >= 0
            live = pointer[live_mask]
            if len(live) + n_new <= len(self.pool) // 2:                                   # compact
                self.pool[: len(live)] = self.pool[live]
            else:                                                                          # grow
                capacity = max(2 * (len(live) + n_new), self.MIN_POOL)
                grown = torch.zeros(capacity, self.width, device=self.pool.device)
                grown[: len(live)] = self.pool[live]
                self.pool = grown
            pointer[live_mask] = torch.arange(len(live), device=pointer.device)
            self.pointer.copy_(pointer)
            touched_pointer.copy_(pointer[touched])
            self.pool_used = len(live)
        index = torch.arange(self.pool_used, self.pool_used + n_new, device=captured.device)
        self.pool[index] = captured
        self.pool_used += n_new
        return index
