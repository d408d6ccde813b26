"""`sae train --init-from RUN`: fine-tune an existing SAE (a run of ours, or anything sae.load opens: a SAELens or
sparsify folder, a published release) on a new store.

    model = start_from(RUN, cls, store, layer, d_sae, knobs)   # the trainer then skips its data-dependent init

The source's weights are kept exactly, so that at step 0 the fine-tuned model computes the source's function
(same held-out FVU on any store). Only the internal input scale is moved to the new store's (mean scaled token
norm sqrt(d_in), what every default learning rate and penalty assumes), and the weights are rewritten so that
the raw-unit function does not change: with r = new scale / old scale, the codes grow by r (b_dec, b_enc, b_mag
and thresholds × r; encoder and decoder matrices unchanged; TopK selections are invariant). Variants whose codes
are not positively homogeneous (kl's sigmoid, vae, linear, vq, contractive) keep the source's scale.

Refused in one line: a source of another d_in than the store's, or of another variant family than --variant
(the families share a parameter layout: topk/batchtopk/matryoshka, relu/l1/denoising, each other variant alone).
"""
from __future__ import annotations

import math

import torch

from sae.errors import UserError

FAMILIES = {"topk": "topk", "batchtopk": "topk", "matryoshka": "topk",
            "relu": "relu", "l1": "relu", "denoising": "relu"}
RESCALED = ("topk", "relu", "jumprelu", "gated")    # families whose codes scale with their input
SCALE_ROWS = 16384                                  # store rows that set the new input scale


def family(variant: str) -> str:
    return FAMILIES.get(variant, variant)


def load_source(source, device="cpu"):
    """The SAE module of a run folder / foreign folder / release name, or the module itself."""
    if isinstance(source, torch.nn.Module):
        return source
    from sae.runs import load
    return load(str(source), device=device)


def check_compatible(model, cls, d_in: int, source_name: str) -> None:
    """One line when the source cannot start a `cls` SAE on a store of width d_in."""
    variant = getattr(model, "name", None) or "unknown"
    if getattr(model, "is_transcoder", False):
        raise UserError(f"--init-from {source_name} is a transcoder: fine-tuning one is not supported")
    if int(model.d_in) != int(d_in):
        raise UserError(f"--init-from {source_name} has d_in {model.d_in}, but the store's activations have "
                        f"d_model {d_in}: an SAE can only be fine-tuned on activations of its own width")
    if family(variant) != family(cls.name):
        raise UserError(f"--init-from {source_name} is a {variant} SAE ({family(variant)} family), but --variant "
                        f"is {cls.name} ({family(cls.name)} family): give --variant {variant}")


@torch.no_grad()
def start_from(source, cls, store, layer=None, d_sae: int | None = None, knobs: dict | None = None,
               transcoder: bool = False):
    """A new `cls` SAE holding the source's weights, ready for the Trainer (its init_from_sample must be skipped)."""
    if transcoder:
        raise UserError("--init-from does not apply to --transcoder runs")
    name = str(getattr(source, "name", source)) if isinstance(source, torch.nn.Module) else str(source)
    loaded = load_source(source)
    check_compatible(loaded, cls, store.d_model, name)
    if d_sae is not None and int(d_sae) != int(loaded.d_sae):
        raise UserError(f"--init-from {name} has d_sae {loaded.d_sae}, not --d-sae {d_sae}: leave --d-sae out")
    inherited = dict(getattr(loaded, "knobs", {}) or {}) if loaded.name == cls.name else {}
    merged = {k: v for k, v in {**inherited, **(knobs or {})}.items() if k in cls.KNOBS}
    model = cls.create(loaded.d_in, loaded.d_sae, **merged)
    state = {k: v.detach().float().cpu() for k, v in loaded.state_dict().items()}
    buffers = dict(model.named_buffers())
    for key in set(buffers) - set(state):      # a buffer the source's variant lacks (batchtopk's θ): its default
        state[key] = buffers[key]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise UserError(f"--init-from {name}: its weights do not fit a {cls.name} SAE ({detail[:160]})") from None
    if family(cls.name) in RESCALED or cls.name in RESCALED:
        rescale_inputs(model, new_input_scale(store, layer, model.d_in) / float(model.input_scale))
    model.init_source = name
    return model


def new_input_scale(store, layer, d_in: int) -> float:
    """sqrt(d_in) / mean token norm over the store's first training rows (the trainer's own rule)."""
    rows = store.split_indices("train")[:SCALE_ROWS]
    if len(rows) == 0:
        raise UserError(f"the store {store.path} has no training rows")
    x = store.rows(store.resolve_layer(layer), rows).float()          # [n, d_in]
    mean_norm = float(x.norm(dim=1).mean())
    if not math.isfinite(mean_norm) or mean_norm == 0:
        raise UserError("the activations are all zero or not finite: nothing to train on")
    return math.sqrt(d_in) / mean_norm


@torch.no_grad()
def rescale_inputs(model, r: float) -> None:
    """Multiply the input scale by r without changing the raw-unit function: codes × r (biases and thresholds
    × r; TopK selections and the matrices unchanged)."""
    if not math.isfinite(r) or r <= 0 or abs(r - 1) < 1e-12:
        return
    model.input_scale.mul_(r)
    for name in ("b_dec", "b_enc", "b_mag"):
        tensor = getattr(model, name, None)
        if isinstance(tensor, torch.Tensor):
            tensor.mul_(r)
    if isinstance(getattr(model, "log_threshold", None), torch.Tensor):
        model.log_threshold.add_(math.log(r))
    threshold = getattr(model, "threshold", None)
    if isinstance(threshold, torch.Tensor) and not isinstance(getattr(type(model), "threshold", None), property):
        threshold.copy_(torch.where(threshold > 0, threshold * r, threshold))   # batchtopk: −1 = not yet learned


def provenance(init_from) -> dict:
    """What config.json records of the source."""
    return {} if init_from is None else {"init_from": str(getattr(init_from, "init_source", init_from))}
