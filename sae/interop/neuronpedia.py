"""`sae export RUN --format neuronpedia OUT`: the analysed features in the form Neuronpedia's uploader takes.

Neuronpedia imports feature dashboards as the JSON batches SAEDashboard's NeuronpediaRunner writes
(sae_dashboard/neuronpedia/neuronpedia_dashboard.py: NeuronpediaDashboardBatch / Feature / Activation):

    OUT/batch-<n>.json      {"model_id", "layer", "sae_set", "features": [feature, ...]}, FEATURES_PER_BATCH each
    OUT/run_settings.json   what the batches were made from (run, store, options), as SAEDashboard writes it
    OUT/skipped_indexes.json  {"model_id", "layer", "sae_set", "log_sparsity", "skipped_indexes"}: dead latents
    OUT/explanations.json   where RUN/analysis/explanations.parquet exists (`sae explain`): one object per
                            explained feature, in Neuronpedia's explanation-export fields ("modelId", "layer"
                            = the SAE id "<layer>-<sae_set>", "index", "description", "explanationModelName",
                            "typeName") plus our scores

Each feature: `feature_index`; the logit table (`pos_str`/`pos_values`: promoted tokens, `neg_str`/
`neg_values`: suppressed, from analysis/logit_effects.parquet; empty without the model); `frac_nonzero`
(density); the activation histogram (`freq_hist_data_bar_values`: bin centres, `..._bar_heights`: counts);
`activations`: the top examples (`bin_min` −1, `bin_max` the feature's max activation, `bin_contains` −1,
as SAEDashboard marks its "TOP ACTIVATIONS" group) then the interval examples (their band's bounds, and
`bin_contains` the share of the feature's firing tokens in that band), each with its context's `tokens`
and the feature's code on each (`values`); `correlated_features_indices`/`_l1` the nearest features by
decoder cosine (SAEDashboard also puts cosines there); neuron tables and logit histograms stay empty.
Numbers are rounded to 3 decimals as SAEDashboard does; NaN/Inf never appear.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from sae.errors import UserError

FEATURES_PER_BATCH = 128
# the keys of one feature in a batch (NeuronpediaDashboardFeature.to_dict), and of one activation
FEATURE_KEYS = ("feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
                "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations")
ACTIVATION_KEYS = ("bin_min", "bin_max", "bin_contains", "tokens", "values")


def _r(value) -> float:
    value = float(value)
    return round(value, 3) if math.isfinite(value) else 0.0


def _floats(values) -> list[float]:
    return [_r(v) for v in (values if values is not None else [])]


def sae_set_name(config: dict) -> str:
    """Neuronpedia's SAE set: the site and variant, lower-case, dashes only (e.g. res-post-topk)."""
    text = f"{config.get('site') or 'sae'}-{config.get('variant') or ''}".lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _grouped(path: Path) -> dict[int, list[dict]]:
    import pyarrow.parquet as pq
    if not path.is_file():
        return {}
    groups: dict[int, list[dict]] = {}
    for row in pq.read_table(path).to_pylist():
        groups.setdefault(int(row["feature"]), []).append(row)
    return groups


def _activation(row: dict, lo: float, hi: float, contains: float) -> dict:
    return {"bin_min": _r(lo), "bin_max": _r(hi), "bin_contains": _r(contains),
            "tokens": [str(t) for t in row.get("tokens") or []], "values": _floats(row.get("acts"))}


def feature_record(feature: dict, tops: list[dict], intervals: list[dict], logits: dict | None,
                   histogram: dict | None, edges: list[float], n_prompts: int, context: int, dataset: str) -> dict:
    """One feature in NeuronpediaDashboardFeature's layout (FEATURE_KEYS, in that order)."""
    centres, heights = [], []
    if histogram is not None and edges:
        counts = list(histogram["counts"])
        centres = [_r((edges[i] + edges[i + 1]) / 2) for i in range(min(len(counts), len(edges) - 1))]
        heights = [_r(c) for c in counts[:len(centres)]]
    fired = max(1.0, float(feature.get("n_fired") or 0))
    activations = [_activation(row, -1, feature.get("max_activation") or 0.0, -1)
                   for row in sorted(tops, key=lambda r: r["rank"])]
    by_band: dict[int, list[dict]] = {}
    for row in intervals:
        by_band.setdefault(int(row.get("band", 0)), []).append(row)
    for band in sorted(by_band, reverse=True):          # strongest band first, as SAEDashboard orders them
        rows = by_band[band]
        lo, hi = rows[0].get("band_lo", 0.0), rows[0].get("band_hi", 0.0)
        in_band = sum(h for c, h in zip(centres, heights) if lo <= c < hi) if centres else 0.0
        activations += [_activation(row, lo, hi, in_band / fired) for row in rows]
    record = {key: [] for key in FEATURE_KEYS}
    record.update({
        "feature_index": int(feature["feature"]),
        "correlated_features_indices": [int(i) for i in feature.get("nearest") or []],
        "correlated_features_l1": _floats(feature.get("nearest_cos")),
        "neg_str": [str(t) for t in (logits or {}).get("suppressed") or []],
        "neg_values": _floats((logits or {}).get("suppressed_values")),
        "pos_str": [str(t) for t in (logits or {}).get("promoted") or []],
        "pos_values": _floats((logits or {}).get("promoted_values")),
        "frac_nonzero": _r(feature.get("density") or 0.0),
        "freq_hist_data_bar_values": centres, "freq_hist_data_bar_heights": heights,
        "n_prompts_total": int(n_prompts), "n_tokens_in_prompt": int(context), "dataset": str(dataset or ""),
        "activations": activations})
    return record


def write_neuronpedia(run_dir, out: Path, model_id: str | None = None, sae_set: str | None = None) -> dict:
    """Write the batches (and explanations) of RUN/analysis into `out`; returns counts for the summary line."""
    import pyarrow.parquet as pq

    from sae.files import read_json, write_json
    run_dir, out = Path(run_dir), Path(out)
    analysis = run_dir / "analysis"
    if not (analysis / "features.parquet").is_file():
        raise UserError(f"{run_dir} has no analysis/features.parquet: run `sae analyze --run {run_dir} "
                        f"--activations STORE` first")
    config = read_json(run_dir / "config.json", "the run's config") or {}
    meta = read_json(analysis / "meta.json", "the analysis's meta.json", missing_ok=True) or {}
    model_id = model_id or re.sub(r"[^a-z0-9.]+", "-", str(config.get("model") or "model").split("/")[-1].lower())
    sae_set = sae_set or sae_set_name(config)
    layer = config.get("layer")
    layer = int(layer) if str(layer).lstrip("-").isdigit() else 0
    features = pq.read_table(analysis / "features.parquet").to_pylist()
    tops, intervals = _grouped(analysis / "top_examples.parquet"), _grouped(analysis / "interval_examples.parquet")
    logits = {f: rows[0] for f, rows in _grouped(analysis / "logit_effects.parquet").items()}
    histograms = {f: rows[0] for f, rows in _grouped(analysis / "histograms.parquet").items()}
    edges = [float(e) for e in meta.get("hist_bin_edges") or []]
    context = int(config.get("context_size") or 2 * int(meta.get("context_radius") or 0) + 1)
    n_prompts = int(meta.get("n_tokens") or 0) // max(1, int(config.get("context_size") or 1))
    records = [feature_record(f, tops.get(int(f["feature"]), []), intervals.get(int(f["feature"]), []),
                              logits.get(int(f["feature"])), histograms.get(int(f["feature"])), edges, n_prompts,
                              context, config.get("dataset") or "")
               for f in sorted(features, key=lambda f: int(f["feature"]))]
    skipped = [r["feature_index"] for r in records if not r["activations"]]     # never fired: no dashboard
    shown = [r for r in records if r["activations"]]
    n_batches = 0
    for n_batches, start in enumerate(range(0, len(shown), FEATURES_PER_BATCH), 1):
        write_json(out / f"batch-{n_batches - 1}.json", {"model_id": model_id, "layer": layer, "sae_set": sae_set,
                                                         "features": shown[start:start + FEATURES_PER_BATCH]})
    write_json(out / "skipped_indexes.json", {"model_id": model_id, "layer": str(layer), "sae_set": sae_set,
                                              "log_sparsity": None, "skipped_indexes": skipped})
    write_json(out / "run_settings.json", {"model_id": model_id, "layer": layer, "sae_set": sae_set,
                                           "sae_path": str(run_dir), "variant": config.get("variant"),
                                           "hook_site": config.get("site"), "d_sae": config.get("d_sae"),
                                           "huggingface_dataset_path": config.get("dataset"),
                                           "n_prompts_total": n_prompts, "n_tokens_in_prompt": context,
                                           "n_features_at_a_time": FEATURES_PER_BATCH, "exported_by": "sae"})
    n_explained = _write_explanations(analysis / "explanations.parquet", out / "explanations.json", model_id,
                                      f"{layer}-{sae_set}")
    return {"features": len(shown), "skipped": len(skipped), "batches": n_batches, "explanations": n_explained}


def _write_explanations(path: Path, target: Path, model_id: str, sae_id: str) -> int:
    import pyarrow.parquet as pq

    from sae.files import write_json
    if not path.is_file():
        return 0
    rows = pq.read_table(path).to_pylist()
    score_names = ("detection", "fuzzing", "embedding")
    write_json(target, [{"modelId": model_id, "layer": sae_id, "index": str(int(row["feature"])),
                         "description": str(row.get("explanation") or ""),
                         "explanationModelName": str(row.get("explainer") or ""),
                         "typeName": "sae-explain",
                         "scores": {name: _r(row[name]) for name in score_names + tuple(f"{n}_control" for n in
                                                                                        score_names)
                                    if row.get(name) is not None}}
                        for row in rows])
    return len(rows)
