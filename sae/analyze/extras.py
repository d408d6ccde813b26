"""Per-feature facts that need no pass over the store: nearest features by decoder cosine, logit
effects through the model's unembedding, and token decoding for the analysis tables."""
from __future__ import annotations

import torch

LAYER_NORM_FAMILIES = {"gpt2", "gpt_neox", "bert", "gptj", "opt", "phi", "roberta", "distilbert", "bloom"}


@torch.no_grad()
def nearest_features(W_dec: torch.Tensor, k: int = 10, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """The k other latents whose decoder rows have the largest cosine with each latent's.

    W_dec: [d_sae, d_in]. Returns (indices [d_sae, k] int64, cosines [d_sae, k] float32), best first.
    """
    d_sae = W_dec.shape[0]
    k = min(k, d_sae - 1)
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)    # [d_sae, d_in]
    indices = torch.empty(d_sae, max(k, 0), dtype=torch.int64)
    cosines = torch.empty(d_sae, max(k, 0), dtype=torch.float32)
    if k <= 0:
        return indices, cosines
    for lo in range(0, d_sae, chunk):
        hi = min(lo + chunk, d_sae)
        sims = unit[lo:hi] @ unit.T                                                       # [chunk, d_sae]
        own = torch.arange(lo, hi, device=sims.device)
        sims[own - lo, own] = float("-inf")                                               # not its own neighbour
        values, picks = sims.topk(k, dim=1)
        indices[lo:hi], cosines[lo:hi] = picks.cpu(), values.cpu()
    return indices, cosines


def fold_final_norm(directions: torch.Tensor, norm_weight: torch.Tensor | None, family: str | None) -> torch.Tensor:
    """What the final norm does to a small added direction: LayerNorm families remove the mean, then
    every family multiplies by the norm's scale (RMSNorm: scale only). directions: [n, d_model]."""
    if family in LAYER_NORM_FAMILIES:
        directions = directions - directions.mean(dim=1, keepdim=True)
    if norm_weight is not None:
        directions = directions * norm_weight.to(directions)[None, :]
    return directions


@torch.no_grad()
def logit_effects(W_dec_raw: torch.Tensor, W_U: torch.Tensor, norm_weight: torch.Tensor | None,
                  family: str | None, k: int = 10, chunk: int = 1024):
    """The k most promoted and most suppressed vocabulary entries per latent.

    W_dec_raw: [d_sae, d_model] decoder rows in the model's units; W_U: [vocab, d_model].
    Returns (promoted_ids, promoted_values, suppressed_ids, suppressed_values), each [d_sae, k].
    """
    W_U = W_U.float()
    k = min(k, W_U.shape[0])
    out = [[], [], [], []]
    for lo in range(0, W_dec_raw.shape[0], chunk):
        directions = fold_final_norm(W_dec_raw[lo:lo + chunk].float().to(W_U.device), norm_weight, family)
        logits = directions @ W_U.T                                                       # [chunk, vocab]
        up_values, up_ids = logits.topk(k, dim=1)
        down_values, down_ids = logits.topk(k, dim=1, largest=False)
        for bucket, part in zip(out, (up_ids, up_values, down_ids, down_values)):
            bucket.append(part.cpu())
    return tuple(torch.cat(parts) for parts in out)


def token_strings(tokenizer, ids) -> dict[int, str]:
    """Decoded text of each distinct token id, each decoded on its own (' the' rather than 'Ġthe'; "[id]" when
    there is no tokenizer or the id is outside it). Used by the analysis tables and the dashboard's probe."""
    unique = sorted({int(i) for i in ids})
    if tokenizer is None:
        return {i: f"[{i}]" for i in unique}
    strings = {}
    for i in unique:
        try:
            strings[i] = tokenizer.decode([i])
        except Exception:  # an id outside the vocabulary: show the number  # noqa: BLE001
            strings[i] = f"[{i}]"
    return strings


def try_load_tokenizer(model_name, local_only: bool = True):
    """The store's tokenizer, or (None, reason) when it cannot be loaded offline (never from the hub unless
    local_only is False: `analyze --no-model` promises not to fetch the model)."""
    if not model_name:
        return None, "the store names no model"
    try:
        from sae.lm import load_tokenizer
        return load_tokenizer(model_name, local_only=local_only), None
    except Exception as error:  # missing module, no local copy, ...  # noqa: BLE001
        return None, f"tokenizer for {model_name} not available ({type(error).__name__}: {error})"


def try_unembedding(model_name, model_dtype="auto"):
    """(W_U, final_norm_weight, family) of the store's model, or (None, reason)."""
    if not model_name:
        return None, "the store names no model"
    try:
        from sae.lm import load_model, unembedding
        loaded = load_model(model_name, dtype=model_dtype)
        W_U, norm_weight = unembedding(loaded)
        return (W_U.detach().float().cpu(), None if norm_weight is None else norm_weight.detach().float().cpu(),
                getattr(loaded, "family", None)), None
    except Exception as error:  # noqa: BLE001
        return None, f"model {model_name} could not be loaded ({type(error).__name__}: {error})"
