"""Live training: SAEs trained straight from the model's activations, no store on disk.

    sae train --model smollm2 --dataset bbc --layers 3,6,9 --site resid_post --variant topk --out RUN

One forward pass (stopped after the deepest listed layer) feeds one Trainer per layer; each writes
an ordinary run folder RUN/layer_L/. A producer thread runs the model and fills *generations*: a
generation is whole model batches of windows until it holds at least `generation_rows` training
rows, shuffled with a generator seeded by (seed, generation index). At most two generations exist
at once (one being trained on, one being filled), so memory is bounded by --buffer-size and the
model and the SAEs overlap. The batch stream is therefore a pure function of (seed, dataset
position): RUN/live_state.json records where each generation started (window number, step), and a
resumed run restarts the producer at the generation that holds its checkpoint's step and skips
the batches already trained on — the result equals an uninterrupted run (on the CPU).

Rows are excluded as in collection: special tokens (BOS, EOS, padding) unless kept, rows whose norm
exceeds --max-norm-ratio × the median norm (measured on the first model batch, recorded), and every
held-out document (sae.store.is_held_out): held-out windows are never fed to training.
"""
from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from sae.errors import UserError

STATE = "live_state.json"
DEFAULT_BUFFER = "256MB"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


# ---- parsing -------------------------------------------------------------------------------------
def parse_layers(text) -> list[int]:
    """'3,6,9' -> [3, 6, 9]; a layer listed twice is refused."""
    if isinstance(text, (list, tuple)):
        items = [str(x) for x in text]
    else:
        items = [part.strip() for part in str(text).split(",") if part.strip()]
    if not items:
        raise UserError("--layers needs at least one layer, e.g. --layers 6 or --layers 3,6,9")
    try:
        layers = [int(item) for item in items]
    except ValueError:
        raise UserError(f"--layers takes integers separated by commas, got {text!r}") from None
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise UserError(f"--layers lists layer {repeated[0]} more than once")
    return layers


def parse_buffer_bytes(text: str) -> int:
    """'256MB', '1.5GB', '65536' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?)i?B?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise UserError(f"--buffer-size takes a size such as 256MB or 2GB, got {text!r}")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise UserError(f"--buffer-size must be positive, got {text!r}")
    return size


def generation_rows_for(buffer_bytes: int, n_layers: int, d_model: int, batch_size: int) -> int:
    """Rows per generation: two generations of every layer's float32 rows fit in the buffer."""
    rows = buffer_bytes // (2 * n_layers * d_model * 4)
    if rows < batch_size:
        need = 2 * n_layers * d_model * 4 * batch_size
        raise UserError(f"--buffer-size {_human(buffer_bytes)} holds {rows} rows per half, fewer than one "
                        f"batch of {batch_size}: give at least {_human(need)} or a smaller --batch-size")
    return int(rows)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GB"


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


@dataclass
class Generation:
    index: int
    start_window: int               # windows (pack order, counting across epochs) before this generation
    end_window: int
    acts: dict                      # {layer: [n_batches * batch_size, d_model] float32, shuffled}
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


class _Stopped(Exception):
    """The consumer is done: the producer thread leaves mid-generation."""


class Producer:
    """Runs the model in a background thread and hands over shuffled generations, two at most alive."""

    def __init__(self, loaded, documents_factory, spec: LiveSpec, device, start_generation: int = 0,
                 start_window: int = 0, writer=None):
        self.loaded, self.spec, self.device = loaded, spec, torch.device(device)
        self.documents_factory = documents_factory
        self.start_generation, self.start_window = start_generation, start_window
        self.writer = writer                       # optional: receives every model batch (held-out too)
        self.queue: queue.Queue = queue.Queue()
        self.slots = threading.Semaphore(2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="sae-live-producer")
        self.waiting_seconds = 0.0                 # time spent blocked because the SAEs were behind
        self.model_tokens = 0
        self.model_seconds = 0.0

    # -- what one model batch yields ------------------------------------------------------------
    def forward(self, windows) -> dict:
        """{layer: [b, ctx, d] float32} for a list of Windows, the forward stopped after the deepest layer
        (inputs as in collection: no KV cache; an attention mask over padding for bidirectional models)."""
        from sae.data import PAD_DOC
        from sae.models import capture, run_until_captured
        hf = self.loaded.model
        inputs = {"input_ids": torch.stack([w.input_ids for w in windows]).to(self.device)}   # [b, ctx]
        if getattr(hf.config, "use_cache", None) is not None:
            inputs["use_cache"] = False
        padding = torch.stack([w.doc_ids for w in windows]) == PAD_DOC
        if bool(padding.any()) and not self.loaded.is_causal:
            inputs["attention_mask"] = (~padding).long().to(self.device)
        with torch.inference_mode(), capture(hf, self.spec.site, self.spec.layers, stop=True) as acts:
            run_until_captured(hf, **inputs)
        missing = [layer for layer in self.spec.layers if layer not in acts]
        if missing:
            raise UserError(f"site {self.spec.site} at layer {missing[0]} produced no activation")
        return {layer: acts[layer].float() for layer in self.spec.layers}

    def measure_norm_median(self) -> None:
        """The collection rule's median norm per layer: over the first MEDIAN_TOKENS kept training tokens."""
        from sae.collect import MEDIAN_TOKENS
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
            return {layer: acts[layer][:0].reshape(0, acts[layer].shape[-1]) for layer in spec.layers}
        ids = torch.stack([windows[i].input_ids for i in train])
        docs = torch.stack([windows[i].doc_ids for i in train])
        flat = {layer: acts[layer][train].reshape(-1, acts[layer].shape[-1]) for layer in spec.layers}
        keep = keep_rows(ids, docs, flat, self.loaded.special_ids, spec.keep_special, spec.max_norm_ratio,
                         spec.norm_median)
        from sae.store import is_held_out
        assert not bool(is_held_out(docs.reshape(-1)[keep]).any()), "a held-out document reached training"
        return {layer: rows[keep.to(rows.device)] for layer, rows in flat.items()}

    def _batches(self, start_window: int, held_out: bool | None = None):
        """("train" | "held_out", [(window number, Window)]) model batches. Training batches never depend
        on whether activations are saved: held-out windows form their own batches, for the writer only."""
        pending = {False: [], True: []}
        for number, window in window_stream(self.documents_factory, self.loaded, self.spec.context_size,
                                            start_window):
            if window.held_out and (self.writer is None if held_out is None else not held_out):
                continue
            pending[window.held_out].append((number, window))
            if len(pending[window.held_out]) == self.spec.model_batch:
                yield ("held_out" if window.held_out else "train"), pending[window.held_out]
                pending[window.held_out] = []

    def build(self, index: int, batches) -> Generation:
        """Consume model batches until the generation holds generation_rows rows; shuffle it."""
        spec = self.spec
        pieces = {layer: [] for layer in spec.layers}
        rows, tokens, seconds = 0, 0, 0.0
        start_window = end_window = None
        while rows < spec.generation_rows:
            if self.stop.is_set():
                raise _Stopped
            kind, numbered = next(batches)
            windows = [w for _, w in numbered]
            begin = time.perf_counter()
            acts = self.forward(windows)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
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
        return Generation(index, start_window, end_window, acts, n_batches, tokens, seconds)

    # -- the thread ------------------------------------------------------------------------------
    def _run(self):
        try:
            if self.spec.max_norm_ratio is not None and self.spec.norm_median is None:
                self.measure_norm_median()
            batches = self._batches(self.start_window)
            index = self.start_generation
            while not self.stop.is_set():
                begin = time.perf_counter()
                while not self.slots.acquire(timeout=0.1):
                    if self.stop.is_set():
                        return
                self.waiting_seconds += time.perf_counter() - begin
                generation = self.build(index, batches)
                self.model_tokens += generation.model_tokens
                self.model_seconds += generation.model_seconds
                self.queue.put(generation)
                index += 1
        except _Stopped:
            return
        except BaseException as error:  # noqa: BLE001 - surfaced in the consumer
            self.queue.put(error)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)

    def generations(self) -> Iterator[Generation]:
        """Each generation in order; the caller calls done() when it has finished with one."""
        while True:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def done(self) -> None:
        self.slots.release()


# ---- resume bookkeeping ----------------------------------------------------------------------
@dataclass
class LiveState:
    """RUN/live_state.json: where every generation began, and what the producer measured."""
    generations: list = field(default_factory=list)   # [{index, start_window, start_step}]
    norm_median: dict | None = None
    settings: dict = field(default_factory=dict)

    @classmethod
    def read(cls, run_dir) -> "LiveState | None":
        import json
        path = Path(run_dir) / STATE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(data.get("generations", []), data.get("norm_median"), data.get("settings", {}))

    def write(self, run_dir) -> None:
        from sae.store import write_json
        write_json(Path(run_dir) / STATE, {"generations": self.generations, "norm_median": self.norm_median,
                                           "settings": self.settings})

    def resume_point(self, step: int) -> tuple[int, int, int]:
        """(generation index, its start window, its start step) of the generation holding `step`."""
        best = (0, 0, 0)
        for entry in self.generations:
            if entry["start_step"] <= step:
                best = (entry["index"], entry["start_window"], entry["start_step"])
        return best

    def truncate(self, index: int) -> None:
        self.generations = [g for g in self.generations if g["index"] < index]


# ---- --save-activations: the produced rows as an ordinary store ---------------------------------
class StoreWriter:
    """Writes every model batch (training and held-out windows) as store shards on the way.

    Rows follow the collection rule (padding and, unless kept, special tokens dropped; --max-norm-ratio
    applied); held-out documents are kept, as in any store. Resumable: the manifest records the last
    window number written per split, and a resumed run skips windows already written."""

    def __init__(self, path, loaded, spec: LiveSpec, dataset: str, label_names, resume: bool,
                 shard_rows: int = 65536, dtype=torch.float32):
        from sae.store import HELD_OUT_MODULUS, HELD_OUT_RULE, MANIFEST
        import json
        self.path = Path(path)
        self.shard_rows, self.dtype = shard_rows, dtype
        self.layers = list(spec.layers)
        existing = self.path / MANIFEST
        if existing.is_file() and resume:
            self.manifest = json.loads(existing.read_text())
            if self.manifest.get("layers") != self.layers or self.manifest.get("site") != spec.site:
                raise UserError(f"--save-activations {self.path} holds other layers or another site: "
                                f"give a new folder")
        elif self.path.exists() and any(self.path.iterdir()):
            raise UserError(f"--save-activations {self.path} is not empty: refusing to overwrite it "
                            f"(give a new folder, or --resume to continue it)")
        else:
            self.manifest = {
                "format": "sae-activation-store/1", "model": loaded.name, "layers": self.layers,
                "site": spec.site, "d_model": loaded.d_model, "n_tokens": 0, "context_size": spec.context_size,
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
        from sae.collect import batch_rows
        done = self.manifest["live_windows_done"][kind]
        fresh = [i for i, n in enumerate(numbers) if n >= done]
        if not fresh:
            return
        special = torch.tensor(sorted(self.special_ids), dtype=torch.int64)
        rows = batch_rows([windows[i] for i in fresh], {layer: acts[layer][fresh] for layer in self.layers},
                          self.layers, special, spec.keep_special, self.dtype, numbers[-1] + 1)
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
        from sae.collect import _shard_tensors
        from sae.store import MANIFEST, shard_name, write_json, write_shard
        if self._pending_rows:
            tensors = _shard_tensors(self._pending, self.layers, self.has_labels)
            name = shard_name(len(self.manifest["shards"]))
            write_shard(self.path / name, tensors)
            self.manifest["shards"].append(name)
            self.manifest["shard_rows"].append(len(tensors["doc_id"]))
            self.manifest["n_tokens"] += len(tensors["doc_id"])
        write_json(self.path / MANIFEST, self.manifest)
        self._pending, self._pending_rows = [], 0

    def finish(self) -> None:
        self.flush()
        from sae.store import MANIFEST, write_json
        self.manifest["complete"] = True
        write_json(self.path / MANIFEST, self.manifest)


# ---- the consumer: one Trainer per layer -----------------------------------------------------
def train_live(loaded, documents_factory, *, layers, site: str, variant: str, out, options,
               knobs: dict | None = None, d_sae: int | None = None, expansion: float = 8.0,
               context_size: int = 128, model_batch: int = 8, buffer_size: str | int = DEFAULT_BUFFER,
               max_norm_ratio: float | None = None, keep_special: bool = False, dataset: str = "",
               label_names=None, save_activations=None, resume: bool = False, force: bool = False,
               max_steps: int | None = None, progress: bool | None = None) -> dict:
    """Train one SAE per layer on `loaded`'s activations; returns {layer: last metrics}.

    options: a sae.train.TrainOptions (tokens, batch_size, seed, device, ...). max_steps stops early as
    an interruption would (checkpoints saved; a later resume continues)."""
    import shutil
    from tqdm import tqdm
    from sae import checkpoint, distributed, variants
    from sae.devices import resolve
    from sae.train import StopFlag, Trainer
    if distributed.launched_by_torchrun():
        raise UserError("live training runs in one process: use `sae collect` under torchrun, then train on the store")
    layers = parse_layers(layers)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise UserError(f"{out} is not empty: pass --resume to continue it or --force to overwrite it")
    if force and not resume and out.exists():
        shutil.rmtree(out)
    device = resolve(options.device)
    loaded.model.to(device)
    from sae.models import site_point
    for layer in layers:
        site_point(loaded, site, layer)  # unknown site or layer out of range: a UserError here
    buffer_bytes = buffer_size if isinstance(buffer_size, int) else parse_buffer_bytes(buffer_size)
    spec = LiveSpec(site=site, layers=layers, batch_size=options.batch_size, seed=options.seed,
                    generation_rows=generation_rows_for(buffer_bytes, len(layers), loaded.d_model, options.batch_size),
                    context_size=context_size, model_batch=model_batch, max_norm_ratio=max_norm_ratio,
                    keep_special=keep_special)
    settings = {"model": loaded.name, "dataset": dataset, "layers": layers, "site": site, "variant": variant,
                "context_size": context_size, "model_batch": model_batch, "generation_rows": spec.generation_rows,
                "batch_size": options.batch_size, "seed": options.seed, "max_norm_ratio": max_norm_ratio,
                "keep_special": keep_special}
    state = LiveState.read(out) if resume else None
    if state is not None:
        differing = [k for k in settings if state.settings.get(k) != settings[k]]
        if differing:
            k = differing[0]
            raise UserError(f"--resume: {out} was started with {k}={state.settings.get(k)!r}, not {settings[k]!r}")
        spec.norm_median = state.norm_median
    state = state or LiveState(settings=settings)
    out.mkdir(parents=True, exist_ok=True)

    trainers = {}
    torch.manual_seed(options.seed)  # the initial weights are a function of the seed
    for layer in layers:
        model = variants.create(variant, loaded.d_model, d_sae, expansion=expansion, **(knobs or {}))
        run_dir = out / f"layer_{layer}"
        run_dir.mkdir(parents=True, exist_ok=True)
        extra = {"layer": layer, "site": site, "model": loaded.name, "dataset": dataset, "store": None,
                 "store_digest": None, "context_size": context_size, "live": True}
        trainer = Trainer(model, options, run_dir, config_extra=extra, device=device)
        latest = checkpoint.latest(run_dir) if resume else None
        if latest is not None:
            trainer.resume_from(latest)
        trainers[layer] = trainer
    total = trainers[layers[0]].total_steps
    step = min(t.step_count for t in trainers.values())
    if step >= total:
        return {layer: t.finish() for layer, t in trainers.items()}
    gen_index, start_window, gen_step = state.resume_point(step)
    state.truncate(gen_index)
    writer = StoreWriter(save_activations, loaded, spec, dataset, label_names, resume) if save_activations else None
    stop_at = total if max_steps is None else min(total, max_steps)
    bar = tqdm(total=total, initial=step, unit="step", desc=f"live {variant} layers {','.join(map(str, layers))}",
               disable=None if progress is None else not progress, dynamic_ncols=True)
    sae_seconds, consumer_wait, last_postfix, first_step = 0.0, 0.0, 0.0, step
    with StopFlag() as stop_flag, Producer(loaded, documents_factory, spec, device, gen_index, start_window,
                                           writer) as producer:
        generations = producer.generations()
        while step < stop_at and not stop_flag.requested:
            begin = time.perf_counter()
            generation = next(generations)
            consumer_wait += time.perf_counter() - begin
            state.generations.append({"index": generation.index, "start_window": generation.start_window,
                                      "start_step": gen_step})
            state.norm_median = spec.norm_median
            state.write(out)
            if generation.index == 0:
                for layer, trainer in trainers.items():
                    if trainer.step_count == 0:
                        trainer.init_from_sample(generation.acts[layer][:options.init_rows])
            for j in range(max(0, step - gen_step), generation.n_batches):
                if step >= stop_at or stop_flag.requested:
                    break
                begin = time.perf_counter()
                for layer, trainer in trainers.items():
                    if trainer.step_count == step:
                        trainer.step(generation.acts[layer][j * spec.batch_size:(j + 1) * spec.batch_size])
                        if options.checkpoint_every and trainer.step_count % options.checkpoint_every == 0 \
                                and trainer.step_count < total:
                            trainer.save_checkpoint()
                sae_seconds += time.perf_counter() - begin
                step += 1
                bar.update(1)
                if time.perf_counter() - last_postfix > 0.5 or step == stop_at:
                    last_postfix = time.perf_counter()
                    waiting = "model" if consumer_wait > producer.waiting_seconds else "SAEs"
                    bar.set_postfix_str(f"model {producer.model_tokens / max(producer.model_seconds, 1e-9):,.0f} tok/s, "
                                        f"SAE {(step - first_step) / max(sae_seconds, 1e-9):.1f} step/s, "
                                        f"waiting on {waiting}", refresh=False)
            gen_step += generation.n_batches
            del generation
            producer.done()
    bar.close()
    if writer is not None:
        (writer.finish if step >= total else writer.flush)()
    if step >= total:
        return {layer: trainer.finish() for layer, trainer in trainers.items()}
    for trainer in trainers.values():  # interrupted (Ctrl-C or max_steps): a checkpoint to resume from
        trainer.save_checkpoint()
    return {layer: trainer.last_metrics for layer, trainer in trainers.items()}


# ---- the command line (`sae train --model ...`; sae/commands/train.py dispatches here) ----------
def add_live_arguments(parser) -> None:
    """Options of live training that `sae train` does not already define (parser may be a group)."""
    known = set(getattr(parser, "_option_string_actions", {}))
    options = [
        ("--model", dict(default=None, help="model to run (HF id, folder, or smollm2)")),
        ("--dataset", dict(default=None, help="dataset (HF id, file, folder, or bbc; default bbc)")),
        ("--layers", dict(default=None, help="comma-separated layers, one SAE each, e.g. 3,6,9")),
        ("--site", dict(default=None, help="site (resid_post, attn_out, mlp_out, ...; default resid_post)")),
        ("--context-size", dict(type=int, default=None, help="tokens per context window (default 128)")),
        ("--buffer-size", dict(default=DEFAULT_BUFFER, help=f"shuffle buffer in memory (default {DEFAULT_BUFFER})")),
        ("--model-batch", dict(type=int, default=8, help="context windows per forward pass (default 8)")),
        ("--save-activations", dict(default=None, metavar="STORE", help="also write the activations as a store")),
        ("--max-norm-ratio", dict(type=float, default=None, help="drop tokens whose norm exceeds R x the median")),
        ("--keep-special", dict(action="store_true", help="also train on BOS/EOS positions")),
        ("--text-column", dict(default=None, help="the dataset's text column (default: text)")),
        ("--split", dict(default=None, help="dataset split for hub datasets (default: train)")),
    ]
    for flag, kwargs in options:  # an argument group shares its parser's table of options
        if flag not in known:
            parser.add_argument(flag, **kwargs)


def run_from_args(args, options, knobs: dict) -> int:
    """`sae train --model M --dataset D --layers L[,L2] --site S --variant V --out RUN`."""
    from sae.data import load_documents
    from sae.devices import resolve
    from sae.models import load_model
    if not getattr(args, "layers", None):
        raise UserError("live training needs --layers (e.g. --layers 6 or --layers 3,6,9)")
    layers = parse_layers(args.layers)
    if getattr(args, "layer", None) is not None:
        raise UserError("live training takes --layers, not --layer")
    if args.resume and args.force:
        raise UserError("--resume and --force contradict each other: pick one")
    context_size = args.context_size or 128
    if context_size < 2:
        raise UserError(f"--context-size must be at least 2, got {context_size}")
    max_norm_ratio = getattr(args, "max_norm_ratio", None)
    if max_norm_ratio is not None and max_norm_ratio <= 0:
        raise UserError(f"--max-norm-ratio must be positive, got {max_norm_ratio}")
    model_batch = getattr(args, "model_batch", None) or 8
    if model_batch <= 0:
        raise UserError(f"--model-batch-size must be positive, got {model_batch}")
    dataset = args.dataset or "bbc"
    text_column, split = getattr(args, "text_column", None), getattr(args, "split", None)
    _, label_names = load_documents(dataset, text_column, split)  # bad dataset: refused before the model loads
    loaded = load_model(args.model, device=resolve(options.device))
    metrics = train_live(
        loaded, lambda: load_documents(dataset, text_column, split)[0], layers=layers,
        site=args.site or "resid_post", variant=args.variant, out=args.out, options=options, knobs=knobs,
        d_sae=args.d_sae, expansion=args.expansion or 8.0, context_size=context_size, model_batch=model_batch,
        buffer_size=getattr(args, "buffer_size", None) or DEFAULT_BUFFER, max_norm_ratio=max_norm_ratio,
        keep_special=bool(getattr(args, "keep_special", False)), dataset=dataset, label_names=label_names,
        save_activations=getattr(args, "save_activations", None), resume=args.resume, force=args.force)
    for layer, last in metrics.items():
        figures = ", ".join(f"{k} {last[k]:.4g}" for k in ("fvu", "l0") if last.get(k) is not None)
        print(f"{Path(args.out) / f'layer_{layer}'}: step {last.get('step')}" + (f", {figures}" if figures else ""))
    return 0


def run_live(args) -> int:
    """Entry point with only the parsed arguments (options and knobs built as `sae train` builds them)."""
    from sae.commands.train import given_knobs, options_from_args
    return run_from_args(args, options_from_args(args), given_knobs(args, args.variant))
