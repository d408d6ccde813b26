"""The contexts a feature is explained from and scored on.

A context is a span of ±radius stored tokens around one row of the store, with the feature's code on each
token. Explaining contexts: the strongest top examples (every other rank) and one interval sample per
activation band. Scoring contexts: the other top examples and interval samples (activating), and as many
non-activating ones: near misses (top examples of the feature's nearest features on which it stays silent)
and random spans of the store. The codes of every non-activating candidate are computed here, by encoding
its stored activations, so "non-activating" is checked, not assumed. No scoring context shares a window
(shard, window_index) with an explaining one, so the scorer never sees text the explainer saw.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch

from sae.errors import UserError


@dataclass
class Context:
    id: str                      # "shard:window_index:position" of its centre row
    window: str                  # "shard:window_index"
    tokens: list                 # token strings
    acts: list                   # the feature's code on each token (0 where it does not fire)
    kind: str                    # top | interval | near | random
    threshold: float = 0.0

    @property
    def activating(self) -> bool:
        return bool(self.acts) and max(self.acts) > self.threshold

    def firing(self) -> list[int]:
        """Indices of the tokens where the feature fires."""
        return [i for i, a in enumerate(self.acts) if a > self.threshold]

    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class FeatureContexts:
    feature: int
    explain: list = field(default_factory=list)    # activating contexts shown to the explainer
    score: list = field(default_factory=list)      # held-out contexts, activating and not


@dataclass
class ContextOptions:
    radius: int = 8               # tokens either side of the centre shown (trimmed from the analysis' spans)
    n_explain_top: int = 6        # top examples shown to the explainer
    n_explain_interval: int = 3   # interval samples shown to the explainer (one per band, strongest first)
    n_score: int = 8              # activating scoring contexts; as many non-activating ones
    n_random: int = 256           # random spans of the store (the shared pool of non-activating candidates)
    seed: int = 0


class _Grouped:
    """A parquet table's rows grouped by feature (sorted once; one feature is a slice)."""

    def __init__(self, path, columns):
        table = pq.read_table(path, columns=[c for c in columns if c in pq.read_schema(path).names])
        order = np.lexsort((table.column("rank").to_numpy() if "rank" in table.column_names else
                            np.zeros(table.num_rows), table.column("feature").to_numpy()))
        self.table = table.take(order)
        features = self.table.column("feature").to_numpy()
        self.starts = {int(f): int(s) for f, s in zip(*np.unique(features, return_index=True))}
        self.counts = dict(zip(*[a.tolist() for a in np.unique(features, return_counts=True)]))

    def rows(self, feature: int) -> list[dict]:
        start = self.starts.get(int(feature))
        return [] if start is None else self.table.slice(start, self.counts[int(feature)]).to_pylist()


class ContextSource:
    """Builds FeatureContexts from RUN/analysis/ and the store (the SAE encodes the candidates)."""

    def __init__(self, analysis_dir, store, layer, sae, options: ContextOptions, tokenizer=None,
                 threshold: float = 0.0, signed: bool = False, device="cpu"):
        self.store, self.sae, self.options, self.device = store, sae, options, device
        self.threshold, self.signed, self.tokenizer = threshold, signed, tokenizer
        self.name = f"activations.{layer}"
        self.context_size = int(store.manifest.get("context_size") or 0)
        if not store.has_windows:
            raise UserError(f"{store.path} has no token windows (made by from_tensors?): there is no text to explain")
        columns = ["feature", "rank", "band", "activation", "shard", "window_index", "position", "tokens", "acts",
                   "center"]
        self.top = _Grouped(analysis_dir / "top_examples.parquet", columns)
        interval = analysis_dir / "interval_examples.parquet"
        self.interval = _Grouped(interval, columns) if interval.is_file() else None
        features = pq.read_table(analysis_dir / "features.parquet", columns=["feature", "nearest"]).to_pydict()
        self.nearest = dict(zip(features["feature"], features["nearest"]))
        self.shard_index = {s.name: i for i, s in enumerate(store.shards)}
        self._lookup: dict[int, torch.Tensor] = {}
        self._shard_cache: dict[int, torch.Tensor] = {}
        self._windows: dict[int, torch.Tensor] = {}
        self._pool = None

    # ---- the store, row by row ---------------------------------------------------------------------------
    def _rows_of(self, shard: int) -> torch.Tensor:
        """[windows, context] local row of each (window, position) of a shard, -1 where none is stored."""
        if shard not in self._lookup:
            window = self.store.read_shard(shard, "window_index").long()
            position = self.store.read_shard(shard, "position").long()
            n_windows = self.store.read_shard(shard, "window_tokens").shape[0]
            width = max(self.context_size, int(position.max()) + 1 if len(position) else 1)
            table = torch.full((n_windows, width), -1, dtype=torch.int64)
            table[window, position] = torch.arange(len(window))
            self._lookup[shard] = table
        return self._lookup[shard]

    def _spans(self, centres: list[tuple[int, int, int]]):
        """For (shard, window, position) centres: token ids [n, W], local rows [n, W] (-1: none) per span."""
        r = self.options.radius
        offsets = torch.arange(-r, r + 1)
        token_ids = torch.full((len(centres), 2 * r + 1), -1, dtype=torch.int64)
        rows = torch.full((len(centres), 2 * r + 1), -1, dtype=torch.int64)
        for shard in sorted({c[0] for c in centres}):
            lookup = self._rows_of(shard)
            if shard not in self._windows:
                self._windows[shard] = self.store.read_shard(shard, "window_tokens").long()   # [w, context]
            windows = self._windows[shard]
            where = [i for i, c in enumerate(centres) if c[0] == shard]
            window = torch.tensor([centres[i][1] for i in where])
            places = torch.tensor([centres[i][2] for i in where])[:, None] + offsets    # [m, W]
            inside = (places >= 0) & (places < min(windows.shape[1], lookup.shape[1]))
            clamped = places.clamp(0, min(windows.shape[1], lookup.shape[1]) - 1)
            index = torch.tensor(where)
            token_ids[index] = torch.where(inside, windows[window[:, None], clamped], -1)
            rows[index] = torch.where(inside, lookup[window[:, None], clamped], -1)
        return token_ids, rows

    def _activations(self, shard: int) -> torch.Tensor:
        """A shard's activations, read once (the two most recent shards are kept)."""
        if shard not in self._shard_cache:
            if len(self._shard_cache) >= 2:
                self._shard_cache.pop(next(iter(self._shard_cache)))
            self._shard_cache[shard] = self.store.read_shard(shard, self.name)
        return self._shard_cache[shard]

    @torch.no_grad()
    def _codes(self, centres, shards_rows) -> torch.Tensor:
        """[n, W, d_sae] codes over each span (0 where no row is stored)."""
        token_rows = shards_rows
        n, width = token_rows.shape
        codes = torch.zeros(n, width, self.sae.d_sae)
        for shard in sorted({c[0] for c in centres}):
            sel = torch.tensor([i for i, c in enumerate(centres) if c[0] == shard])
            local = token_rows[sel]
            valid = local >= 0
            if not bool(valid.any()):
                continue
            x = self._activations(shard).index_select(0, local[valid]).float()                 # [m, d_in]
            block = self.sae.encode(x.to(self.device)).float().cpu()                            # [m, d_sae]
            if self.signed:
                block = block.abs()
            span_codes = torch.zeros(len(sel), width, self.sae.d_sae)
            span_codes[valid] = block
            codes[sel] = span_codes
        return codes

    def _strings(self, token_ids: torch.Tensor) -> list[list[str]]:
        from sae.analyze.extras import token_strings
        lookup = token_strings(self.tokenizer, token_ids[token_ids >= 0].tolist())
        return [[lookup[t] for t in row if t >= 0] for row in token_ids.tolist()]

    def _make(self, centres, token_ids, span_acts, kind) -> list[Context]:
        names = [s.name for s in self.store.shards]
        strings = self._strings(token_ids)
        out = []
        for (shard, window, position), ids, acts, tokens in zip(centres, token_ids.tolist(), span_acts.tolist(),
                                                               strings):
            acts = [a for t, a in zip(ids, acts) if t >= 0]
            out.append(Context(f"{names[shard]}:{window}:{position}", f"{names[shard]}:{window}", tokens,
                               acts, kind, self.threshold))
        return out

    def pool(self):
        """The shared random spans: (contexts, their span-max codes [P, d_sae]), built once."""
        if self._pool is None:
            gen = torch.Generator().manual_seed(self.options.seed)
            rows = torch.randperm(len(self.store), generator=gen)[: self.options.n_random].sort().values
            starts = torch.tensor([s.start for s in self.store.shards])
            shard_of = (torch.searchsorted(starts, rows, right=True) - 1).tolist()
            centres = []
            for row, shard in zip(rows.tolist(), shard_of):
                local = row - self.store.shards[shard].start
                window = int(self.store.read(shard, "window_index", local, local + 1)[0])
                position = int(self.store.read(shard, "position", local, local + 1)[0])
                centres.append((shard, window, position))
            token_ids, span_rows = self._spans(centres)
            span_max = torch.cat([self._codes(centres[i:i + 32], span_rows[i:i + 32]).amax(dim=1)
                                  for i in range(0, len(centres), 32)])               # [P, d_sae]
            self._pool = (centres, token_ids, span_max)
        return self._pool

    # ---- one feature --------------------------------------------------------------------------------------
    def _trim(self, row: dict, kind: str) -> Context:
        r = self.options.radius
        tokens, acts = list(row["tokens"] or []), [float(a) for a in (row["acts"] or [])]
        center = int(row.get("center") or 0)
        lo, hi = max(0, center - r), center + r + 1
        if self.signed:
            acts = [abs(a) for a in acts]
        shard = row["shard"]
        return Context(f"{shard}:{int(row['window_index'])}:{int(row['position'])}", f"{shard}:{int(row['window_index'])}",
                       tokens[lo:hi], acts[lo:hi], kind, self.threshold)

    def build(self, feature: int) -> FeatureContexts:
        o = self.options
        top = [self._trim(row, "top") for row in self.top.rows(feature)]
        interval_rows = self.interval.rows(feature) if self.interval is not None else []
        interval_rows.sort(key=lambda row: (-int(row.get("band") or 0), int(row.get("rank") or 0)))
        interval = [self._trim(row, "interval") for row in interval_rows]
        top = [c for c in top if c.activating]
        interval = [c for c in interval if c.activating]
        result = FeatureContexts(feature)
        if not top:
            return result
        explain = top[0::2][: o.n_explain_top]
        seen_bands, extra = set(), []
        for row, context in zip(interval_rows, [self._trim(r, "interval") for r in interval_rows]):
            band = int(row.get("band") or 0)
            if context.activating and band not in seen_bands and len(extra) < o.n_explain_interval:
                seen_bands.add(band)
                extra.append(context)
        result.explain = explain + extra
        shown = {c.window for c in result.explain}
        held_top = [c for c in top if c.window not in shown]
        held_interval = [c for c in interval if c.window not in shown]
        activating, used = [], set()
        for context in _interleave(held_top, held_interval):       # strongest and sampled, alternately
            if context.id not in used and len(activating) < o.n_score:
                activating.append(context)
                used.add(context.id)
        result.score = activating + self._silent(feature, shown, n=len(activating))
        return result

    def _silent(self, feature: int, shown: set, n: int) -> list[Context]:
        """n non-activating contexts outside the shown windows: half near misses, the rest random spans."""
        near = []
        for other in list(self.nearest.get(feature) or [])[:3]:
            for row in self.top.rows(int(other))[:4]:
                if row["shard"] in self.shard_index and f"{row['shard']}:{int(row['window_index'])}" not in shown:
                    near.append((self.shard_index[row["shard"]], int(row["window_index"]), int(row["position"])))
        near = list(dict.fromkeys(near))[: 2 * n]
        chosen: list[Context] = []
        windows = set(shown)
        if near:
            token_ids, span_rows = self._spans(near)
            acts = self._codes(near, span_rows)[:, :, feature]                        # [m, W]
            for context in self._make(near, token_ids, acts, "near"):
                if not context.activating and context.window not in windows and len(chosen) < n // 2:
                    chosen.append(context)
                    windows.add(context.window)
        centres, token_ids, span_max = self.pool()
        silent = (span_max[:, feature] <= self.threshold).nonzero().squeeze(1).tolist()
        gen = np.random.default_rng([self.options.seed, feature])
        picks = []
        for i in gen.permutation(silent).tolist() if silent else []:
            if len(chosen) + len(picks) >= n:
                break
            name = f"{self.store.shards[centres[i][0]].name}:{centres[i][1]}"
            if name not in windows:
                picks.append(i)
                windows.add(name)
        if picks:
            index = torch.tensor(picks)
            zeros = torch.zeros(len(picks), token_ids.shape[1])
            chosen += self._make([centres[i] for i in picks], token_ids[index], zeros, "random")
        return chosen


def _interleave(first: list, second: list) -> list:
    out = []
    for i in range(max(len(first), len(second))):
        out += first[i:i + 1] + second[i:i + 1]
    return out
