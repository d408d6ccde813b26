"""`sae analyze`: everything the dashboard shows about each feature, from one streaming pass.

    from sae.analyze.pipeline import analyze, AnalyzeOptions
    meta = analyze(RUN, STORE)          # writes RUN/analysis/ (file contract in docs/DESIGN.md)

The pass (sae.feature_pass) keeps per-latent statistics, the exact top-N examples with the latent's
codes on ±radius context tokens, and a bounded reservoir sample, and per-band samples of each
equal-width activation band of [0, max] ("interval examples", sae.analyze.bands). Tables are assembled here (sae.analysis_tables).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from sae.errors import UserError
from sae.files import MARKER, FolderLock, check_output_folder, mark_output, remove_stale_temporaries


@dataclass
class AnalyzeOptions:
    n_top: int = 20               # top examples per feature
    context_radius: int = 10      # tokens either side of an example
    n_bands: int = 5              # equal-width activation bands of [0, max] for interval examples
    per_band: int = 5             # interval examples per band
    reservoir: int = 64           # per-feature reservoir sample size (band 0 of the interval examples, top tokens)
    n_nearest: int = 10
    n_logits: int = 10
    batch_size: int = 4096
    device: str = "cpu"
    with_model: bool = True       # load the store's model for logit effects
    model_dtype: str = "auto"     # its dtype (--model-dtype; auto: float32 here, on the CPU)
    seed: int = 0
    max_entries: int = 4_000_000  # firing entries processed at once (bounds memory on dense codes)
    allow_incomplete: bool = False  # analyse an unfinished run or store (with a warning) instead of refusing

    def __post_init__(self):
        """Refuse bad options in one line, for Python callers as for the command line."""
        for name, value in (("--top-k", self.n_top), ("--batch-size", self.batch_size), ("--bands", self.n_bands),
                            ("--per-band", self.per_band), ("--reservoir", self.reservoir),
                            ("max_entries", self.max_entries)):
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        for name, value in (("--context", self.context_radius), ("--nearest", self.n_nearest),
                            ("--logits", self.n_logits)):
            if value < 0:
                raise UserError(f"{name} must be >= 0, got {value}")
        from sae.lm.loading import parse_model_dtype
        parse_model_dtype(self.model_dtype)


def _say(log, message: str) -> None:
    if log is not None:
        log(message)


def _layer_folder(run_dir: Path, layer) -> Path:
    """RUN itself, or RUN/layer_L when RUN holds one SAE per layer (trained straight from a model)."""
    if (run_dir / "config.json").is_file() or not run_dir.is_dir():
        return run_dir
    layers = sorted(p.name for p in run_dir.glob("layer_*") if p.is_dir())
    if not layers:
        return run_dir
    if layer is None:
        raise UserError(f"{run_dir} holds one SAE per layer ({', '.join(layers)}): pass --layer")
    if not (run_dir / f"layer_{layer}").is_dir():
        raise UserError(f"{run_dir} has no layer_{layer} (it holds {', '.join(layers)})")
    return run_dir / f"layer_{layer}"


ANALYSIS_KIND = "analysis"


def _is_old_analysis(folder: Path) -> bool:
    """An analysis written before output markers: our meta.json beside parquet/JSON tables, nothing else."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"n_features", "options"} <= set(meta) and all(
        p.is_file() and p.suffix in (".parquet", ".json") for p in folder.iterdir() if not p.name.startswith("."))


def _prepare_output(run_dir: Path, out_dir: Path | None, force: bool, store_path: Path) -> Path:
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force and \
            ((out_dir / MARKER).is_file() or _is_old_analysis(out_dir)):
        raise UserError(f"{out_dir} already holds an analysis: pass --force to replace it")
    check_output_folder(out_dir, ANALYSIS_KIND, force, inputs=(run_dir, store_path), owned=_is_old_analysis)
    return out_dir


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Swap the finished temporary folder into place; the old analysis is removed only afterwards."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def analyze(run_dir, store, layer=None, options: AnalyzeOptions | None = None, out_dir=None,
            force: bool = False, model=None, log=print) -> dict:
    """Analyse every feature of the SAE in run_dir over `store` (a path or ActivationStore).

    Writes RUN/analysis/ (or out_dir) and returns its meta.json contents (with a "notes" list of
    what was skipped and why). One analysis at a time writes a folder (a second is refused in one line)."""
    target = Path(out_dir) if out_dir is not None else _layer_folder(Path(run_dir), layer) / "analysis"
    with FolderLock(target.parent, "sae analyze", name=f".{target.name}.sae-lock"):
        return _analyze(run_dir, store, layer, options, out_dir, force, model, log)


@torch.no_grad()
def _analyze(run_dir, store, layer=None, options: AnalyzeOptions | None = None, out_dir=None,
            force: bool = False, model=None, log=print) -> dict:
    """Analyse every feature of the SAE in run_dir over `store` (a path or ActivationStore).

    Writes RUN/analysis/ (or out_dir) and returns its meta.json contents (with a "notes" list of
    what was skipped and why)."""
    from sae.analyze.tables import write_tables
    from sae.analyze.feature_pass import FeatureStats, iter_window_batches, log_bin_edges
    from sae.runs import load, read_config
    from sae.store import ActivationStore
    from sae.devices import resolve

    options = options or AnalyzeOptions()
    run_dir = _layer_folder(Path(run_dir), layer)
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    device = resolve(options.device)
    model = (model if model is not None else load(run_dir)).to(device).eval()
    # a foreign folder (SAELens, sparsify) opened by sae.load has no config.json of ours
    config = read_config(run_dir) if (run_dir / "config.json").is_file() \
        else dict(getattr(model, "run_config", {}) or {})
    from sae.interop import releases
    from sae.runs import check_run_store, weights_digest
    releases.check_store(config, store.manifest, store.d_model)   # a published SAE: its model and width, first
    if int(model.d_in) != store.d_model:     # a foreign config may not name its width: the module's own
        raise UserError(f"the SAE takes d_in={model.d_in} but the store's activations have d_model={store.d_model}")
    layer = check_run_store(config, store, layer, options.allow_incomplete)   # model, site, layer must match
    out_dir = _prepare_output(run_dir, out_dir, force, store.path)

    notes: list[str] = []
    has_contexts = store.has_windows
    if not has_contexts:
        notes.append("the store has no window_tokens (made by from_tensors?): everything but contexts was analysed")
    signed = bool(getattr(model, "signed_codes", False))
    threshold = config.get("fire_threshold", getattr(model, "fire_threshold", 0.0))
    threshold = 0.0 if threshold is None else float(threshold)
    label_names = list(store.manifest.get("label_names") or []) if store.has_labels else []
    if store.has_labels and not label_names:
        labels = store.column("label")
        label_names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    edges = log_bin_edges()
    stats = FeatureStats(model.d_sae, n_top=options.n_top, reservoir=options.reservoir,
                         radius=options.context_radius if has_contexts else None, signed=signed,
                         threshold=threshold, n_labels=len(label_names), edges=edges, device=device,
                         seed=options.seed, max_entries=options.max_entries, n_bands=options.n_bands,
                         per_band=options.per_band)
    from sae.analyze.latent_pass import LatentStats      # token search, anomalies, code-space retrieval
    latent = LatentStats(store, model.d_sae, device, floor=0.0 if signed else threshold, signed=signed)
    started = time.perf_counter()
    from sae.progress import progress_bar     # a bar in a terminal, a line every 30 s in a log
    with progress_bar(total=len(store), desc="analyze", unit="tok", unit_scale=True) as bar:
        for batch in iter_window_batches(store, layer, options.batch_size):
            codes = model.encode(batch.x.to(device))                                       # [B, d_sae]
            stats.update(codes, batch)
            x_hat = model.decode(codes)                                                    # [B, d_in]
            if getattr(model, "is_transcoder", False):   # its error is against the target site's rows
                x_hat = x_hat + model.skip_term(batch.x.to(device))
                batch = replace(batch, x=store.gather(layer, batch.global_rows, "targets"))
            latent.update(batch, codes, x_hat)
            del codes
            bar.update(len(batch.global_rows))
    pass_seconds = time.perf_counter() - started

    meta = {
        "n_tokens": stats.n_tokens, "n_features": int(model.d_sae),
        "model": store.manifest.get("model") or config.get("model"), "layer": layer,
        "site": store.manifest.get("site") or config.get("site"), "variant": config.get("variant"),
        **({"transcoder": True, "target_site": config.get("target_site") or store.manifest.get("target_site")}
           if getattr(model, "is_transcoder", False) else {}),
        "has_contexts": has_contexts, "label_names": label_names or None,
        "hist_bin_edges": edges.tolist(), "histogram_of": "|code|" if signed else "code (firing tokens)",
        "fire_threshold": None if signed else threshold,
        "context_radius": options.context_radius if has_contexts else 0,
        "signed_codes": signed, "n_top": options.n_top, "n_bands": options.n_bands,
        "mean_activation_over": "all tokens" if signed else "firing tokens",
        "ranked_by": "|code|" if signed else "code", "run": str(run_dir), "store": str(store.path),
        "options": asdict(options), "pass_seconds": round(pass_seconds, 3),
        "weights_digest": weights_digest(run_dir),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir.parent)          # what a killed analysis left behind
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        write_tables(tmp_dir, stats, model, store, meta, options, notes)
        latent.write(tmp_dir, stats, model, meta, notes)
        meta["notes"] = notes
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        mark_output(tmp_dir, ANALYSIS_KIND)
        _publish(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if run_dir.is_dir() and not (run_dir / "config.json").exists() and out_dir == run_dir / "analysis":
        # another tool's folder (SAELens, sparsify, Gemma Scope): add this project's run files (the same
        # function) so that the dashboard, which reads config.json and sae.safetensors, opens it as a run
        from sae.runs import run_context, save_run
        save_run(model.cpu(), run_dir, run_context(config))
        notes.append(f"{run_dir} is another tool's layout: config.json and sae.safetensors were added beside it "
                     f"for the dashboard")
    for note in notes:
        _say(log, f"note: {note}")
    return meta
