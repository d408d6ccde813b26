"""The producer side of live training (sae.live): the model run in a background thread, its activations
filtered by the collection rule and gathered into shuffled *generations*; and --save-activations' store writer.

A generation is whole model batches of training windows until it holds at least `generation_rows` rows,
shuffled with a generator seeded by (seed, generation index): the batch stream is a pure function of
(seed, dataset position), which is what makes a resumed live run equal an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from sae.errors import UserError
from sae.files import read_json


# ---- the producer: model -> generations ------------------------------------------------------
@dataclass
class LiveSpec:
    site: str
    layers: list[int]
    batch_size: int                 # SAE rows per step
    generation_rows: int            # rows gathered before a generation is shuffled and handed over
    seed: int = 0
    context_size: int = 128
    model_batch: int = 8            # windows per forward pass
    max_norm_ratio: float | None = None
    keep_special: bool = False
    norm_median: dict | None = None  # {layer: float}; measured on the first model batch when None
    d_site: int | None = None       # the rows' width (d_model, or n_heads·d_head for attn_z)
    target_site: str | None = None  # transcoders: a second site taken in the same pass (rows "targets.<layer>")

    @property
    def row_keys(self) -> list:
        """The keys of a generation's rows: each layer, and with a target site each "targets.<layer>"."""
        return list(self.layers) + ([f"targets.{layer}" for layer in self.layers] if self.target_site else [])


@dataclass
class Generation:
    index: int
    start_window: int               # windows (pack order, counting across epochs) before this generation
    end_window: int
    acts: dict                      # {row key: [n_batches * batch_size, d_model] float32, shuffled}
    n_batches: int
    model_tokens: int = 0
    model_seconds: float = 0.0


def window_stream(documents_factory, loaded, context_size: int, start: int = 0) -> Iterator[tuple[int, object]]:
    """(window number, sae.data.Window), cycling through the dataset, from window number `start`.

    documents_factory() returns a fresh iterator of Documents in the dataset's fixed order."""
    from sae.data import pack_windows
    number = 0
    while True:
        produced = False
        for window in pack_windows(documents_factory(), loaded.tokenizer, context_size, loaded.bos_id,
                                   loaded.eos_id, loaded.pad_id):
            produced = True
            if number >= start:
                yield number, window
            number += 1
        if not produced:
            raise UserError("the dataset holds no text to train on")


def keep_rows(input_ids, doc_ids, acts: dict, special_ids, keep_special: bool,
              max_norm_ratio: float | None, norm_median: dict | None) -> torch.Tensor:
    """[rows] bool over flattened positions: not padding, not special (unless kept), norm within
    max_norm_ratio × median in every layer (the collection rule)."""
    from sae.data import PAD_DOC
    keep = doc_ids.reshape(-1) != PAD_DOC
    if not keep_special and special_ids:
        special = torch.tensor(sorted(special_ids), dtype=input_ids.dtype, device=input_ids.device)
        keep &= ~torch.isin(input_ids.reshape(-1), special)
    if max_norm_ratio is not None and norm_median:
        for layer, rows in acts.items():
            limit = max_norm_ratio * float(norm_median[str(layer)])
            keep &= rows.norm(dim=1).to(keep.device) <= limit
    return keep


@contextlib.contextmanager
def _nothing():
    yield


class _Stopped(Exception):
    """The consumer is done: the producer thread leaves mid-generation."""


class Producer:
    """Runs the model and hands over shuffled generations: on a GPU from a background thread, two at most
    alive; on the CPU in the caller's thread, one at a time."""
    THREADED: bool | None = None                   # None: by device (tests set True to run the thread on a CPU)

    def __init__(self, loaded, documents_factory, spec: LiveSpec, device, start_generation: int = 0,
                 start_window: int = 0, writer=None, steps_needed: int | None = None):
        self.loaded, self.spec, self.device = loaded, spec, torch.device(device)
        self.documents_factory = documents_factory
        self.start_generation, self.start_window = start_generation, start_window
        self.writer = writer                       # optional: receives every window the model runs on
        self.steps_needed = steps_needed           # stop once the generations made hold this many batches
        self.queue: queue.Queue = queue.Queue()
        self.slots = threading.Semaphore(1)
        self.stop = threading.Event()
        # On a GPU the model runs in a background thread on its own CUDA stream, overlapping the SAEs. On the
        # CPU the two share the same cores, so they take turns, and in one thread: the model makes a generation,
        # the SAEs train on it, and so on. (A producer thread taking turns through a lock ran the model 11%
        # slower than alone: each thread drives its own OpenMP pool, and the idle pool's spinning workers
        # take cycles from the busy one.)
        self.threaded = self.device.type != "cpu" if Producer.THREADED is None else Producer.THREADED
        self.thread = threading.Thread(target=self._run, daemon=True, name="sae-live-producer")
        self.waiting_seconds = 0.0                 # time spent blocked because the SAEs were behind
        self.model_tokens = 0
        self.model_seconds = 0.0

    # -- what one model batch yields ------------------------------------------------------------
    def forward(self, windows) -> dict:
        """{layer: [b, ctx, d] float32} for a list of Windows, the forward stopped after the deepest layer
        (inputs as in collection: no KV cache; an attention mask over padding for bidirectional models)."""
        from sae.collect.targets import capture_sites, check_complete
        from sae.data import PAD_DOC
        from sae.lm import run_until_captured
        hf = self.loaded.model
        inputs = {"input_ids": torch.stack([w.input_ids for w in windows]).to(self.device)}   # [b, ctx]
        if getattr(hf.config, "use_cache", None) is not None:
            inputs["use_cache"] = False
        padding = torch.stack([w.doc_ids for w in windows]) == PAD_DOC
        if bool(padding.any()) and not self.loaded.is_causal:
            inputs["attention_mask"] = (~padding).long().to(self.device)
        spec = self.spec
        with torch.inference_mode(), capture_sites(hf, spec.site, spec.target_site, spec.layers) as (acts, targets):
            run_until_captured(hf, **inputs)
        check_complete(acts, spec.layers, spec.site, spec.target_site)
        missing = [layer for layer in spec.layers if layer not in acts]
        if missing:
            raise UserError(f"site {spec.site} at layer {missing[0]} produced no activation")
        return {layer: acts[layer].float() for layer in spec.layers} | \
            {f"targets.{layer}": targets[layer].float() for layer in (spec.layers if targets is not None else [])}

    def measure_norm_median(self) -> None:
        """The collection rule's median norm per layer: over the first MEDIAN_TOKENS kept training tokens."""
        from sae.collect.loop import MEDIAN_TOKENS
        spec = self.spec
        norms, count = {layer: [] for layer in spec.layers}, 0
        for kind, numbered in self._batches(0, held_out=False):
            windows = [w for _, w in numbered]
            acts = self.forward(windows)
            ids, docs = torch.stack([w.input_ids for w in windows]), torch.stack([w.doc_ids for w in windows])
            flat = {layer: acts[layer].reshape(-1, acts[layer].shape[-1]) for layer in spec.layers}
            keep = keep_rows(ids, docs, flat, self.loaded.special_ids, spec.keep_special, None, None)
            for layer in spec.layers:
                norms[layer].append(flat[layer][keep.to(flat[layer].device)].norm(dim=1).cpu())
            count += int(keep.sum())
            if count >= MEDIAN_TOKENS:
                break
        spec.norm_median = {str(layer): float(torch.cat(norms[layer])[:MEDIAN_TOKENS].median())
                            for layer in spec.layers}

    def _train_rows(self, windows, acts) -> dict:
        """{layer: [kept, d]} rows of the training windows of one model batch."""
        spec = self.spec
        train = [i for i, w in enumerate(windows) if not w.held_out]
        if not train:
            return {key: acts[key][:0].reshape(0, acts[key].shape[-1]) for key in spec.row_keys}
        ids = torch.stack([windows[i].input_ids for i in train])
        docs = torch.stack([windows[i].doc_ids for i in train])
        flat = {key: acts[key][train].reshape(-1, acts[key].shape[-1]) for key in spec.row_keys}
        keep = keep_rows(ids, docs, {layer: flat[layer] for layer in spec.layers}, self.loaded.special_ids,
                         spec.keep_special, spec.max_norm_ratio, spec.norm_median)
        from sae.store import is_held_out
        assert not bool(is_held_out(docs.reshape(-1)[keep]).any()), "a held-out document reached training"
        return {layer: rows[keep.to(rows.device)] for layer, rows in flat.items()}

    def _batches(self, start_window: int, held_out: bool | None = None):
        """("train" | "held_out", [(window number, Window)]) model batches. Training batches never depend
        on whether activations are saved: held-out windows form their own batches, for the writer only."""
        pending = {False: [], True: []}
        trained_this_pass = False
        for number, window in window_stream(self.documents_factory, self.loaded, self.spec.context_size,
                                            start_window):
            if window.index == 0 and number > 0:       # the dataset starts over
                if not trained_this_pass:
                    raise UserError("the dataset has no training documents: every document is held out "
                                    "(about 1 in 20 is, by doc_id); give more documents")
                trained_this_pass = False
            trained_this_pass |= not window.held_out
            if window.held_out and (self.writer is None if held_out is None else not held_out):
                continue
            pending[window.held_out].append((number, window))
            if len(pending[window.held_out]) == self.spec.model_batch:
                yield ("held_out" if window.held_out else "train"), pending[window.held_out]
                pending[window.held_out] = []

    def _enough_windows(self, numbered, rows_needed: int):
        """The leading windows of a model batch that bring the generation to rows_needed rows, by the
        collection rule's count of each window's kept tokens (special tokens and padding dropped): the
        model never runs on windows whose rows would be left over (up to a whole SAE batch a generation,
        5% of the model's time in a 262k-token run). The windows left out of the batch are skipped: neither
        trained on nor, with --save-activations, stored (a few windows a generation; a resumed run skips the
        same ones). With --max-norm-ratio a window may keep fewer rows than counted; the generation then
        takes another batch."""
        ids = torch.stack([w.input_ids for _, w in numbered])                        # [b, ctx]
        docs = torch.stack([w.doc_ids for _, w in numbered])
        keep = keep_rows(ids, docs, {}, self.loaded.special_ids, self.spec.keep_special, None, None)
        per_window = keep.view(len(numbered), -1).sum(dim=1).cumsum(0)               # [b] rows so far
        enough = int(torch.searchsorted(per_window, torch.tensor(rows_needed))) + 1  # windows to reach it
        return numbered[:enough]

    def build(self, index: int, batches, max_rows: int | None = None) -> Generation:
        """Consume model batches until the generation holds generation_rows rows (or max_rows, when fewer
        are left to train on); shuffle it."""
        spec = self.spec
        pieces = {key: [] for key in spec.row_keys}
        rows, tokens, seconds = 0, 0, 0.0
        start_window = end_window = None
        target = spec.generation_rows if max_rows is None else min(spec.generation_rows, max_rows)
        target = max(spec.batch_size, target // spec.batch_size * spec.batch_size)   # whole SAE batches
        while rows < target:
            if self.stop.is_set():
                raise _Stopped
            kind, numbered = next(batches)
            if kind == "train":   # (with --save-activations too: training never depends on it)
                numbered = self._enough_windows(numbered, target - rows)
            windows = [w for _, w in numbered]
            begin = time.perf_counter()
            acts = self.forward(windows)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            seconds += time.perf_counter() - begin
            tokens += sum(len(w.input_ids) for w in windows)
            if kind == "held_out":
                self.writer.add(kind, [n for n, _ in numbered], windows, acts, self.spec)
                continue
            if start_window is None:
                start_window = numbered[0][0]
            end_window = numbered[-1][0] + 1
            if self.writer is not None:
                self.writer.add(kind, [n for n, _ in numbered], windows, acts, self.spec)
            for layer, kept in self._train_rows(windows, acts).items():
                pieces[layer].append(kept)
            rows += len(pieces[spec.layers[0]][-1])
        n_batches = rows // spec.batch_size
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + 7919 * index + 1)
        order = torch.randperm(rows, generator=generator)[:n_batches * spec.batch_size]
        order = order.to(self.device)
        acts = {layer: torch.cat(parts)[order] for layer, parts in pieces.items()}
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return Generation(index, start_window, end_window, acts, n_batches, tokens, seconds)

    # -- the thread ------------------------------------------------------------------------------
    def _run(self):
        # on a GPU the model runs on its own CUDA stream, so that its kernels overlap the SAEs'
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else _nothing():
            self._produce()

    def _stream(self) -> Iterator[Generation]:
        """The generations in order, each made in the calling thread when the next is asked for."""
        if self.spec.max_norm_ratio is not None and self.spec.norm_median is None:
            self.measure_norm_median()
        batches = self._batches(self.start_window)
        index = self.start_generation
        steps_made = 0
        # no generation past the last one the SAEs will use: on the CPU its model time would be lost
        while not self.stop.is_set() and (self.steps_needed is None or steps_made < self.steps_needed):
            # the last generation holds only the rows the remaining steps use: with a run of a few
            # generations a full last one would spend a third of the model's time on unused rows
            left = None if self.steps_needed is None else (self.steps_needed - steps_made) * self.spec.batch_size
            generation = self.build(index, batches, left)
            self.model_tokens += generation.model_tokens
            self.model_seconds += generation.model_seconds
            yield generation
            steps_made += generation.n_batches
            index += 1
            del generation                         # not alive while the next one is made

    def _produce(self):
        try:
            for generation in self._stream():
                self.queue.put(generation)
                del generation
                begin = time.perf_counter()
                while not self.slots.acquire(timeout=0.1):     # two generations alive at most
                    if self.stop.is_set():
                        return
                self.waiting_seconds += time.perf_counter() - begin
        except _Stopped:
            return
        except BaseException as error:  # noqa: BLE001 - surfaced in the consumer
            self.queue.put(error)

    def __enter__(self):
        if self.threaded:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.threaded:
            self.thread.join(timeout=30)

    def generations(self) -> Iterator[Generation]:
        """Each generation in order; the caller calls done() when it has finished with one."""
        if not self.threaded:
            yield from self._stream()
            return
        while True:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def done(self) -> None:
        self.slots.release()


# ---- --save-activations: the produced rows as an ordinary store ---------------------------------
class StoreWriter:
    """Writes every window the model runs on (training and held-out) as store shards on the way.

    Rows follow the collection rule (padding and, unless kept, special tokens dropped; --max-norm-ratio
    applied); held-out documents are kept, as in any store. Resumable: the manifest records the last
    window number written per split, and a resumed run skips windows already written."""

    def __init__(self, path, loaded, spec: LiveSpec, dataset: str, label_names, resume: bool,
                 shard_rows: int = 65536, dtype=torch.float32):
        from sae.store import FORMAT, HELD_OUT_MODULUS, HELD_OUT_RULE, MANIFEST
        self.path = Path(path)
        self.shard_rows, self.dtype = shard_rows, dtype
        self.layers = list(spec.layers)
        existing = self.path / MANIFEST
        if existing.is_file() and resume:
            self.manifest = read_json(existing, "--save-activations' manifest")
            if self.manifest.get("layers") != self.layers or self.manifest.get("site") != spec.site:
                raise UserError(f"--save-activations {self.path} holds other layers or another site: "
                                f"give a new folder")
        elif self.path.exists() and any(self.path.iterdir()):
            raise UserError(f"--save-activations {self.path} is not empty: refusing to overwrite it "
                            f"(give a new folder, or --resume to continue it)")
        else:
            self.manifest = {
                "format": FORMAT, "model": loaded.name, "layers": self.layers,
                "site": spec.site, "target_site": spec.target_site, "d_model": spec.d_site or loaded.d_model,
                "n_tokens": 0,
                "context_size": spec.context_size,
                "dataset": dataset, "dtype": str(dtype).replace("torch.", ""), "shards": [], "shard_rows": [],
                "held_out": {"rule": HELD_OUT_RULE, "modulus": HELD_OUT_MODULUS},
                "special_tokens_kept": spec.keep_special, "max_norm_ratio": spec.max_norm_ratio,
                "norm_median": None, "label_names": label_names, "complete": False, "source": "sae train (live)",
                "live_windows_done": {"train": 0, "held_out": 0},
            }
        self.path.mkdir(parents=True, exist_ok=True)
        self.special_ids, self.has_labels = loaded.special_ids, label_names is not None
        self._pending: list[dict] = []
        self._pending_rows = 0

    def add(self, kind: str, numbers: list[int], windows, acts: dict, spec: LiveSpec) -> None:
        from sae.collect.rows import batch_rows
        done = self.manifest["live_windows_done"][kind]
        fresh = [i for i, n in enumerate(numbers) if n >= done]
        if not fresh:
            return
        special = torch.tensor(sorted(self.special_ids), dtype=torch.int64)
        targets = {layer: acts[f"targets.{layer}"][fresh] for layer in self.layers} if spec.target_site else None
        rows = batch_rows([windows[i] for i in fresh], {layer: acts[layer][fresh] for layer in self.layers},
                          self.layers, special, spec.keep_special, self.dtype, numbers[-1] + 1, targets)
        if spec.max_norm_ratio is not None:
            limit = torch.tensor([spec.norm_median[str(layer)] for layer in self.layers]) * spec.max_norm_ratio
            rows = rows.select((rows.norms <= limit).all(dim=1))
        self._pending.append(rows)
        self._pending_rows += len(rows)
        self.manifest["live_windows_done"][kind] = max(done, numbers[-1] + 1)
        self.manifest["norm_median"] = spec.norm_median
        if self._pending_rows >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        from sae.collect.rows import shard_tensors
        from sae.store import MANIFEST, shard_name, write_shard
        from sae.files import write_json
        if self._pending_rows:
            tensors = shard_tensors(self._pending, self.layers, self.has_labels)
            name = shard_name(len(self.manifest["shards"]))
            write_shard(self.path / name, tensors)
            from sae.store import index as store_index
            if not self.manifest["shards"] or (self.path / store_index.INDEX).is_file():   # an older store has none
                store_index.append(self.path, store_index.shard_meta(name, tensors, self.layers, self.path / name))
            self.manifest["shards"].append(name)
            self.manifest["shard_rows"].append(len(tensors["doc_id"]))
            self.manifest["n_tokens"] += len(tensors["doc_id"])
        write_json(self.path / MANIFEST, self.manifest)
        self._pending, self._pending_rows = [], 0

    def finish(self) -> None:
        self.flush()
        from sae.store import MANIFEST
        from sae.files import write_json
        self.manifest["complete"] = True
        write_json(self.path / MANIFEST, self.manifest)
