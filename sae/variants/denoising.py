"""`denoising`: the ReLU autoencoder trained to reconstruct the clean input from a corrupted one.

The corruption is the trainer's (Gaussian --noise-std or --mask-prob compose with every variant); this variant
only changes the default: Gaussian noise of std 0.2 in scaled units (the trainer scales inputs to a mean norm of
√d_in, i.e. about unit RMS per coordinate), which stops an overcomplete code from learning the identity.
"""
from __future__ import annotations

from sae.variants.base import register
from sae.variants.relu import ReLUAutoencoder


@register
class DenoisingAutoencoder(ReLUAutoencoder):
    name = "denoising"
    default_noise_std = 0.2
