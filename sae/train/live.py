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
exceeds --max-norm-ratio × the median norm (over the first 8,192 kept training tokens, recorded), and
every held-out document (sae.store.is_held_out): held-out windows are never fed to training. At the end
each SAE is scored on held-out tokens (RUN/layer_L/train_summary.json). The producer and the
--save-activations writer live in sae/train/producer.py.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae.errors import UserError
from sae.files import FolderLock, human_bytes, read_json
from sae.lm.source import SourceOptions
from sae.train.schedule import CheckpointClock
from sae.train.producer import LiveSpec, Producer, StoreWriter, keep_rows

STATE = "live_state.json"
DEFAULT_BUFFER = "256MB"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


# ---- options ---------------------------------------------------------------------------------
@dataclass(kw_only=True)
class LiveOptions(SourceOptions):
    """Where live training's activations come from (SourceOptions, as `sae collect` takes them: one SAE per
    layer) and how they are buffered. Bad values are refused in one line when the options are made."""
    model_batch: int = 8                  # windows per forward pass
    buffer_size: str | int = DEFAULT_BUFFER   # memory for the shuffled activations ('256MB' or bytes)
    save_activations: str | None = None   # also write the activations seen to this store

    def __post_init__(self):
        super().__post_init__()
        if self.model_batch <= 0:
            raise UserError(f"--model-batch must be positive, got {self.model_batch}")
        self.buffer_bytes = self.buffer_size if isinstance(self.buffer_size, int) else \
            parse_buffer_bytes(self.buffer_size)
        if self.buffer_bytes <= 0:
            raise UserError(f"--buffer-size must be positive, got {self.buffer_size!r}")


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
        raise UserError(f"--buffer-size {human_bytes(buffer_bytes)} holds {rows} rows per half, fewer than one "
                        f"batch of {batch_size}: give at least {human_bytes(need)} or a smaller --batch-size")
    return int(rows)


# ---- resume bookkeeping ----------------------------------------------------------------------
@dataclass
class LiveState:
    """RUN/live_state.json: where every generation began, and what the producer measured."""
    generations: list = field(default_factory=list)   # [{index, start_window, start_step}]
    norm_median: dict | None = None
    settings: dict = field(default_factory=dict)

    @classmethod
    def read(cls, run_dir) -> "LiveState | None":
        data = read_json(Path(run_dir) / STATE, "the live-training state", missing_ok=True)
        if data is None:
            return None
        return cls(data.get("generations", []), data.get("norm_median"), data.get("settings", {}))

    def write(self, run_dir) -> None:
        from sae.files import write_json
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


# ---- the consumer: one Trainer per layer -----------------------------------------------------
def train_live(loaded, documents_factory, source: LiveOptions, *, variant: str, out, options,
               knobs: dict | None = None, d_sae: int | None = None, expansion: float | None = None,
               label_names=None, resume: bool = False, force: bool = False, max_steps: int | None = None,
               progress: bool | None = None, transcoder: bool = False, skip: bool = False) -> dict:
    """Train one SAE per layer on `loaded`'s activations; returns {layer: last metrics}.

    source: the model's side (LiveOptions); options: a sae.train.TrainOptions (tokens, batch_size, seed,
    device, ...). max_steps stops early as an interruption would (checkpoints saved; a later resume continues).
    transcoder=True: one transcoder per layer, source.site -> source.target_site (skip: skip transcoders).
    The output folder is locked while it is written: a second writer is refused in one line."""
    with FolderLock(out, "sae train --model"):
        return _train_live(loaded, documents_factory, source, variant, out, options, knobs, d_sae, expansion,
                           label_names, resume, force, max_steps, progress, transcoder, skip)


def _train_live(loaded, documents_factory, source: LiveOptions, variant: str, out, options, knobs, d_sae,
                expansion, label_names, resume: bool, force: bool, max_steps, progress, transcoder=False,
                skip=False) -> dict:
    from sae.progress import progress_bar as tqdm   # a bar in a terminal, a line every 30 s in a log
    from sae import distributed, variants
    from sae.train import checkpoint
    from sae.devices import resolve
    from sae.distributed import StopFlag
    from sae.train import transcoding
    from sae.train.trainer import Trainer
    target_site = transcoding.check_live(source.target_site, transcoder, skip)
    if distributed.launched_by_torchrun():
        raise UserError("live training runs in one process: use `sae collect` under torchrun, then train on the store")
    if resume and force:
        raise UserError("--resume and --force contradict each other: pick one")
    layers, site, dataset = source.layers, source.site, source.dataset
    context_size, model_batch, max_norm_ratio = source.context_size, source.model_batch, source.max_norm_ratio
    keep_special, save_activations = source.keep_special_tokens, source.save_activations
    out = Path(out)
    checkpoint.prepare_live_dir(out, resume, force, STATE)
    device = resolve(options.device)
    loaded.model.to(device)
    from sae.lm import site_point
    for layer in layers:
        site_point(loaded, site, layer)  # unknown site or layer out of range: a UserError here
    from sae.lm import check_context_size, site_width
    check_context_size(loaded, context_size)
    d_site = site_width(loaded, site, layers)   # the SAEs' d_in: d_model, or n_heads·d_head for attn_z
    from sae.collect.targets import check_target_site
    check_target_site(loaded, site, target_site, layers)
    buffer_bytes = source.buffer_bytes
    from sae.lm.loading import loaded_dtype
    model_dtype = loaded_dtype(loaded)      # activations reach the SAEs as float32 whatever the model's dtype
    spec = LiveSpec(site=site, layers=layers, batch_size=options.batch_size, seed=options.seed,
                    generation_rows=generation_rows_for(buffer_bytes, len(layers) * (2 if target_site else 1),
                                                        d_site, options.batch_size),
                    d_site=d_site, target_site=target_site,
                    context_size=context_size, model_batch=model_batch, max_norm_ratio=max_norm_ratio,
                    keep_special=keep_special)
    settings = {"model": loaded.name, "dataset": dataset, "layers": layers, "site": site, "variant": variant,
                "context_size": context_size, "model_batch": model_batch, "generation_rows": spec.generation_rows,
                "batch_size": options.batch_size, "seed": options.seed, "max_norm_ratio": max_norm_ratio,
                "keep_special": keep_special, "model_dtype": model_dtype,
                **({"target_site": target_site, "skip": skip} if transcoder else {})}
    state = LiveState.read(out) if resume else None
    if state is not None:
        differing = [k for k in settings if state.settings.get(k) != settings[k]
                     and not (k == "model_dtype" and k not in state.settings)]   # older states lack it
        if differing:
            k = differing[0]
            raise UserError(f"--resume: {out} was started with {k}={state.settings.get(k)!r}, not {settings[k]!r}")
        spec.norm_median = state.norm_median
    state = state or LiveState(settings=settings)
    out.mkdir(parents=True, exist_ok=True)

    trainers, clocks = {}, {}       # clocks: each layer's --checkpoint-every (sae.train.schedule)
    torch.manual_seed(options.seed)  # the initial weights are a function of the seed
    for layer in layers:
        model = transcoding.create(variants.get(variant), d_site, d_sae, expansion, knobs or {}, transcoder, skip)
        run_dir = out / f"layer_{layer}"
        run_dir.mkdir(parents=True, exist_ok=True)
        extra = {"layer": layer, "site": site, "model": loaded.name, "dataset": dataset, "store": None,
                 "store_digest": None, "context_size": context_size, "live": True, "model_dtype": model_dtype,
                 **transcoding.config_extra(target_site, transcoder)}
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
    stored = getattr(torch, model_dtype) if model_dtype in ("float32", "bfloat16", "float16") else torch.float32
    writer = StoreWriter(save_activations, loaded, spec, dataset, label_names, resume,
                         dtype=stored) if save_activations else None   # the saved store follows the model
    stop_at = total if max_steps is None else min(total, max_steps)
    bar = tqdm(total=total, initial=step, unit="step", desc=f"live {variant} {_layer_list(layers)}",
               disable=None if progress is None else not progress, dynamic_ncols=True)
    sae_seconds, consumer_wait, last_postfix, first_step = 0.0, 0.0, 0.0, step
    with StopFlag() as stop_flag, Producer(loaded, documents_factory, spec, device, gen_index, start_window,
                                           writer, steps_needed=stop_at - gen_step) as producer:
        generations = producer.generations()
        while step < stop_at and not stop_flag.requested:
            begin = time.perf_counter()
            generation = next(generations)
            consumer_wait += time.perf_counter() - begin
            if device.type == "cuda":  # made on the producer's stream, used (and freed) on this one
                for tensor in generation.acts.values():
                    tensor.record_stream(torch.cuda.current_stream(device))
            state.generations.append({"index": generation.index, "start_window": generation.start_window,
                                      "start_step": gen_step})
            state.norm_median = spec.norm_median
            state.write(out)
            if generation.index == 0:
                for layer, trainer in trainers.items():
                    if trainer.step_count == 0:
                        trainer.init_from_sample(*(generation.acts[key][:options.init_rows]
                                                   for key in transcoding.row_keys(layer, target_site)))
            for j in range(max(0, step - gen_step), generation.n_batches):
                if step >= stop_at or stop_flag.requested:
                    break
                begin = time.perf_counter()
                for layer, trainer in trainers.items():
                    if trainer.step_count == step:
                        logged = trainer.step(*(generation.acts[key][j * spec.batch_size:(j + 1) * spec.batch_size]
                                                for key in transcoding.row_keys(layer, target_site)))
                        if clocks.setdefault(layer, CheckpointClock(options.checkpoint_every, trainer.dist.enabled)).due(
                                trainer.step_count, bool(logged)) and trainer.step_count < total:
                            trainer.save_checkpoint()      # steps or wall time (sae.train.schedule)
                            clocks[layer].saved()
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
        results = {layer: dict(trainer.finish()) for layer, trainer in trainers.items()}
        if options.eval_rows:
            score_held_out(loaded, documents_factory, spec, device, trainers, options.eval_rows, results)
        return results
    for trainer in trainers.values():  # interrupted (Ctrl-C or max_steps): a checkpoint to resume from
        trainer.save_checkpoint()
    if stop_flag.requested:
        print(f"interrupted at step {step}/{total}: checkpoints saved under {out}/layer_*/checkpoints\n"
              f"continue with the same command and --resume", file=sys.stderr)
    return {layer: {**trainer.last_metrics, "interrupted": True} for layer, trainer in trainers.items()}


def _layer_list(layers) -> str:
    """'layers 3,6' or, for many, 'layers 0-29 (30)': a progress line must keep room for its counts."""
    if len(layers) <= 4:
        return "layers " + ",".join(map(str, layers))
    return f"layers {min(layers)}-{max(layers)} ({len(layers)})"


@torch.no_grad()
def score_held_out(loaded, documents_factory, spec: LiveSpec, device, trainers: dict, n_rows: int,
                   results: dict) -> None:
    """FVU, L0, dead fraction of each SAE on up to n_rows held-out tokens (the model run on held-out
    windows only now, after training); written to RUN/layer_L/train_summary.json."""
    from sae.files import write_json
    from sae.evaluate.scores import score, summary_scores
    from sae.train.trainer import SUMMARY
    producer = Producer(loaded, documents_factory, spec, device)
    rows, count = {key: [] for key in spec.row_keys}, 0
    for _, numbered in producer._batches(0, held_out=True):
        if any(window.index != number for number, window in numbered):
            break                                   # the dataset's first pass is over
        windows = [w for _, w in numbered]
        if not windows[0].held_out:
            continue
        acts = producer.forward(windows)
        ids, docs = torch.stack([w.input_ids for w in windows]), torch.stack([w.doc_ids for w in windows])
        flat = {key: acts[key].reshape(-1, acts[key].shape[-1]) for key in spec.row_keys}
        keep = keep_rows(ids, docs, {layer: flat[layer] for layer in spec.layers}, loaded.special_ids,
                         spec.keep_special, spec.max_norm_ratio, spec.norm_median)
        for key in spec.row_keys:
            rows[key].append(flat[key][keep.to(flat[key].device)])
        count += int(keep.sum())
        if count >= n_rows:
            break
    for layer, trainer in trainers.items():
        held = torch.cat(rows[layer])[:n_rows] if count else torch.empty(0)      # [n, d_model]
        batches = held.split(4096)
        if spec.target_site is not None and count:   # a transcoder: (input, target) pairs
            batches = list(zip(batches, torch.cat(rows[f"targets.{layer}"])[:n_rows].split(4096)))
        scores = summary_scores(score(trainer.model, batches, trainer.device)) if count else None
        results[layer]["held_out"] = scores
        write_json(trainer.run_dir / SUMMARY, {"variant": trainer.model.name, "layer": layer, "live": True,
                                               "steps": trainer.step_count, "tokens": trainer.tokens_seen,
                                               "train": trainer.last_metrics, "held_out": scores})
