"""What needs the run's language model: the live probe, loss effect and steering.

Plain functions of (LoadedModel, SAE, site, layer, …) so that tests can check them without Streamlit;
the pages call them through the st.cache_resource loaders at the bottom. torch, transformers and
sae.models are imported inside functions so that the other pages open without them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Probe:
    token_ids: list[int]
    tokens: list[str]               # decoded, one string per token
    special: list[bool]             # BOS/EOS/padding: left out of the feature ranking
    top_features: np.ndarray        # [seq, k] int: strongest features per token
    top_values: np.ndarray          # [seq, k] float: their codes
    feature_max: dict               # feature -> max code over the non-special tokens
    feature_mean: dict              # feature -> mean code over the non-special tokens
    feature_count: dict             # feature -> number of tokens where it fires
    codes_of: dict                  # feature -> [seq] codes, for the features in the ranking


def encode_text(loaded, text: str, max_tokens: int = 512) -> list[int]:
    """Token ids as the collector fed them: BOS first (when the model has one), then the text."""
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens - 1]
    if loaded.bos_id is not None and loaded.is_causal:
        ids = [int(loaded.bos_id)] + list(ids)
    return [int(i) for i in ids]


def site_activations(loaded, site: str, layer, token_ids) -> "torch.Tensor":
    """[len(token_ids), d_model] activation at the hooked site, the forward cut after that layer."""
    import torch
    from sae.lm import capture, run_until_captured
    input_ids = torch.tensor([token_ids], device=_device(loaded))
    with torch.no_grad(), capture(loaded, site, [layer]) as captured:
        run_until_captured(loaded, input_ids=input_ids)
    return captured[layer][0].float()


def _device(loaded):
    return next(loaded.model.parameters()).device


def _sae_input(sae_model, x):
    param = next(sae_model.parameters(), None)
    return x if param is None else x.to(device=param.device, dtype=param.dtype)


def codes_for(sae_model, activations) -> "torch.Tensor":
    """[n, d_in] -> [n, d_sae] codes, no gradient."""
    import torch
    with torch.no_grad():
        return sae_model.encode(_sae_input(sae_model, activations)).float().cpu()


def probe(loaded, sae_model, site: str, layer, text: str, k: int = 5, n_features: int = 30) -> Probe:
    """Run the model and SAE on text: the strongest features per token and over the whole text."""
    import torch
    from sae.analyze.extras import token_strings   # each id decoded on its own: ' the' rather than 'Ġthe'
    token_ids = encode_text(loaded, text)
    codes = codes_for(sae_model, site_activations(loaded, site, layer, token_ids))  # [seq, d_sae]
    special = [i in loaded.special_ids for i in token_ids]
    keep = ~torch.tensor(special)
    ranked = codes.clone()
    ranked[~keep] = 0.0
    k = min(k, codes.shape[1])
    strength = ranked.abs() if bool((ranked < 0).any()) else ranked   # signed codes rank by |code|
    top_values, top_features = strength.topk(k, dim=1)            # [seq, k]
    top_values = ranked.gather(1, top_features)
    kept = ranked[keep] if bool(keep.any()) else ranked            # [n_kept, d_sae]
    per_feature = (kept.abs() if bool((kept < 0).any()) else kept).max(dim=0).values  # [d_sae]
    best = per_feature.topk(min(n_features, codes.shape[1])).indices.tolist()
    best = [f for f in best if float(per_feature[f]) > 0]
    strings = token_strings(loaded.tokenizer, token_ids)          # {id: text}
    return Probe(
        token_ids=token_ids, tokens=[strings[i] for i in token_ids], special=special,
        top_features=top_features.numpy(), top_values=top_values.numpy(),
        feature_max={f: float(kept[:, f].max()) for f in best},
        feature_mean={f: float(kept[:, f].mean()) for f in best},
        feature_count={f: int((kept[:, f] > 0).sum()) for f in best},
        codes_of={f: ranked[:, f].numpy() for f in best},
    )


def ablate_fn(sae_model, feature: int):
    """fn(x [batch, seq, d]) = x − f_j(x)·W_dec[j]: this feature's contribution removed (sae.ablate's rule)."""
    from sae.evaluate.steer import steering_fn
    return steering_fn(sae_model, {feature: 0.0})


def steer_fn(sae_model, feature: int, mode: str, value: float):
    """mode 'add': x + s·W_dec[j]; mode 'clamp': x + (c − f_j(x))·W_dec[j] (sae.steer's rule, raw units)."""
    from sae.evaluate.steer import steering_fn
    return steering_fn(sae_model, {feature: value}, mode)


def next_token_losses(loaded, input_ids) -> "torch.Tensor":
    """[batch, seq] loss of predicting token t from position t−1 (column 0 is nan)."""
    import torch
    with torch.no_grad():
        logits = loaded.model(input_ids=input_ids).logits.float()            # [batch, seq, vocab]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    ).reshape(input_ids.shape[0], -1)                                         # [batch, seq - 1]
    return torch.cat([torch.full_like(losses[:, :1], float("nan")), losses], dim=1)


def loss_effect(loaded, sae_model, site: str, layer, feature: int, contexts: list[list[int]]) -> list[np.ndarray]:
    """Per context, per token: next-token loss with the feature's contribution removed minus the clean loss.

    Positive = the feature helped predict that token. Special tokens (BOS, EOS, padding) keep their
    activation. Contexts run one at a time (they differ in length).
    """
    import torch
    from sae.evaluate.splice import replace
    effects = []
    for context in contexts:
        input_ids = torch.tensor([context], device=_device(loaded))            # [1, seq]
        keep = torch.tensor([[i in loaded.special_ids for i in context]], device=input_ids.device)
        clean = next_token_losses(loaded, input_ids)
        if getattr(sae_model, "is_transcoder", False):    # its contribution removed from the MLP output
            from sae.evaluate.transcode import steer_transcoder
            edit = steer_transcoder(loaded.model, sae_model, layer, {feature: 0.0}, keep_mask=keep)
        else:
            edit = replace(loaded.model, site, layer, ablate_fn(sae_model, feature), keep_mask=keep)
        with edit:
            ablated = next_token_losses(loaded, input_ids)
        effects.append((ablated - clean)[0].cpu().numpy())
    return effects


def generate(loaded, prompt: str, seed: int = 0, max_new_tokens: int = 30, temperature: float = 1.0,
             steer=None, site: str | None = None, layer=None) -> str:
    """Text generated after the prompt; `steer` (a fn of the site activation) is applied at site/layer.

    Sampling is seeded, so the same prompt and seed give the same text; temperature 0 is greedy.
    """
    import contextlib
    import torch
    from sae.evaluate.splice import replace
    input_ids = torch.tensor([encode_text(loaded, prompt)], device=_device(loaded))   # [1, prompt]
    hook = replace(loaded.model, site, layer, steer) if steer is not None else contextlib.nullcontext()
    torch.manual_seed(seed)
    options = dict(max_new_tokens=max_new_tokens, pad_token_id=loaded.pad_id if loaded.pad_id is not None else 0,
                   attention_mask=torch.ones_like(input_ids))
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    with torch.no_grad(), hook:
        output = loaded.model.generate(input_ids, **options)
    return loaded.tokenizer.decode(output[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True)


# ---- cached loaders for the pages --------------------------------------------------------------
def cached_model(name: str):
    return _cached_model(name)


def cached_sae(run_path: str):
    """sae.load(run_path), reloaded when the weights file changes."""
    from pathlib import Path
    weights = Path(run_path) / "sae.safetensors"
    stamp = weights.stat().st_mtime_ns if weights.exists() else None
    return _cached_sae(run_path, stamp)


def _lazy_cache():
    import streamlit as st
    return st.cache_resource(show_spinner="Loading model…", max_entries=2)


def _load_model(name: str):
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sae.lm import load_model
    return load_model(name, device="cpu")


def _load_sae(run_path: str, stamp=None):
    import sae
    return sae.load(run_path, device="cpu")


_cached_model = _lazy_cache()(_load_model)
_cached_sae = _lazy_cache()(_load_sae)
