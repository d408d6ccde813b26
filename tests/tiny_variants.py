"""Tiny SAEs for the trainer's tests, defined here so the trainer is tested apart from the real variants.
They are NOT registered globally: tests that need the registry add them with monkeypatch."""
from __future__ import annotations

import torch
from torch import nn

from sae.variants.base import SAE, Knob, LossOutput, kaiming_pair


class TinyReLU(SAE):
    """ReLU SAE with a plain L1 penalty; revives dead latents through the base class's resampling."""
    name = "tiny_relu"
    KNOBS = {"l1_coefficient": Knob(1e-3, "L1 weight", float, minimum=0.0)}
    revive_dead = True

    def build(self):
        W_enc, W_dec = kaiming_pair(self.d_in, self.d_sae)
        self.W_enc = nn.Parameter(W_enc)      # [d_in, d_sae]
        self.W_dec = nn.Parameter(W_dec)      # [d_sae, d_in]
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        self.seen_inputs = []                 # (x_input, x_target, ctx) of recent steps, for spying tests
        self.spy = False

    def encode_scaled(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)  # [n, d_sae]

    def decode_scaled(self, codes):
        return codes @ self.W_dec + self.b_dec  # [n, d_in]

    def training_loss(self, x_input, x_target, ctx):
        if self.spy:
            self.seen_inputs.append((x_input.detach().clone(), x_target.detach().clone(), ctx))
        codes = self.encode_scaled(x_input)
        x_hat = self.decode_scaled(codes)
        mse = (x_hat - x_target).pow(2).sum(-1).mean()
        l1 = codes.sum(-1).mean()
        loss = mse + ctx.sparsity_scale * self.knobs.get("l1_coefficient", 1e-3) * l1
        return LossOutput(loss, x_hat, (codes > 0).sum(0), {"mse": mse, "l1": l1})


class TinyNoisy(TinyReLU):
    """Uses the global RNG inside its loss (like a VAE) and a corruption default (like denoising)."""
    name = "tiny_noisy"
    KNOBS = {"k": Knob(4, "unused knob to test refusals", int, positive=True)}
    default_noise_std = 0.1
    revive_dead = False

    def training_loss(self, x_input, x_target, ctx):
        jitter = torch.randn_like(x_input) * 0.01
        out = super().training_loss(x_input + jitter, x_target, ctx)
        return out


class TinyNaN(TinyReLU):
    """Its loss turns NaN at step 3."""
    name = "tiny_nan"
    KNOBS = {}

    def training_loss(self, x_input, x_target, ctx):
        out = super().training_loss(x_input, x_target, ctx)
        if ctx.step >= 3:
            out.loss = out.loss * float("nan")
        return out


def synthetic(n=4096, d_in=16, n_features=32, seed=0, scale=7.0):
    """Sparse combinations of random directions plus an offset: [n, d_in] float32."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d_in, generator=gen)
    active = torch.rand(n, n_features, generator=gen) < 0.1
    amounts = torch.rand(n, n_features, generator=gen) * active
    offset = torch.randn(d_in, generator=gen)
    return ((amounts @ directions + offset) * scale).float()
