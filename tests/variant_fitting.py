"""A bare training loop and synthetic data shared by the variant tests, independent of sae.train."""
from __future__ import annotations

import math

import pytest
import torch

from sae.variants.base import StepContext


def sparse_data(n=3072, d_in=32, n_atoms=96, active=4, seed=0):
    """Activation-shaped data: a large mean, sparse non-negative mixtures of random atoms, small noise."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    coeffs = torch.rand(n, n_atoms, generator=gen) * 3
    keep = torch.rand(n, n_atoms, generator=gen).argsort(dim=1) < active
    x = (coeffs * keep) @ atoms + torch.randn(d_in, generator=gen)
    return x + 0.05 * torch.randn(n, d_in, generator=gen)


def fit(model, x, steps=150, batch=128, lr=3e-3, seed=0, dead_after=None, init=True, corrupt=False):
    """Scale to mean norm √d_in, init from data, Adam, warm-up, unit-norm decoder.
    init=False keeps the model's scale and initialisation; corrupt adds the variant's default input noise."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if init:
        model.input_scale.fill_(math.sqrt(x.shape[1]) / x.norm(dim=1).mean())
        model.init_from_data(x[:1024] * model.input_scale)
    scaled = x * model.input_scale
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    last_fired = torch.zeros(model.d_sae)
    losses = []
    model.train()
    for step in range(steps):
        target = scaled[torch.randint(len(x), (batch,), generator=gen)]
        inputs = target + model.default_noise_std * torch.randn_like(target) if corrupt else target
        dead = None if dead_after is None else (step * batch - last_fired) >= dead_after
        ctx = StepContext(step=step, progress=step / steps, sparsity_scale=min(1.0, step / (0.1 * steps)),
                          dead_mask=dead)
        out = model.training_loss(inputs, target, ctx)
        optimiser.zero_grad()
        out.loss.backward()
        model.remove_parallel_gradient()
        optimiser.step()
        model.normalize_decoder()
        if out.fire_counts is not None:
            last_fired[out.fire_counts > 0] = (step + 1) * batch
        losses.append(float(out.loss.detach()))
    return model.eval(), losses


def fvu(model, x):
    with torch.no_grad():
        x_hat = model.decode(model.encode(x))
    return float((x_hat - x).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())



@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and the shared machine is busy. Imported by the test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_save_load_identical(model, x, run_dir):
    """save_run -> sae.load gives the same codes and reconstructions, bit for bit."""
    import sae
    from sae.runs import save_run
    save_run(model, run_dir)
    loaded = sae.load(run_dir)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        assert torch.equal(loaded(x), model(x))


def firing_again_after_silencing(model, x, pre_act_coefficient, silence, n_silenced=16, fitter=None):
    """Train `model` 60 steps after silencing its first n_silenced latents on every token of x (silence(model,
    scaled x) lowers their b_enc), with the given pre-activation coefficient; how many of them fire again."""
    model.knobs["pre_act_coefficient"] = pre_act_coefficient
    scaled = x * model.input_scale
    with torch.no_grad():
        silence(model, scaled)
        assert int((model.encode_scaled(scaled)[:, :n_silenced] > 0).sum()) == 0
    (fitter or fit)(model, x, steps=60, init=False, seed=1)
    with torch.no_grad():
        return int((model.encode_scaled(scaled)[:, :n_silenced] > 0).any(dim=0).sum())
