"""Scoring a trained SAE on a store's held-out documents (metric definitions in docs/files.md).

evaluate() returns the eval.json dict: reconstruction (mse, fvu, explained_variance, cosine_similarity,
l2_ratio), sparsity (l0, dead_fraction, the log10-density histogram), the variant's extra metrics (vq
perplexity, ...), downstream next-token figures on held-out windows (clean / spliced / zero-ablated CE
in one tokenisation and batch, KL divergences), and sparse probing on labelled stores.
Special-token rows (BOS, EOS, padding) are left out of every figure; in the downstream runs those
positions keep their original activation.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sae.errors import UserError
from sae.runs import check_run_store
from sae.evaluate.probing import DocumentPool, sparse_probing
from sae.evaluate.scores import held_out_batches, is_special, score, special_token_ids
from sae.store import ActivationStore, is_held_out
from sae.files import write_json

EVAL_FILE = "eval.json"


# ---- inputs --------------------------------------------------------------------------------------
def open_run(run, device="cpu"):
    """(sae module, run config, run_dir | None) from a run folder or an SAE module."""
    if isinstance(run, torch.nn.Module):
        return run, dict(getattr(run, "run_config", {}) or {}), None
    from sae.runs import CONFIG, WEIGHTS, load, read_config
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run folder (no such directory)")
    config = read_config(run_dir) if (run_dir / CONFIG).is_file() else {}
    if "variant" in config and not (run_dir / WEIGHTS).is_file():
        raise UserError(f"{run_dir} has no weights ({WEIGHTS} is missing): was its training finished?")
    model = load(run_dir, device=device)  # other tools' layouts (SAELens, sparsify) go through sae.interop
    return model, config or dict(getattr(model, "run_config", {}) or {}), run_dir


# ---- sparse probing ------------------------------------------------------------------------------
@torch.no_grad()
def probing_metrics(sae, store: ActivationStore, layer, special_ids: set[int], batch_size: int = 4096,
                    device="cpu", max_rows: int = 200_000, seed: int = 0, progress: bool = True) -> dict | None:
    """Mean-pool codes and raw activations per labelled document, then sae.probing.sparse_probing; the
    targeted probe perturbation figures (sae.evaluate.tpp) on the same documents under the key "tpp".
    Whole documents are drawn (fixed order) until max_rows rows."""
    doc_ids, labels = store.column("doc_id"), store.column("label")
    usable = labels >= 0
    if "token_ids" in store.tensor_names(0):
        usable &= ~is_special(store.column("token_ids"), special_ids)
    if len(torch.unique(labels[usable])) < 2:
        return None  # one label: there is no one-vs-rest task to probe
    docs, rows_per_doc = torch.unique(doc_ids[usable], return_counts=True)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(1234))
    chosen = docs[order][rows_per_doc[order].cumsum(0) <= max_rows]
    rows = (usable & torch.isin(doc_ids, chosen)).nonzero().squeeze(1)  # sorted global indices
    if len(rows) == 0:
        return None
    code_pool, raw_pool = DocumentPool(), DocumentPool()
    for lo in tqdm(range(0, len(rows), batch_size), desc="probe", disable=None if progress else True, leave=False):
        index = rows[lo:lo + batch_size]
        x = store.rows(layer, index).to(device)  # [batch, d_in]
        code_pool.add(doc_ids[index], sae.encode(x).float())
        raw_pool.add(doc_ids[index], x)
    pooled_docs, codes = code_pool.means()
    _, raw = raw_pool.means()
    first_row = {}
    for doc, label in zip(doc_ids[rows].tolist(), labels[rows].tolist()):
        first_row.setdefault(doc, label)
    doc_labels = np.array([first_row[int(d)] for d in pooled_docs], dtype=np.int64)
    probing = sparse_probing(pooled_docs, doc_labels, codes, raw, seed=seed)
    if probing is not None and hasattr(sae, "W_dec") and not getattr(sae, "is_transcoder", False):
        from sae.evaluate.tpp import tpp_score
        W_dec = sae.W_dec_raw if hasattr(sae, "W_dec_raw") else sae.W_dec       # [d_sae, d_in] raw units
        probing["tpp"] = tpp_score(pooled_docs, doc_labels, codes, raw, W_dec, seed=seed)
    return probing


# ---- downstream --------------------------------------------------------------------------------
def held_out_windows(store: ActivationStore, special_ids: set[int], max_windows: int):
    """Windows holding held-out rows: (input_ids [w, ctx], loss_mask [w, ctx], keep_mask [w, ctx]).

    loss_mask marks positions whose row belongs to a held-out document, is not a special token and has a
    next token; keep_mask marks special-token positions (they keep the original activation)."""
    inputs, losses = [], []
    for shard_index in range(len(store.shards)):
        window_tokens = store.read_shard(shard_index, "window_tokens").long()  # [w, ctx]
        window_index = store.read_shard(shard_index, "window_index").long()  # [n]
        position = store.read_shard(shard_index, "position").long()  # [n]
        held = is_held_out(store.read_shard(shard_index, "doc_id"))
        valid = torch.zeros(window_tokens.shape, dtype=torch.bool)
        valid[window_index[held], position[held]] = True
        for w in valid.any(dim=1).nonzero().squeeze(1).tolist():
            inputs.append(window_tokens[w])
            losses.append(valid[w])
            if len(inputs) >= max_windows:
                break
        if len(inputs) >= max_windows:
            break
    if not inputs:
        return None
    input_ids, loss_mask = torch.stack(inputs), torch.stack(losses)
    keep_mask = is_special(input_ids, special_ids)
    loss_mask &= ~keep_mask
    loss_mask[:, -1] = False  # no next token
    return input_ids, loss_mask, keep_mask


def _next_token_stats(logits: torch.Tensor, clean_logp: torch.Tensor | None, input_ids, mask):
    """(CE sum, KL-from-clean sum, log-probs) over masked positions. logits [b, ctx, vocab]."""
    logp = logits.float().log_softmax(dim=-1)  # [b, ctx, vocab]
    targets = input_ids[:, 1:].unsqueeze(-1)  # [b, ctx-1, 1]
    token_logp = logp[:, :-1].gather(-1, targets).squeeze(-1)  # [b, ctx-1]
    positions = mask[:, :-1]
    ce = float(-token_logp[positions].sum())
    kl = 0.0
    if clean_logp is not None:
        kl_per = (clean_logp.exp() * (clean_logp - logp)).sum(dim=-1)  # [b, ctx]
        kl = float(kl_per[mask].sum())
    return ce, kl, logp


@torch.no_grad()
def downstream_many(saes: dict, loaded, site: str, layer, windows, batch_size: int = 4, device="cpu",
                    progress: bool = True) -> dict[str, dict]:
    """Clean, spliced and zero-ablated next-token CE (and KL from clean) on the same windows and batches,
    for several SAEs at once: each batch's clean and zero-ablated runs are shared by all of them."""
    from sae.evaluate.splice import zero_ablate

    lm = loaded.model
    input_ids, loss_mask, keep_mask = windows
    n_positions = int(loss_mask.sum())
    if n_positions == 0:
        raise UserError("the held-out windows have no positions to score (all are special tokens)")
    shared = {"clean": 0.0, "zero": 0.0, "kl_zero": 0.0}
    spliced = {name: {"ce": 0.0, "kl": 0.0} for name in saes}
    for lo in tqdm(range(0, len(input_ids), batch_size), desc="downstream", disable=None if progress else True,
                   leave=False):
        ids = input_ids[lo:lo + batch_size].to(device)  # [b, ctx]
        mask = loss_mask[lo:lo + batch_size].to(device)
        keep = keep_mask[lo:lo + batch_size].to(device)
        ce, _, clean_logp = _next_token_stats(lm(input_ids=ids, use_cache=False).logits, None, ids, mask)
        shared["clean"] += ce
        with zero_ablate(lm, site, layer, keep_mask=keep):
            ce, kl, _ = _next_token_stats(lm(input_ids=ids, use_cache=False).logits, clean_logp, ids, mask)
        shared["zero"] += ce
        shared["kl_zero"] += kl
        for name, sae in saes.items():
            with _splice(lm, sae, site, layer, keep):
                ce, kl, _ = _next_token_stats(lm(input_ids=ids, use_cache=False).logits, clean_logp, ids, mask)
            spliced[name]["ce"] += ce
            spliced[name]["kl"] += kl
            if getattr(sae, "is_transcoder", False):   # with its error term: the clean loss, exactly
                with _splice(lm, sae, site, layer, keep, error_term=True):
                    ce, _, _ = _next_token_stats(lm(input_ids=ids, use_cache=False).logits, None, ids, mask)
                spliced[name]["ce_error_term"] = spliced[name].get("ce_error_term", 0.0) + ce
    clean, zero, kl_zero = (shared[key] / n_positions for key in ("clean", "zero", "kl_zero"))
    results = {}
    for name, totals in spliced.items():
        ce, kl = totals["ce"] / n_positions, totals["kl"] / n_positions
        results[name] = {
            "ce_loss_clean": clean,
            "ce_loss_spliced": ce,
            "ce_loss_zero_ablated": zero,
            "ce_loss_recovered": (zero - ce) / (zero - clean) if abs(zero - clean) > 1e-12 else None,
            "kl_div_spliced": kl,
            "kl_div_zero_ablated": kl_zero,
            "kl_div_score": (kl_zero - kl) / kl_zero if kl_zero > 1e-12 else None,
            "downstream_windows": len(input_ids),
            "downstream_tokens": n_positions,
            **({"ce_loss_error_term": totals["ce_error_term"] / n_positions} if "ce_error_term" in totals else {}),
        }
    return results


def _splice(lm, sae, site: str, layer, keep, error_term: bool = False):
    """The SAE's reconstruction at the site; a transcoder's prediction from its input site at `site`, its
    target site (sae.evaluate.transcode)."""
    if getattr(sae, "is_transcoder", False):
        from sae.evaluate.transcode import splice_transcoder
        return splice_transcoder(lm, sae, layer, keep_mask=keep, target_site=site, error_term=error_term)
    from sae.evaluate.splice import splice
    return splice(lm, sae, site, layer, keep_mask=keep)


def downstream_metrics(sae, loaded, site: str, layer, windows, batch_size: int = 4, device="cpu",
                       progress: bool = True) -> dict:
    """downstream_many for one SAE."""
    return downstream_many({"sae": sae}, loaded, site, layer, windows, batch_size, device, progress)["sae"]


def load_store_model(store: ActivationStore, device="cpu", model_dtype="auto"):
    """(LoadedModel, None) or (None, reason it cannot be used for next-token figures).
    model_dtype: auto|float32|bfloat16|float16 (auto: bf16 on CUDA, fp32 on the CPU)."""
    name = store.manifest.get("model")
    if not name:
        return None, "the store does not name the model it came from"
    from sae.lm import load_model
    try:
        loaded = load_model(name, device=device, dtype=model_dtype)
    except UserError as error:
        return None, f"the store's model {name!r} could not be loaded ({error})"
    return loaded, None


# ---- the whole evaluation -------------------------------------------------------------------------
def evaluate(run, store, layer=None, with_model: bool = True, device="cpu", batch_size: int = 4096,
             loaded_model=None, max_windows: int = 64, lm_batch_size: int = 4, probe: bool = True,
             probe_max_rows: int = 200_000, seed: int = 0, write: bool = True, progress: bool = True,
             model_dtype: str = "auto", allow_incomplete: bool = False, absorption: bool = True) -> dict:
    """Score a run (folder or SAE module) on a store's held-out documents; write RUN/eval.json.

    loaded_model: a sae.models.LoadedModel to use instead of loading the store's model.
    """
    device = torch.device(device)
    from sae.lm.loading import loaded_dtype, parse_model_dtype
    parse_model_dtype(model_dtype, device)   # a bad value is refused before any work
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    sae, config, run_dir = open_run(run, device)
    sae = sae.to(device).eval()
    layer = check_run_store(config, store, layer, allow_incomplete)
    if store.split_size("held_out") == 0:
        raise UserError(f"the store {store.path} has no held-out documents (rule: "
                        f"{store.manifest.get('held_out', {}).get('rule', 'doc_id based')}); collect more documents")
    site = config.get("site") or store.manifest.get("site")
    transcoder = bool(getattr(sae, "is_transcoder", False))
    if transcoder:   # scored on the target site's rows; downstream, that site is zero-ablated and replaced
        site = config.get("target_site") or store.target_site
    loaded, reason = (loaded_model if with_model else None), None
    if with_model and loaded is None:
        if not store.has_windows:
            reason = "the store has no window_tokens, so there is no model input to replay"
        else:
            loaded, reason = load_store_model(store, device, model_dtype)
    elif not with_model:
        reason = "skipped (--no-model)"
    special_ids = special_token_ids(store, loaded)
    threshold = None if getattr(sae, "signed_codes", False) else sae.fire_threshold
    result = {"variant": config.get("variant", getattr(sae, "name", None)), "layer": layer, "site": site,
              **({"transcoder": True, "input_site": config.get("site") or store.manifest.get("site"),
                  "skip": bool(getattr(sae, "skip", False))} if transcoder else {}),
              "store": str(store.path), "store_digest": store.digest, "d_sae": sae.d_sae,
              "fire_threshold": threshold}
    if run_dir is not None:
        from sae.runs import weights_digest
        result["weights_digest"] = weights_digest(run_dir)
    scores = score(sae, held_out_batches(store, layer, special_ids, batch_size, targets=transcoder), device,
                   total=store.split_size("held_out"), progress=progress)
    if scores is None:
        raise UserError("the store has no held-out tokens to evaluate on (all rows are special tokens)")
    result.update(scores)
    if probe and store.has_labels:
        probing = probing_metrics(sae, store, layer, special_ids, batch_size, device, probe_max_rows, seed, progress)
        if probing is not None:
            tpp = probing.pop("tpp", None)
            result.update(tpp or {})
            result["sparse_probing"] = probing
        else:
            result["sparse_probing_skipped"] = ("too few labelled documents: each label needs positive and "
                                                "negative documents on both sides of the fixed 4/5–1/5 split")
    if absorption and not transcoder:     # first-letter absorption (sae.evaluate.absorption)
        from sae.evaluate.absorption import store_absorption
        figures, why = store_absorption(sae, store, layer, special_ids, getattr(loaded, "tokenizer", None), device,
                                        seed)
        result.update(figures or {"absorption_skipped": why})
    if loaded is not None:
        if not getattr(loaded, "is_causal", True):
            reason = f"{getattr(loaded, 'family', 'this')} is an encoder-only model: it has no next-token loss"
        elif not store.has_windows:
            reason = "the store has no window_tokens, so there is no model input to replay"
        elif site is None:
            reason = "neither the run nor the store names the site to splice"
        else:
            windows = held_out_windows(store, special_ids, max_windows)
            if windows is None:
                reason = "no held-out windows in the store"
            else:
                loaded.model.to(device)
                result.update(downstream_metrics(sae, loaded, site, layer, windows, lm_batch_size, device, progress))
                result["model_dtype"] = loaded_dtype(loaded)
                reason = None
    if reason:
        result["downstream_skipped"] = reason
    if write and run_dir is not None:
        write_json(run_dir / EVAL_FILE, _json_safe(result))
    return _json_safe(result)


def _json_safe(obj):
    """NaN/inf -> None so eval.json stays strict JSON."""
    if isinstance(obj, dict):
        return {key: _json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(value) for value in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---- printing ---------------------------------------------------------------------------------------
def format_table(result: dict) -> str:
    """A readable two-column table of the headline figures."""
    rows = [("variant", result.get("variant")), ("layer", result.get("layer")), ("site", result.get("site")),
            ("held-out tokens", result.get("n_tokens"))]
    for key in ("mse", "fvu", "fvu_sparse", "explained_variance", "cosine_similarity", "l2_ratio", "l0", "dead_fraction",
                "perplexity", "usage", "active_dims", "active_units", "absorption", "absorption_full_rate",
                "absorption_split_features", "tpp", "tpp_raw", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated",
                "ce_loss_recovered", "ce_loss_error_term", "kl_div_spliced", "kl_div_zero_ablated", "kl_div_score"):
        if key in result:
            rows.append((key, result[key]))
    probing = result.get("sparse_probing")
    if probing:
        for key in ("1", "2", "5", "full"):
            rows.append((f"sparse probing k={key}" if key != "full" else "sparse probing (raw, full)", probing[key]))
    if result.get("sparse_probing_skipped"):
        rows.append(("sparse probing", f"absent: {result['sparse_probing_skipped']}"))
    if result.get("downstream_skipped"):
        rows.append(("downstream", f"absent: {result['downstream_skipped']}"))
    width = max(len(name) for name, _ in rows)

    def show(value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)
    return "\n".join(f"{name:<{width}}  {show(value)}" for name, value in rows)
