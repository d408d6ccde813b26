"""The one held-out scorer: an SAE's reconstruction and sparsity figures on held-out rows, used by
`sae eval` (eval.json) and by training's summary (train_summary.json), so the two always agree.

Held-out rows are the store's held-out documents (the manifest's doc_id rule) minus special-token rows
(BOS, EOS, padding); live training passes rows it already filtered the same way.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

DENSITY_EDGES = [float(e) for e in np.linspace(-7.0, 0.0, 29)]  # log10 density bins, 0.25 wide
EXTRA_METRIC_ROWS = 16384                                        # rows the variant's extra metrics see


def special_token_ids(store, loaded=None) -> set[int]:
    """BOS/EOS/pad ids: from the loaded model, the manifest, or the store's model's tokenizer."""
    if loaded is not None and getattr(loaded, "special_ids", None) is not None:
        return {int(i) for i in loaded.special_ids}
    for key in ("special_ids", "special_token_ids"):
        if store.manifest.get(key) is not None:
            return {int(i) for i in store.manifest[key]}
    if store.manifest.get("special_tokens_kept") is False:
        return set()  # `sae collect` left them out of the store: no row to exclude
    name = store.manifest.get("model")
    if name and store.shards and "token_ids" in store.tensor_names(0):
        try:
            from sae.lm import load_tokenizer
            tokenizer = load_tokenizer(name)
            ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
            ids |= set(getattr(tokenizer, "all_special_ids", []) or [])
            return {int(i) for i in ids if i is not None}
        except Exception:  # no tokenizer offline: nothing to exclude by id
            return set()
    return set()


def is_special(token_ids: torch.Tensor, special_ids: set[int]) -> torch.Tensor:
    """[n] token ids -> [n] bool: the rows that hold a special token."""
    if not special_ids:
        return torch.zeros(token_ids.shape, dtype=torch.bool)
    return torch.isin(token_ids.long(), torch.tensor(sorted(special_ids), dtype=torch.long))


def held_out_batches(store, layer, special_ids: set[int], batch_size: int = 4096,
                     max_rows: int | None = None, targets: bool = False) -> Iterator[torch.Tensor]:
    """The store's held-out rows that are not special tokens, as [b, d_model] batches in store order;
    targets=True: pairs (input rows, the same rows of the store's target site), what a transcoder is scored on."""
    has_tokens = "token_ids" in store.tensor_names(0)   # read beside each batch: no whole-store column
    left = max_rows
    for x, indices in store.iter_rows(layer, batch_size, split="held_out"):
        if not bool(torch.isfinite(x).all()):
            from sae.errors import UserError
            raise UserError(f"{store.path} is damaged: it holds NaN or Inf activations among its held-out rows")
        y = store.rows(layer, indices, "targets") if targets else None             # [b, d_model]
        if has_tokens and special_ids:
            keep = ~is_special(store.take("token_ids", indices), special_ids)
            x, y = x[keep], (None if y is None else y[keep])
        if left is not None:
            x, y = x[:left], (None if y is None else y[:left])
            left -= len(x)
        if len(x):
            yield x if y is None else (x, y)
        if left is not None and left <= 0:
            return


@torch.no_grad()
def score(model, batches: Iterable[torch.Tensor], device="cpu", total: int | None = None,
          progress: bool = False) -> dict | None:
    """FVU, explained variance, MSE (per element), cosine similarity, L2 ratio, L0, dead fraction and the
    log10-density histogram of `model` (raw units in and out) over the rows of `batches`; None without rows.
    Signed-code variants (linear, vae) get null L0 / dead fraction. Plus the variant's extra metrics.
    A batch may be a pair (input, target): a transcoder's prediction from the input is scored against the target.
    Variants whose codes are not exactly zero below their firing threshold τ > 0 (kl) also get fvu_sparse:
    the FVU of decode(codes · 1[codes > τ]), the reconstruction their L0 describes."""
    model.eval()
    n = 0
    sq_err = x_sq = cos_sum = ratio_sum = 0.0
    tau = None if getattr(model, "signed_codes", False) else getattr(model, "fire_threshold", None)
    sparse_err = 0.0 if tau is not None and float(tau) > 0 else None
    x_sum = fire_counts = None
    extra_sample, extra_rows = [], 0
    wants_extra = hasattr(model, "extra_metrics")
    bar = tqdm(total=total, desc="eval", unit="tok", disable=None if progress else True, leave=False)
    for x in batches:
        x, target = x if isinstance(x, tuple) else (x, None)
        bar.update(len(x))
        x = x.to(device).float()                       # [b, d_in]
        x_hat, counts = _reconstruct(model, x)         # [b, d_in], [d_sae] (None for signed codes)
        if sparse_err is not None:
            codes = model.encode(x)                    # [b, d_sae]
            x_sparse = model.decode(codes * (codes > tau)).double()           # [b, d_in]
        if target is not None:                         # a transcoder: its prediction against the target rows
            x = target.to(device).float()              # [b, d_in]
        x64, x_hat64 = x.double(), x_hat.double()
        n += len(x)
        sq_err += float((x64 - x_hat64).pow(2).sum())
        if sparse_err is not None:
            sparse_err += float((x64 - x_sparse).pow(2).sum())
        x_sum = x64.sum(dim=0) if x_sum is None else x_sum + x64.sum(dim=0)
        x_sq += float(x64.pow(2).sum())
        cos_sum += float(torch.nn.functional.cosine_similarity(x_hat64, x64, dim=1, eps=1e-12).sum())
        ratio_sum += float((x_hat64.norm(dim=1) / x64.norm(dim=1).clamp_min(1e-12)).sum())
        if counts is not None:
            fire_counts = counts.double() if fire_counts is None else fire_counts + counts.double()
        if wants_extra and extra_rows < EXTRA_METRIC_ROWS:
            extra_sample.append(x[:EXTRA_METRIC_ROWS - extra_rows])
            extra_rows += len(extra_sample[-1])
    bar.close()
    if n == 0:
        return None
    total_var = x_sq - float(x_sum.pow(2).sum()) / n   # Σ‖x − mean(x)‖²
    fvu = sq_err / total_var if total_var > 0 else float("nan")
    result = {"n_tokens": n, "mse": sq_err / (n * x_sum.numel()), "fvu": fvu, "explained_variance": 1.0 - fvu,
              "cosine_similarity": cos_sum / n, "l2_ratio": ratio_sum / n,
              "l0": None, "dead_fraction": None, "density_histogram": None}
    if sparse_err is not None:
        result["fvu_sparse"] = sparse_err / total_var if total_var > 0 else float("nan")
    if fire_counts is not None:
        fire_counts = fire_counts.cpu()                # [d_sae]
        density = fire_counts / n
        result["l0"] = float(fire_counts.sum()) / n
        result["dead_fraction"] = float((fire_counts == 0).double().mean())
        log_density = torch.log10(density[density > 0]).clamp(min=DENSITY_EDGES[0]).numpy()
        histogram, _ = np.histogram(log_density, bins=DENSITY_EDGES)
        result["density_histogram"] = {"log10_density_edges": DENSITY_EDGES, "counts": histogram.tolist(),
                                       "n_dead": int((fire_counts == 0).sum())}
    if extra_sample:
        sample = torch.cat(extra_sample)
        extra = model.extra_metrics(sample.to(model.input_scale.dtype) * model.input_scale)
        result.update({key: float(value) for key, value in (extra or {}).items()})
    return result


def _reconstruct(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SAE.reconstruct where the module has it (sparse variants skip dense codes), else decode(encode(x))."""
    if hasattr(model, "reconstruct"):
        return model.reconstruct(x)
    codes = model.encode(x)                                             # [b, d_sae]
    threshold = None if getattr(model, "signed_codes", False) else getattr(model, "fire_threshold", 0.0)
    return model.decode(codes), None if threshold is None else (codes > threshold).sum(dim=0)


def summary_scores(result: dict | None) -> dict | None:
    """The figures a training summary keeps (rows, fvu, mse, l0, dead_fraction) of a score() result."""
    if result is None:
        return None
    return {"rows": result["n_tokens"], **{k: result[k] for k in ("fvu", "mse", "l0", "dead_fraction")},
            **({"fvu_sparse": result["fvu_sparse"]} if "fvu_sparse" in result else {})}
