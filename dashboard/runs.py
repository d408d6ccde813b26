"""Reading run folders: config.json, metrics.jsonl, eval.json, analysis/*, a sweep's sweep.parquet.

The dashboard reads files only; it never recomputes what `sae eval` / `sae analyze` wrote. Tables are
loaded once per file version (path + mtime + size) and cached across sessions with st.cache_resource
(no copy per rerun, so treat them as read-only). Anything missing or half-written raises DataProblem
(sae.errors.UserError for the JSON files, read by sae.files.read_json) with one line that says what is
wrong and how to fix it; the pages show it as a message.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import streamlit as st

from sae.errors import UserError
from sae.files import read_json


class DataProblem(Exception):
    """A run folder lacks something or holds something unreadable (shown in the page, not raised)."""


@dataclass
class Run:
    path: Path
    name: str
    config: dict | None = None
    problem: str | None = None            # why the run cannot be shown at all (no/invalid config.json)
    sweep: Path | None = None             # sweep.parquet next to or above the run, if any

    @property
    def analysis(self) -> Path:
        return self.path / "analysis"

    def describe(self) -> str:
        cfg = self.config or {}
        bits = [str(cfg["variant"])] if cfg.get("variant") else []
        if cfg.get("model"):
            bits.append(Path(str(cfg["model"])).name or str(cfg["model"]))   # a local model folder: its name
        if cfg.get("layer") is not None:
            bits.append(f"L{cfg['layer']}")
        if cfg.get("site"):
            bits.append(str(cfg["site"]) + (f" → {cfg.get('target_site') or 'mlp_out'} "
                                             f"{'skip ' if cfg.get('skip') else ''}transcoder"
                                             if cfg.get("transcoder") else ""))
        if cfg.get("d_sae"):
            bits.append(f"{cfg['d_sae']} latents")
        return f"{self.name} ({', '.join(bits)})" if bits else self.name


# ---- finding runs ---------------------------------------------------------------------------
def _open_run(path: Path, name: str) -> Run:
    run = Run(path=path, name=name)
    for candidate in (path / "sweep.parquet", path.parent / "sweep.parquet"):
        if candidate.is_file():
            run.sweep = candidate
            break
    if not path.exists():
        run.problem = f"{path} does not exist"
        return run
    try:
        run.config = read_json(path / "config.json")
    except UserError as problem:
        run.problem = f"{path} is not a finished run folder: {problem}"
    return run


def find_runs(paths) -> list[Run]:
    """Every run given; a folder that is not a run but holds runs (RUN/layer_L/, a sweep's DIR) adds them all."""
    runs: list[Run] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir() and not (path / "config.json").exists():
            children = sorted(child for child in path.iterdir()
                              if child.is_dir() and (child / "config.json").exists())
            if children:
                runs += [_open_run(child, f"{path.name}/{child.name}") for child in children]
                continue
        runs.append(_open_run(path, path.name or str(path)))
    return runs


@st.cache_resource(show_spinner=False, max_entries=64)
def _cached_runs(paths: tuple[str, ...], stamp: tuple) -> list[Run]:
    return find_runs(paths)


def runs_from(paths) -> list[Run]:
    """find_runs, cached until a given folder's listing or config.json changes."""
    paths = tuple(str(p) for p in paths)
    return _cached_runs(paths, tuple(_stamp(Path(p)) + _stamp(Path(p) / "config.json") for p in paths))


def _stamp(path: Path) -> tuple:
    try:
        stat = path.stat()
        return (stat.st_mtime_ns, stat.st_size)
    except OSError:
        return (None, None)


# ---- small files (read each time: cheap) -----------------------------------------------------
def read_eval(run: Run) -> dict | None:
    path = run.path / "eval.json"
    return read_json(path) if path.exists() else None


def read_metrics(run: Run) -> pd.DataFrame:
    """metrics.jsonl as a table (one row a logged step); a half-written last line is skipped."""
    path = run.path / "metrics.jsonl"
    if not path.exists():
        return pd.DataFrame()
    return _metrics_table(str(path), _stamp(path))


@st.cache_data(show_spinner=False, max_entries=32)
def _metrics_table(path: str, stamp: tuple) -> pd.DataFrame:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return pd.DataFrame(rows)


def analyze_hint(run: Run) -> str:
    """`sae analyze …` for this run, naming the store its config.json records."""
    from sae.commands.dashboard import analyze_command
    return analyze_command(run.path, run.config)


def read_meta(run: Run) -> dict:
    if not (run.analysis / "meta.json").exists():
        raise DataProblem(f"{run.name} has no feature analysis yet ({run.analysis}/meta.json is missing): "
                          f"run `{analyze_hint(run)}`")
    return read_json(run.analysis / "meta.json")


@st.cache_data(show_spinner=False, max_entries=16)
def _sweep_table(path: str, stamp: tuple) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def read_sweep(path: Path) -> pd.DataFrame:
    try:
        return _sweep_table(str(path), _stamp(path))
    except (OSError, pa.ArrowException) as error:
        raise DataProblem(f"{path} cannot be read (half-written? {error})") from None


# ---- the big per-feature tables -------------------------------------------------------------
class FeatureRows:
    """A parquet table sorted by feature, with offsets so that one feature's rows are a cheap slice."""

    def __init__(self, table: pa.Table, n_features: int | None = None):
        features = table.column("feature").to_numpy()
        if len(features) and np.any(np.diff(features) < 0):
            keys = [("feature", "ascending")] + ([("rank", "ascending")] if "rank" in table.column_names else [])
            table = table.sort_by(keys)
            features = table.column("feature").to_numpy()
        self.table = table
        top = int(features.max()) + 1 if len(features) else 0
        n = max(top, n_features or 0)
        self.starts = np.searchsorted(features, np.arange(n), side="left")
        self.stops = np.searchsorted(features, np.arange(n), side="right")

    def rows(self, feature: int) -> list[dict]:
        if not 0 <= feature < len(self.starts):
            return []
        start, stop = int(self.starts[feature]), int(self.stops[feature])
        return self.table.slice(start, stop - start).to_pylist()


@st.cache_resource(show_spinner="Loading feature data…", max_entries=32)
def _feature_rows(path: str, stamp: tuple) -> FeatureRows:
    return FeatureRows(pq.read_table(path))


@st.cache_resource(show_spinner="Loading feature table…", max_entries=16)
def _features_frame(path: str, stamp: tuple) -> pd.DataFrame:
    frame = pq.read_table(path).to_pandas()
    if "feature" not in frame.columns:
        raise DataProblem(f"{path} has no 'feature' column")
    return frame.set_index("feature", drop=False).sort_index()


def _analysis_file(run: Run, name: str, required: bool = True) -> Path | None:
    path = run.analysis / name
    if not path.exists():
        if required:
            raise DataProblem(f"{run.name}: {path} is missing: run `{analyze_hint(run)}` "
                              "(or wait until it finishes)")
        return None
    return path


def _load(loader, path: Path):
    try:
        return loader(str(path), _stamp(path))
    except DataProblem:
        raise
    except (OSError, pa.ArrowException, KeyError, ValueError) as error:
        raise DataProblem(f"{path} cannot be read (half-written? {error})") from None


def features(run: Run) -> pd.DataFrame:
    """features.parquet indexed by feature (cached; read-only)."""
    return _load(_features_frame, _analysis_file(run, "features.parquet"))


def feature_rows(run: Run, name: str, required: bool = True) -> FeatureRows | None:
    """One of the per-feature tables (top_examples, interval_examples, histograms, logit_effects)."""
    path = _analysis_file(run, f"{name}.parquet", required)
    return None if path is None else _load(_feature_rows, path)


def feature_record(frame: pd.DataFrame, feature: int) -> dict:
    if feature not in frame.index:
        raise DataProblem(f"feature {feature} is out of range (this run has features 0–{int(frame.index.max())})")
    return frame.loc[feature].to_dict()


def as_list(value) -> list:
    """A parquet list cell (list, numpy array or None) as a Python list."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return list(value)


@dataclass
class Decoder:
    """Unit-norm decoder rows of a run, for cosine look-ups across runs."""
    directions: np.ndarray                 # [d_sae, d_in] float32, rows of unit norm
    norms: np.ndarray = field(default=None)  # [d_sae] raw row norms


@st.cache_resource(show_spinner="Loading decoder…", max_entries=8)
def _decoder(path: str, stamp: tuple) -> Decoder:
    from safetensors import safe_open
    with safe_open(path, framework="np") as handle:
        names = list(handle.keys())
        if "W_dec" not in names:
            raise DataProblem(f"{path} holds no decoder (W_dec)")
        W_dec = handle.get_tensor("W_dec").astype(np.float32)   # [d_sae, d_in]
    norms = np.linalg.norm(W_dec, axis=1)
    return Decoder(directions=W_dec / np.maximum(norms, 1e-12)[:, None], norms=norms)


def decoder(run: Run) -> Decoder:
    path = run.path / "sae.safetensors"
    if not path.exists():
        raise DataProblem(f"{run.name} has no weights ({path} is missing)")
    return _load(_decoder, path)
