"""The stored rows' norm statistics (median, p99, p99.9, max per layer), kept while collecting so that a
finished collection never reads its store back.

Up to `exact_rows` rows a layer the norms are kept as they are (exact percentiles, as numpy computes
them); past that, a histogram with 256 bins an octave takes over (percentiles within 0.3%), so memory
stays bounded at any store size. A resumed collection reads back only the shards written before it.
"""
from __future__ import annotations

import numpy as np
import torch

BINS_PER_OCTAVE = 256
LOW, HIGH = -40, 40          # octaves covered: 2**-40 .. 2**40


class NormSketch:
    def __init__(self, layers, exact_rows: int = 1 << 22):
        self.layers = [str(layer) for layer in layers]
        self.exact_rows = exact_rows
        self.exact: list[list[np.ndarray]] = [[] for _ in self.layers]
        self.count = 0
        self.first: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in self.layers]
        self.first_rows = 0
        self.histogram = np.zeros((len(self.layers), (HIGH - LOW) * BINS_PER_OCTAVE + 2), dtype=np.int64)
        self.maximum = np.full(len(self.layers), -np.inf)

    def add(self, norms: torch.Tensor, keep_first: int = 8192) -> None:
        """norms: [n, L] float32 row norms, in store order."""
        values = norms.float().numpy()                                   # [n, L]
        if len(values) == 0:
            return
        if self.first_rows < keep_first:
            take = values[:keep_first - self.first_rows]
            self.first = [np.concatenate([f, take[:, i]]) for i, f in enumerate(self.first)]
            self.first_rows += len(take)
        if self.count + len(values) <= self.exact_rows:
            for i in range(len(self.layers)):
                self.exact[i].append(values[:, i].copy())
        else:
            self.exact = [[] for _ in self.layers]                        # past the cap: the histogram alone
        self.count += len(values)
        with np.errstate(divide="ignore"):
            bins = np.floor((np.log2(np.maximum(values, 0)) - LOW) * BINS_PER_OCTAVE) + 1   # [n, L]; 0: zero norms
        bins = np.clip(np.nan_to_num(bins, nan=0, neginf=0), 0, self.histogram.shape[1] - 1).astype(np.int64)
        for i in range(len(self.layers)):
            self.histogram[i] += np.bincount(bins[:, i], minlength=self.histogram.shape[1])
        self.maximum = np.maximum(self.maximum, values.max(axis=0))

    def first_median(self) -> dict:
        """{layer: median norm of the first rows (up to keep_first)}."""
        return {layer: float(torch.from_numpy(self.first[i]).median()) for i, layer in enumerate(self.layers)
                if len(self.first[i])}

    def _percentiles(self, i: int, qs) -> list[float]:
        if self.exact[i] or self.count == 0:
            values = np.concatenate(self.exact[i]) if self.exact[i] else np.zeros(1, dtype=np.float32)
            return np.percentile(values, qs).tolist()
        cumulative = np.cumsum(self.histogram[i])
        out = []
        for q in qs:
            b = int(np.searchsorted(cumulative, q / 100 * (self.count - 1), side="right"))
            out.append(0.0 if b == 0 else float(2 ** (LOW + (b - 0.5) / BINS_PER_OCTAVE)))
        return out

    def stats(self) -> dict:
        """{layer: {median, p99, p999, max, p999_over_median}} (the manifest's norm_stats)."""
        out = {}
        if self.count == 0:
            return out
        for i, layer in enumerate(self.layers):
            median, p99, p999 = self._percentiles(i, [50, 99, 99.9])
            out[layer] = {"median": median, "p99": p99, "p999": p999, "max": float(self.maximum[i]),
                          "p999_over_median": p999 / median if median else None}
        return out


def read_back(sketch: NormSketch, folder, shard_names, layers) -> None:
    """Add the norms of shards already on disk (a resumed collection's earlier shards) to the sketch."""
    from safetensors import safe_open
    for name in shard_names:
        with safe_open(str(folder / name), framework="pt") as handle:
            blocks = [handle.get_slice(f"activations.{layer}") for layer in layers]
            n = blocks[0].get_shape()[0]
            for lo in range(0, n, 65536):
                hi = min(n, lo + 65536)
                sketch.add(torch.stack([b[lo:hi].float().norm(dim=-1) for b in blocks], dim=1))


def merged(sketch: NormSketch, gather_cat) -> NormSketch:
    """Every rank's sketch merged (gather_cat: sae.distributed.all_gather_cat; identity without torchrun)."""
    exact = [np.concatenate(e) if e else np.zeros(0, dtype=np.float32) for e in sketch.exact]
    has_exact = sketch.count == 0 or all(len(e) for e in exact)
    flags = gather_cat(torch.tensor([[sketch.count, int(has_exact)]], dtype=torch.int64))     # [ranks, 2]
    out = NormSketch(sketch.layers, sketch.exact_rows)
    out.count = int(flags[:, 0].sum())
    out.first, out.first_rows = sketch.first, sketch.first_rows
    out.histogram = gather_cat(torch.from_numpy(sketch.histogram)[None]).sum(0).numpy()
    out.maximum = gather_cat(torch.from_numpy(sketch.maximum)[None]).max(0).values.numpy()
    if bool(flags[:, 1].all()):
        rows = torch.from_numpy(np.stack(exact, axis=1)) if sketch.count else torch.zeros(0, len(sketch.layers))
        everything = gather_cat(rows.float()).numpy()                                        # [n all ranks, L]
        out.exact = [[everything[:, i]] for i in range(len(sketch.layers))] if len(everything) else out.exact
    return out
