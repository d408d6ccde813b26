"""Transcoders and skip transcoders: any registered variant, reading one site (the MLP input) and predicting
another (the MLP output) — Dunefsky et al. 2024; skip transcoders: Paulo et al. 2025.

    model = make_transcoder("topk", d_in=576, d_sae=4608, k=32, skip=True)
    codes = model.encode(x_in)                 # [n, d_in] MLP input, raw units -> [n, d_sae]
    y_hat = model.predict(x_in)                # decode(codes) + skip_term(x_in): [n, d_in] MLP output, raw units

make_transcoder returns an instance of a subclass of the variant's own class (built once per variant), so the
variant's encoder, selection, loss terms and the trainer all work unchanged. What differs:
- units: the input is scaled by `input_scale` (as for an SAE), the target by its own buffer `target_scale`
  (mean target norm -> sqrt(d_in)); decode() and the *_raw methods return raw target units.
- the skip connection (skip=True): W_skip [d_out, d_in], zero at the start, adds x_scaled @ W_skipᵀ to the
  decoded prediction (sparsify's layout: y_hat += x @ W_skip.mT).
- training_loss(x_input, y_target): the variant's loss on the target minus the skip term. Variants whose loss
  is an FVU (the TopK family) normalise by the variance of that residual target; the loss is multiplied back
  by var(residual) / var(target) (both without gradient), so that it is exactly FVU(prediction, target).
MLP input and output widths are both d_model for the models we support, so d_out == d_in.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sae.errors import UserError
from sae.variants.base import SAE, LossOutput, StepContext, geometric_median, total_variance

_CLASSES: dict[type, type] = {}


class TranscoderMixin:
    """Mixed in before a variant's class by make_transcoder; see the module docstring."""
    is_transcoder = True

    def __init__(self, d_in: int, d_sae: int, skip: bool = False, **knobs):
        super().__init__(d_in, d_sae, **knobs)
        self.skip = bool(skip)
        self.register_buffer("target_scale", torch.tensor(1.0))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d_in, self.d_in))       # [d_out, d_in], scaled units

    def config(self) -> dict:
        return {**super().config(), "transcoder": True, "skip": self.skip}

    # ---- raw units --------------------------------------------------------------------------
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[n, d_sae] codes -> [n, d_in] predicted target (MLP output), raw units, without the skip term."""
        return self.decode_scaled(codes) / self.target_scale

    def skip_scaled(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """[n, d_in] scaled input -> [n, d_in] skip term in scaled target units (zeros without skip)."""
        if not self.skip:
            return torch.zeros_like(x_scaled)
        return x_scaled @ self.W_skip.t().to(x_scaled.dtype)

    def skip_term(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d_in] raw input -> [n, d_in] skip term in raw target units: linear in x."""
        x_scaled = x.to(self.input_scale.dtype) * self.input_scale
        return self.skip_scaled(x_scaled) / self.target_scale

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d_in] raw input -> [n, d_in] predicted target: decode(encode(x)) + skip_term(x)."""
        return self.decode(self.encode(x)) + self.skip_term(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor):
        """(predicted target [n, d_in], fire counts [d_sae] or None), raw units: what scoring needs."""
        codes = self.encode(x)                                                   # [n, d_sae]
        counts = None if self.fire_threshold is None else (codes > self.fire_threshold).sum(dim=0)
        return self.decode(codes) + self.skip_term(x), counts

    @property
    def W_dec_raw(self) -> torch.Tensor:
        """[d_sae, d_in] decoder directions in raw target units."""
        return self.decoder_directions_raw()

    def decoder_bias_raw(self) -> torch.Tensor:
        """[d_in] what decode() returns for all-zero codes, raw target units."""
        if isinstance(getattr(self, "b_dec", None), torch.Tensor):
            return self.b_dec / self.target_scale
        return self.decode(torch.zeros(1, self.d_sae, device=self.target_scale.device))[0]

    def decoder_directions_raw(self) -> torch.Tensor:
        """[d_sae, d_in] such that decode(c) == c @ directions + decoder_bias_raw(), raw target units."""
        if isinstance(getattr(self, "W_dec", None), torch.Tensor) and self.W_dec.shape == (self.d_sae, self.d_in):
            return self.W_dec / self.target_scale
        bias = self.decoder_bias_raw()
        rows = [self.decode(torch.eye(self.d_sae, device=bias.device)[lo:lo + 1024]) - bias
                for lo in range(0, self.d_sae, 1024)]
        return torch.cat(rows)

    # ---- training -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_pairs(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Data-dependent initialisation from raw samples x [n, d_in] (input) and y [n, d_in] (target):
        both scales (mean norm -> sqrt(d_in)), then the variant's own init on the scaled target."""
        for name, sample in (("input", x), ("target", y)):
            mean_norm = sample.float().norm(dim=1).mean()
            if not torch.isfinite(mean_norm) or float(mean_norm) == 0.0:
                raise UserError(f"the transcoder's {name} activations are all zero or not finite: nothing to train on")
            getattr(self, f"{name}_scale").fill_(math.sqrt(self.d_in) / float(mean_norm))
        self.init_from_data(y.float().to(self.target_scale.device) * self.target_scale)
        self.normalize_decoder()
        W_enc, b_enc, b_dec = (getattr(self, name, None) for name in ("W_enc", "b_enc", "b_dec"))
        if all(isinstance(t, torch.Tensor) for t in (W_enc, b_enc, b_dec)) and b_enc.shape == (self.d_sae,):
            # the encoder subtracts b_dec, the *target's* median; the input's own median sits elsewhere: the
            # encoder bias starts where the pre-activations are those of the input centred on its median
            # (without it a large shared input component favours a few latents and most never fire)
            x_median = geometric_median(x.float().to(W_enc.device) * self.input_scale)             # [d_in]
            b_enc.copy_(-(x_median - b_dec) @ W_enc)

    def training_loss(self, x_input: torch.Tensor, x_target: torch.Tensor, ctx: StepContext) -> LossOutput:
        """x_input: the scaled (possibly corrupted) MLP input; x_target: the scaled MLP output to predict."""
        if not self.skip:
            return super().training_loss(x_input, x_target, ctx)
        skip = self.skip_scaled(x_input)                                         # [batch, d_in] scaled target units
        residual = x_target - skip
        out = super().training_loss(x_input, residual, ctx)
        if _fvu_loss(self):
            ratio = total_variance(residual) / total_variance(x_target)          # no gradient: both detached
            out.loss = out.loss * ratio
            out.terms = {name: value * ratio if name in ("recon", "auxk", "fvu") else value
                         for name, value in out.terms.items()}
        out.x_hat = out.x_hat + skip.detach()
        return out


def _fvu_loss(model) -> bool:
    """Whether the variant's reconstruction loss is normalised by the batch variance (the TopK family)."""
    from sae.variants.topk import TopKSAE
    return isinstance(model, TopKSAE)


def transcoder_class(variant_cls: type) -> type:
    """The transcoder subclass of a variant's class (one per variant, built on first use)."""
    if variant_cls not in _CLASSES:
        _CLASSES[variant_cls] = type(f"{variant_cls.__name__}Transcoder", (TranscoderMixin, variant_cls),
                                     {"__module__": __name__, "__doc__": f"A {variant_cls.name} transcoder."})
    return _CLASSES[variant_cls]


def make_transcoder(variant: str, d_in: int, d_sae: int, *, skip: bool = False, **knobs) -> SAE:
    """A transcoder of a registered variant: input d_in -> codes d_sae -> output d_in (raw units outside)."""
    from sae import variants
    cls = variants.get(variant)
    d_sae = int(d_sae)
    cls.check_width(d_in, d_sae)
    unknown = set(knobs) - set(cls.KNOBS)
    if unknown:
        raise UserError(f"variant {cls.name} does not take {', '.join(sorted(unknown))}")
    full = {name: knobs.get(name, knob.default) for name, knob in cls.KNOBS.items()}
    cls.check_knobs(d_in, d_sae, full)
    return transcoder_class(cls)(int(d_in), d_sae, skip=skip, **full)


def is_transcoder(model) -> bool:
    return bool(getattr(model, "is_transcoder", False))


def check_mlp_transcoder(model_or_config, what: str = "this transcoder") -> None:
    """Refuse, in one line, anything but a transcoder from the MLP input to the MLP output: what replacing each
    MLP (attribution graphs, `sae eval`'s splice of an MLP) needs. Takes a module (its run_config) or a config."""
    config = model_or_config if isinstance(model_or_config, dict) else \
        {**(getattr(model_or_config, "run_config", None) or {}),
         "transcoder": is_transcoder(model_or_config) or None}
    if not config.get("transcoder"):
        raise UserError(f"{what} is not a transcoder (train one with `sae train --transcoder` on a store collected "
                        f"with --site mlp_in --target-site mlp_out)")
    site, target = config.get("site") or "mlp_in", config.get("target_site") or "mlp_out"
    if (site, target) != ("mlp_in", "mlp_out"):
        raise UserError(f"{what} maps {site} -> {target}; replacing an MLP needs a transcoder from mlp_in to mlp_out")
