"""`sae export`: a trained run in another tool's layout.

    export(RUN, OUT, "saelens")  -> OUT/cfg.json, OUT/sae_weights.safetensors, OUT/sparsity.safetensors
    export(RUN, OUT, "sparsify") -> OUT/cfg.json, OUT/sae.safetensors (topk only)
    export(RUN, OUT, "html")     -> static pages from RUN/analysis (sae.html_export.write_html)
    export(RUN, OUT, "neuronpedia") -> OUT/batch-<n>.json ... Neuronpedia's upload batches (sae.interop.neuronpedia)

The output folder is written next to its final place and renamed in at the end, so a reader never
sees half an export; a non-empty OUT is refused unless force=True.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae.errors import UserError
from sae.files import check_output_folder, normal_permissions, read_json, remove_stale_temporaries

FORMATS = ("saelens", "sparsify", "html", "neuronpedia")


def export(run_dir, out_dir, fmt: str, force: bool = False, allow_incomplete: bool = False) -> Path:
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist")
    if out_dir.resolve() == run_dir.resolve() or run_dir.resolve() in out_dir.resolve().parents:
        raise UserError("the output folder must lie outside the run folder")
    from sae.runs import check_finished, read_config
    for folder in layer_runs(run_dir):
        check_finished(read_config(folder), folder, allow_incomplete)
        if fmt == "html":          # the pages describe these weights: a run that does not load is refused too
            _load_run(folder)
    kind = f"export-{fmt}"
    check_output_folder(out_dir, kind, force, inputs=(run_dir,), owned=lambda folder: _is_export(folder, fmt))
    remove_stale_temporaries(out_dir.parent)          # what a killed export left behind
    staging = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        {"saelens": write_saelens, "sparsify": write_sparsify, "html": write_html,
         "neuronpedia": write_neuronpedia}[fmt](run_dir, staging)
        for written in staging.rglob("*"):       # safetensors creates its files 0600: readable by all, as usual
            if written.is_file():
                normal_permissions(written)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty, or this tool's own export of the same format (checked above)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# what each format writes: an export holds these and nothing else (the only folders --force replaces);
# no marker file is added, so the folder stays exactly the other tool's layout
_EXPORT_FILES = {"saelens": {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"},
                 "sparsify": {"cfg.json", "sae.safetensors"}, "html": {"index.html", "style.css", "features"},
                 "neuronpedia": None}     # batch-<n>.json, run_settings.json, skipped_indexes.json, explanations.json


def _is_export(folder: Path, fmt: str) -> bool:
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    if fmt == "neuronpedia":
        fixed = {"run_settings.json", "skipped_indexes.json", "explanations.json"}
        return bool(names) and all(n in fixed or re.fullmatch(r"batch-\d+\.json", n) for n in names)
    return bool(names) and names <= _EXPORT_FILES[fmt]


def _load_run(run_dir: Path):
    from sae.runs import load
    return load(run_dir, device="cpu")


def _store_manifest(config: dict) -> dict:
    """The run's store manifest when its folder is still there (context size, dataset), else {}."""
    store = config.get("store")
    if store and (Path(store) / "manifest.json").is_file():
        try:
            return read_json(Path(store) / "manifest.json")
        except UserError:
            return {}
    return {}


def log_sparsity(run_dir: Path, d_sae: int) -> torch.Tensor | None:
    """SAELens's sparsity tensor: log10(feature density + 1e-10) per latent, from RUN/analysis."""
    table = run_dir / "analysis" / "features.parquet"
    if not table.is_file():
        return None
    _check_analysis_fresh(run_dir)
    import pandas as pd
    frame = pd.read_parquet(table, columns=["feature", "density"])
    density = torch.zeros(d_sae, dtype=torch.float64)
    features = torch.tensor(frame["feature"].to_numpy(copy=True), dtype=torch.int64)
    density[features] = torch.tensor(frame["density"].to_numpy(copy=True), dtype=torch.float64)
    return torch.log10(density + 1e-10).float()


def _check_analysis_fresh(run_dir: Path) -> None:
    from sae.runs import check_fresh
    try:
        meta = read_json(run_dir / "analysis" / "meta.json", missing_ok=True)
    except UserError:
        meta = None
    check_fresh(run_dir, meta, "the analysis")


def layer_runs(run_dir: Path) -> list[Path]:
    """The run itself, or, for `sae train --layers A,B` (RUN/layer_A/, RUN/layer_B/), each layer's run."""
    from sae.interop import detect_format
    if (run_dir / "config.json").is_file() or detect_format(run_dir) in ("saelens", "sparsify"):
        return [run_dir]  # foreign folders convert too: sparsify -> SAELens, SAELens -> sparsify
    runs = sorted((p.parent for p in run_dir.glob("layer_*/config.json")), key=lambda p: p.name)
    if not runs:
        raise UserError(f"{run_dir} is not a run folder (no config.json, no layer_*/config.json)")
    return runs


def write_saelens(run_dir: Path, out: Path) -> None:
    """One SAE: OUT/cfg.json ...; a multi-layer run: OUT/<hook name>/cfg.json ... per layer, the layout
    of a SAELens release on the Hub (e.g. blocks.6.hook_resid_post/)."""
    runs = layer_runs(run_dir)
    if runs == [run_dir]:
        _write_one_saelens(run_dir, out)
        return
    from sae.interop.naming import hook_name
    from sae.runs import read_config
    for run in runs:
        config = read_config(run)
        folder = out / (hook_name(config.get("site"), config.get("layer")) or run.name)
        folder.mkdir(parents=True)
        _write_one_saelens(run, folder)


def _write_one_saelens(run_dir: Path, out: Path) -> None:
    from sae.interop.saelens import CFG, SPARSITY, WEIGHTS, to_saelens
    model = _load_run(run_dir)
    config = getattr(model, "run_config", {}) or {}
    cfg, tensors = to_saelens(model, config, _store_manifest(config))
    save_file(tensors, str(out / WEIGHTS))
    sparsity = log_sparsity(run_dir, model.d_sae)
    if sparsity is not None:
        save_file({"sparsity": sparsity}, str(out / SPARSITY))
    (out / CFG).write_text(json.dumps(cfg, indent=2) + "\n")


def write_sparsify(run_dir: Path, out: Path) -> None:
    from sae.interop.sparsify import CFG, WEIGHTS, to_sparsify
    runs = layer_runs(run_dir)
    if len(runs) > 1:
        raise UserError(f"{run_dir} holds one SAE per layer; export each of its layer_L folders on its own")
    cfg, tensors = to_sparsify(_load_run(runs[0]))
    save_file(tensors, str(out / WEIGHTS))
    (out / CFG).write_text(json.dumps(cfg, indent=2) + "\n")


def write_html(run_dir: Path, out: Path) -> None:
    if not (run_dir / "analysis").is_dir():
        raise UserError(f"{run_dir} has no analysis/ folder: run `sae analyze --run {run_dir} --activations STORE` first")
    _check_analysis_fresh(run_dir)
    try:
        from sae.analyze.html_export import write_html as write_pages
    except ImportError:
        raise UserError("HTML export is not available in this installation (sae.html_export is missing)") from None
    write_pages(run_dir, out)


def write_neuronpedia(run_dir: Path, out: Path) -> None:
    """Neuronpedia's upload batches from RUN/analysis (sae.interop.neuronpedia)."""
    if layer_runs(run_dir) != [run_dir]:
        raise UserError(f"{run_dir} holds one SAE per layer; export each of its layer_L folders on its own")
    _check_analysis_fresh(run_dir)
    from sae.interop.neuronpedia import write_neuronpedia as write_batches
    write_batches(run_dir, out)
