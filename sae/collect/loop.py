"""Collection: run a language model over packed windows and write a site's activations to a store.

One forward pass per batch of windows captures every requested layer and stops right after the
deepest one. Rows are the kept token positions (BOS/EOS/padding dropped unless asked), optionally
minus tokens whose norm exceeds `max_norm_ratio` × the layer's median (median over the first
8,192 kept tokens, stored in the manifest so that a resumed run drops the same rows).

Under torchrun each rank reads, tokenizes and packs only its share of the documents (sae.collect.ranks).
Bookkeeping: batches are fixed groups of this rank's windows (`batch_size` windows, or
`batch_tokens` // context_size); shards are flushed between batches (no window spans two shards) and
written in a background thread (sae.collect.shard_writer) while the model goes on, each under a
temporary name and renamed; after each shard's file is in place its line in the index records how far
the run got, so `resume` continues with the next batch and ends with exactly the rows of an
uninterrupted run.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae import distributed
from sae import store as store_lib
from sae.store.reader import in_background
from sae.collect import progress
from sae.collect.ranks import DEALING, DocumentShare, batches, check_resumable, deal, numbered, rank_budget
from sae.collect.norms import NormSketch, merged, read_back
from sae.collect.early import check_before_loading
from sae.collect.rows import BatchRows, batch_rows, shard_tensors
from sae.collect.shard_writer import ShardWriter
from sae.collect.targets import capture_sites, check_complete, check_target_site
from sae.data import PAD_DOC, load_documents, pack_windows
from sae.errors import UserError
from sae.files import FolderLock, read_json, write_json
from sae.lm import (LoadedModel, check_context_size, layer_index, load_model,
                    run_until_captured, site_point, site_width)
from sae.lm.loading import loaded_dtype
from sae.lm.source import SourceOptions

MEDIAN_TOKENS = 8192
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMAT = "sae-activation-store/1"
# options that must match when a collection is resumed
RECIPE_KEYS = ("model", "layers", "site", "dataset", "text_column", "split", "context_size", "model_dtype",
               "dtype", "special_tokens_kept", "max_norm_ratio", "world_size", "target_site")
OPTIONAL_RECIPE_KEYS = ("model_dtype", "target_site")   # absent from stores written before it was recorded


@dataclass(kw_only=True)
class CollectOptions(SourceOptions):
    """What a collection reads (SourceOptions: model, layers, site, data) and what it writes."""
    out: Path
    tokens: int | None = None          # rows to write (all ranks together); None: the whole dataset
    batch_size: int | None = None      # windows per forward pass
    batch_tokens: int | None = None    # or tokens per forward pass: max(1, batch_tokens // context_size) windows
    dtype: str | None = None           # stored dtype; None: the model's dtype (a bf16 model writes bf16)
    device: str = "cpu"
    shard_tokens: int | None = None    # rows per shard (default: about 256 MB of activations)
    resume: bool = False
    force: bool = False
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.out = Path(self.out)
        if self.resume and self.force:
            raise UserError("--resume and --force contradict each other: pick one")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        flags = {"tokens": "--tokens", "batch_size": "--batch-windows", "batch_tokens": "--batch-tokens",
                 "shard_tokens": "--shard-tokens"}
        for name, flag in flags.items():
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"{flag} must be positive, got {value}")
        if self.batch_size is not None and self.batch_tokens is not None:
            raise UserError("--batch-windows and --batch-tokens both size a batch: give one of them")


@dataclass
class CollectResult:
    path: Path
    n_tokens: int
    n_shards: int
    size_bytes: int
    exhausted: bool                    # the dataset ran out before --tokens rows
    manifest: dict = field(default_factory=dict)
    bytes_written: int = 0             # by this run, every file counted (shards, index, manifests; all ranks)
    already_complete: bool = False     # --resume of a finished store: nothing was collected


# ---- the output folder --------------------------------------------------------------------------

def _store_files(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name == store_lib.MANIFEST or p.name.startswith(("shard_", ".shard_", "index", ".index", "progress_", ".manifest", ".progress_"))]


def prepare_out(out: Path, resume: bool, force: bool) -> dict | None:
    """Check --out; returns the existing manifest when resuming, else None (folder ready and empty of store files)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    existing = out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())
    if existing and resume:
        manifest_path = out / store_lib.MANIFEST
        if not manifest_path.is_file():
            raise UserError(f"--resume: {out} holds no manifest.json, so there is nothing to resume")
        return read_json(manifest_path, "--resume: the store's manifest")
    if existing and not force:
        raise UserError(f"--out {out} is not empty: pass --resume to continue it or --force to replace it")
    if existing:   # --force replaces a store, never a folder that holds anything else
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p not in _store_files(out))
        if others:
            raise UserError(f"--force replaces only an activation store; {out} holds other files "
                            f"({', '.join(others[:3])}): give a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to --out {out}: {error.strerror or error}") from None
    if existing and force:
        for path in _store_files(out):
            path.unlink()
    return None


def _remove_temporaries(out: Path) -> None:
    for path in out.glob(".*.tmp*"):
        try:
            path.unlink()
        except OSError:
            pass


# ---- the run -----------------------------------------------------------------------------------

def _recipe(options: CollectOptions, d: distributed.DistInfo, model_dtype: str) -> dict:
    sharing = {"rank_share": DEALING} if d.enabled else {}    # how the ranks shared the documents
    return {"model": options.model, "layers": list(options.layers), "site": options.site, "dataset": options.dataset,
            "text_column": options.text_column, "split": options.split, "context_size": options.context_size,
            "dtype": options.dtype, "special_tokens_kept": options.keep_special_tokens,
            "max_norm_ratio": options.max_norm_ratio, "world_size": d.world_size, "model_dtype": model_dtype,
            "target_site": options.target_site, **sharing}


def _check_recipe(old: dict, new: dict) -> None:
    for key in RECIPE_KEYS:
        if key in OPTIONAL_RECIPE_KEYS and key not in old:
            continue
        if old.get(key) != new.get(key):
            raise UserError(f"--resume: the store was collected with {key}={old.get(key)!r}, "
                            f"not {new.get(key)!r}: use the same options (or --force to start over)")


def collect(options: CollectOptions, loaded: LoadedModel | None = None) -> CollectResult:
    """Run a collection (see the module docstring). Returns where the store is and what it holds.
    The store folder is locked while it is written (rank 0 holds the lock): a second writer is refused."""
    import contextlib
    from sae.collect.early import already_complete, remove_if_left_empty
    out = Path(options.out)
    if options.resume and (done := already_complete(out, options.tokens)) is not None:
        return CollectResult(out, **done, already_complete=True)
    created = not out.exists()
    try:
        with FolderLock(out, "sae collect") if distributed.is_main_process() else contextlib.nullcontext():
            return _collect(options, loaded)
    except BaseException:
        if created and distributed.is_main_process():
            remove_if_left_empty(out)            # a failed collect leaves no empty folder behind
        raise


def _collect(options: CollectOptions, loaded: LoadedModel | None) -> CollectResult:
    from sae.devices import resolve
    out = Path(options.out)
    device = distributed.local_device(resolve(options.device))
    d = distributed.setup(device.type)
    old_manifest = prepare_out(out, options.resume, options.force) if d.rank == 0 or not d.enabled else None
    distributed.barrier()
    if d.enabled and d.rank != 0:
        old_manifest = prepare_out(out, options.resume, True) if options.resume else None
    if loaded is None:
        check_before_loading(options)       # --layers from the model's config: seconds, before the weights
        loaded = load_model(options.model, device=device, dtype=options.model_dtype)
    model_dtype = loaded_dtype(loaded)
    if options.dtype is None:   # the store follows the model: a bf16 model writes a bf16 store
        options.dtype = model_dtype if model_dtype in DTYPES else "float32"
    check_context_size(loaded, options.context_size)
    for layer in options.layers:
        site_point(loaded.model, options.site, layer)  # validates site and layer range
    check_target_site(loaded, options.site, options.target_site, options.layers)
    layers = sorted(options.layers, key=lambda layer: layer_index(loaded.model, options.site, layer))
    options.layers = layers
    recipe = _recipe(options, d, model_dtype)

    # resume state
    asked_batch = options.batch_size or (max(1, options.batch_tokens // options.context_size)
                                         if options.batch_tokens is not None else None)
    state = {"shards": [], "shard_rows": [], "next_window": 0, "rows": 0, "norm_median": None,
             "batch_size": asked_batch or 8, "exhausted": False}
    if old_manifest is not None:
        _check_recipe(old_manifest, recipe)
        check_resumable(old_manifest)
        progress.restore(out, d, old_manifest, state, layers)   # from the per-shard index (or an old manifest)
        if asked_batch is None:
            state["batch_size"] = old_manifest.get("batch_size", state["batch_size"])
        _remove_temporaries(out)
    batch_size = state["batch_size"]

    documents, label_names = load_documents(options.dataset, options.text_column, options.split)
    share = DocumentShare()               # this rank tokenizes only its documents (sae.collect.ranks)
    windows = in_background(numbered(pack_windows(deal(documents, d, share), loaded.tokenizer, options.context_size,
                                                  loaded.bos_id, loaded.eos_id, loaded.pad_id), d),
                            256, "sae-tokenize")      # tokenised in a thread, ahead of the model
    stored_dtype = DTYPES[options.dtype]
    element = torch.tensor([], dtype=stored_dtype).element_size()
    d_site = site_width(loaded, options.site, layers)      # the rows' width: d_model, or n_heads·d_head for attn_z
    per_row = d_site * element * len(layers) * (2 if options.target_site else 1)    # bytes a row takes
    shard_tokens = options.shard_tokens or max(1024, (256 << 20) // per_row)
    budget = rank_budget(options.tokens, d)
    special = torch.tensor(sorted(loaded.special_ids), dtype=torch.int64)
    labelled = label_names is not None

    def manifest(complete: bool, shards, shard_rows, n_tokens, extra=None) -> dict:
        body = {"format": FORMAT, **recipe, "model_note": loaded.note, "family": loaded.family,
                "d_model": d_site, "n_tokens": n_tokens, "shards": shards, "shard_rows": shard_rows,
                "held_out": {"rule": store_lib.HELD_OUT_RULE, "modulus": store_lib.HELD_OUT_MODULUS},
                "label_names": label_names, "bos_fed": loaded.bos_id is not None, "batch_size": batch_size,
                "tokens_requested": options.tokens, "norm_median": state["norm_median"], "complete": complete}
        body.update(extra or {})
        return body

    sketch = NormSketch(layers)          # norm statistics kept while collecting: no read-back at the end
    read_back(sketch, out, state["shards"], layers)    # a resumed run: the shards written before it, once
    written = [0]                        # bytes this run wrote (shards, index lines, manifests)

    def save_manifest(body):
        write_json(out / store_lib.MANIFEST, body)
        written[0] += (out / store_lib.MANIFEST).stat().st_size

    if d.rank == 0 and old_manifest is None:   # written at the start and the end; progress goes to the index
        save_manifest(manifest(False, [], [], 0))
    distributed.barrier()

    pending: list[BatchRows] = []    # rows waiting for the next shard
    prelude: list[BatchRows] = []    # rows held until the norm median is known
    # `state` runs ahead of the disk by the shards handed to the writer; `recorded` is what the index holds
    recorded = {**state, "shards": list(state["shards"]), "shard_rows": list(state["shard_rows"])}

    def write(job):
        """In the writer's thread: one shard's file, then its index line (sae.collect.shard_writer)."""
        index, name, tensors, norms, after = job
        try:
            store_lib.write_shard(out / name, tensors, {"rank": d.rank, "index": index})
            size = (out / name).stat().st_size + progress.record(out, d, name, tensors, layers, norms, after)
        except OSError as error:
            raise UserError(f"cannot write {name} to {out}: {error.strerror or error}") from error
        recorded.update(after, shards=recorded["shards"] + [name],
                        shard_rows=recorded["shard_rows"] + [len(tensors["doc_id"])])
        written[0] += size

    def flush():
        if not pending:
            return
        index = len(state["shards"])
        name = store_lib.shard_name(index, d.rank if d.enabled else None)
        next_window = pending[-1].next_window
        if sum(len(p) for p in pending) == 0:  # nothing kept: no empty shard
            state["next_window"] = next_window
            pending.clear()
            return
        tensors = shard_tensors(pending, layers, labelled)
        n_rows = len(tensors["doc_id"])
        norms = torch.stack([tensors[f"activations.{layer}"].float().norm(dim=-1) for layer in layers], dim=1)  # [n, L]
        sketch.add(norms, MEDIAN_TOKENS)
        state["shards"].append(name)
        state["shard_rows"].append(n_rows)
        state["rows"] += n_rows
        state["next_window"] = next_window
        pending.clear()
        writer.submit((index, name, tensors, norms, progress.small_state(state)))

    def accept(rows: BatchRows) -> bool:
        """Filter by norm, cut to the budget, queue for a shard. False once the budget is met."""
        if options.max_norm_ratio is not None and len(rows):
            limit = torch.tensor([state["norm_median"][str(layer)] for layer in layers]) * options.max_norm_ratio
            rows = rows.select((rows.norms <= limit).all(dim=1))
        queued = sum(len(p) for p in pending)
        more = budget is None or state["rows"] + queued + len(rows) < budget
        if not more:
            rows = rows.head(budget - state["rows"] - queued)
        pending.append(rows)
        if progress_bar is not None:
            progress_bar.update(len(rows))
        if not more:
            return False
        if queued + len(rows) >= shard_tokens:
            flush()
        return True

    def settle_median():
        norms = torch.cat([p.norms for p in prelude])[:median_tokens] if prelude else torch.empty(0, len(layers))
        norms = distributed.all_gather_cat(norms)  # [n over ranks, L]
        medians = torch.nanmedian(norms, dim=0).values if len(norms) else torch.full((len(layers),), float("nan"))
        state["norm_median"] = {str(layer): float(m) for layer, m in zip(layers, medians.tolist())}

    done = budget is not None and state["rows"] >= budget
    # the norm median is taken over the first min(8,192, this rank's --tokens) kept tokens
    median_tokens = min(MEDIAN_TOKENS, budget) if budget is not None else MEDIAN_TOKENS
    progress_bar = _progress(options, budget, state["rows"], d)
    start_time = time.perf_counter()
    finished_data = False
    seen = [0]  # windows packed by this rank
    hf = loaded.model
    forward_kwargs = {"use_cache": False} if getattr(hf.config, "use_cache", None) is not None else {}
    writer = ShardWriter(write)         # shards are written in its thread while the model goes on
    try:
        with torch.inference_mode(), capture_sites(hf, options.site, options.target_site, layers) as (
                captured, captured_targets):
            for group in ([] if done else batches(windows, batch_size, state["next_window"], seen)):
                input_ids = torch.stack([w.input_ids for w in group]).to(device)   # [B, T]
                inputs = {"input_ids": input_ids, **forward_kwargs}
                padding = torch.stack([w.doc_ids for w in group]) == PAD_DOC
                if bool(padding.any()) and not loaded.is_causal:
                    inputs["attention_mask"] = (~padding).long().to(device)
                captured.clear()
                if captured_targets is not None:
                    captured_targets.clear()
                run_until_captured(hf, **inputs)
                check_complete(captured, layers, options.site, options.target_site)
                rows = batch_rows(group, captured, layers, special, options.keep_special_tokens, stored_dtype,
                                  next_window=group[-1].index + 1, captured_targets=captured_targets)
                if state["norm_median"] is None and options.max_norm_ratio is not None:
                    prelude.append(rows)
                    if sum(len(p) for p in prelude) < median_tokens:
                        continue
                    settle_median()
                    held, prelude[:] = list(prelude), []
                    if not all(accept(p) for p in held):
                        break
                    continue
                if not accept(rows):
                    break
            else:
                finished_data = True
                if seen[0] == 0 and not done and (not d.enabled or share.with_text == 0):
                    raise UserError(f"dataset {options.dataset!r} holds no text to collect from")
            if state["norm_median"] is None and options.max_norm_ratio is not None:
                settle_median()
            held, prelude[:] = list(prelude), []
            for p in held:
                if not accept(p):
                    finished_data = False
                    break
            flush()
            writer.close()            # every shard written and recorded; the writer's error, if any, here
    except KeyboardInterrupt:
        # the shard being written is finished, those not yet started are discarded; the manifest (and the
        # index) describe every shard on disk
        writer.stop()
        _remove_temporaries(out)
        if not d.enabled:
            save_manifest(manifest(False, recorded["shards"], recorded["shard_rows"], recorded["rows"],
                                   {"progress": {"0": progress.small_state(recorded)}}))
        print(f"\ninterrupted: {out} keeps {recorded['rows']:,} rows in {len(recorded['shards'])} shards; "
              f"continue with --resume", file=sys.stderr)
        raise
    except BaseException:
        writer.stop()             # the shards written so far stay recorded; no half-written file of ours stays
        for path in out.glob(f".shard_*.tmp{os.getpid()}"):
            path.unlink(missing_ok=True)
        raise
    finally:
        if progress_bar is not None:
            progress_bar.close()
    elapsed = time.perf_counter() - start_time
    exhausted = finished_data and (budget is None or state["rows"] < budget)
    state["exhausted"] = bool(exhausted)
    return _finish(out, d, state, manifest, exhausted, elapsed, sketch, save_manifest, written)


def _finish(out: Path, d: distributed.DistInfo, state: dict, manifest, exhausted: bool, elapsed: float,
            sketch: NormSketch, save_manifest, written: list) -> CollectResult:
    if d.enabled:
        write_json(progress.progress_path(out, d.rank), progress.small_state(state))
    sketch = merged(sketch, distributed.all_gather_cat)        # every rank's norms (a collective)
    distributed.barrier()
    body = None
    if d.rank == 0:
        if d.enabled:
            metas = progress.merge_ranks(out, d.world_size)      # the ranks' indexes as one index.jsonl
            ranks = [read_json(progress.progress_path(out, rank), missing_ok=True) or {} for rank in range(d.world_size)]
            shards, shard_rows = [m.name for m in metas], [m.rows for m in metas]
            exhausted = any(r.get("exhausted") for r in ranks)
            extra = {"progress": {str(rank): r for rank, r in enumerate(ranks)}}
        else:
            shards, shard_rows = state["shards"], state["shard_rows"]
            extra = {"progress": {"0": progress.small_state(state)}}
        body = manifest(True, shards, shard_rows, sum(shard_rows), extra)
        body["norm_stats"] = sketch.stats()
        if body.get("norm_median") is None:  # no --max-norm-ratio: recorded from the store's first rows
            body["norm_median"] = sketch.first_median()
        body["collect_seconds"] = round(elapsed, 3)
        save_manifest(body)
    total_written = int(distributed.reduce_sum(torch.tensor([written[0]], dtype=torch.float64))[0]) \
        if d.enabled else written[0]
    distributed.barrier()
    if body is None:
        body = read_json(out / store_lib.MANIFEST, missing_ok=True)
    size = sum((out / name).stat().st_size for name in body["shards"])
    return CollectResult(out, int(body["n_tokens"]), len(body["shards"]), size, bool(exhausted), body,
                         bytes_written=total_written)


def _progress(options: CollectOptions, budget: int | None, initial: int, d: distributed.DistInfo):
    if not options.progress:
        return None
    from sae.progress import progress_bar     # a bar in a terminal, a line every 30 s in a log
    return progress_bar(total=budget, initial=initial, unit="tok", unit_scale=True, dynamic_ncols=True,
                desc=f"collect{f' rank {d.rank}' if d.enabled else ''}", disable=None if d.rank == 0 else True,
                file=sys.stderr)
