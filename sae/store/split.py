"""A store's split (train or held-out rows) as runs of contiguous rows, and the shuffled order of
training batches over it, both in memory proportional to the number of runs (a few per shard), not rows.

`Segments` maps a position inside the split (0 .. n-1, in store order) to its global row. `BatchPlan`
maps a training step to the split positions of its batch: an epoch shuffles chunks of `chunk_rows`
consecutive positions, groups them in buffers of `buffer_chunks` chunks, and shuffles each buffer's
positions; batches are consecutive slices of that stream. Every piece is seeded by (seed, epoch,
buffer), so batch `step` is a pure function of (seed, step) and a resumed run seeks to its step in
O(number of chunks) arithmetic, never replaying the epoch.
"""
from __future__ import annotations

import torch


class Segments:
    """The rows of one split: runs [start, start + length) of global rows, in store order."""

    def __init__(self, starts: list[int], lengths: list[int]):
        keep = [(s, n) for s, n in zip(starts, lengths) if n > 0]
        self.starts = torch.tensor([s for s, _ in keep], dtype=torch.int64)              # [S] global rows
        lengths_t = torch.tensor([n for _, n in keep], dtype=torch.int64)                # [S]
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths_t.cumsum(0)])  # [S + 1] split positions
        self.n = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n

    def rows_of(self, positions: torch.Tensor) -> torch.Tensor:
        """[m] split positions (any order) -> [m] global row indices."""
        segment = torch.searchsorted(self.offsets, positions, right=True) - 1            # [m]
        return self.starts[segment] + (positions - self.offsets[segment])

    def pieces(self, lo: int = 0, hi: int | None = None):
        """(global start, length) of the contiguous pieces covering split positions [lo, hi), in order."""
        hi = self.n if hi is None else min(hi, self.n)
        if lo >= hi:
            return
        j = int(torch.searchsorted(self.offsets, torch.tensor(lo), right=True)) - 1
        while lo < hi:
            first, end = int(self.offsets[j]), int(self.offsets[j + 1])
            take = min(end, hi) - lo
            yield int(self.starts[j]) + lo - first, take
            lo += take
            j += 1

    def all_rows(self) -> torch.Tensor:
        """[n] every global row of the split (O(rows): for small stores and old callers)."""
        if self.n == 0:
            return torch.empty(0, dtype=torch.int64)
        return self.rows_of(torch.arange(self.n))


def _seeded(*parts: int) -> torch.Generator:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class BatchPlan:
    """Step -> split positions of its batch (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int, chunk_rows: int = 2048, buffer_chunks: int = 32):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.chunk_rows = max(1, min(chunk_rows, n))
        self.n_chunks = (n + self.chunk_rows - 1) // self.chunk_rows
        self.buffer_chunks = max(1, buffer_chunks)
        self.n_buffers = (self.n_chunks + self.buffer_chunks - 1) // self.buffer_chunks
        self.buffer_rows = self.buffer_chunks * self.chunk_rows
        self.deficit = self.n_chunks * self.chunk_rows - n        # the last chunk's missing rows
        self.batches_per_epoch = n // batch_size
        self._epoch = None
        self._order = None            # [n_chunks] chunk ids in this epoch's order
        self._short_buffer = None     # the buffer that holds the short last chunk
        self._buffers: dict = {}      # (epoch, buffer) -> [rows] shuffled positions; the last two kept

    def _set_epoch(self, epoch: int) -> None:
        if self._epoch != epoch:
            self._order = torch.randperm(self.n_chunks, generator=_seeded(self.seed, epoch))
            where = int((self._order == self.n_chunks - 1).nonzero()[0, 0])
            self._epoch, self._short_buffer = epoch, where // self.buffer_chunks

    def _offset(self, buffer: int) -> int:
        """Where buffer `buffer` starts in the epoch's stream of positions."""
        return buffer * self.buffer_rows - (self.deficit if buffer > self._short_buffer else 0)

    def _buffer(self, epoch: int, buffer: int) -> torch.Tensor:
        key = (epoch, buffer)
        if key not in self._buffers:
            chunks = self._order[buffer * self.buffer_chunks:(buffer + 1) * self.buffer_chunks]
            positions = torch.cat([torch.arange(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n))
                                   for c in chunks.tolist()])                                  # [rows]
            shuffled = positions[torch.randperm(len(positions), generator=_seeded(self.seed, epoch, buffer, 7))]
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] == epoch and k[1] >= buffer - 1}
            self._buffers[key] = shuffled
        return self._buffers[key]

    def positions(self, step: int) -> torch.Tensor:
        """[batch_size] split positions of batch `step`."""
        epoch, within = divmod(step, self.batches_per_epoch)
        self._set_epoch(epoch)
        start, stop = within * self.batch_size, (within + 1) * self.batch_size
        buffer = min(start // self.buffer_rows, self.n_buffers - 1)
        while buffer + 1 < self.n_buffers and self._offset(buffer + 1) <= start:
            buffer += 1
        while self._offset(buffer) > start:
            buffer -= 1
        pieces = []
        while start < stop:
            rows = self._buffer(epoch, buffer)
            lo = start - self._offset(buffer)
            piece = rows[lo:lo + stop - start]
            pieces.append(piece)
            start += len(piece)
            buffer += 1
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
