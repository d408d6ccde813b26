"""No host sync in a non-logging training step of the TopK family (issue 19).

torch.Tensor.item / __bool__ / __int__ / __float__ / tolist / nonzero (and torch.nonzero) are wrapped with
counters while non-logging steps run. On the CPU, host reads are free and the fast path uses them, so the test
runs the GPU's form there (sae.kernels.autograd.SYNC_FREE_ON_CPU); on CUDA it also runs under
torch.cuda.set_sync_debug_mode("error")."""
import contextlib

import pytest
import torch

from sae import variants
from sae.kernels import autograd
from sae.train.trainer import Trainer, TrainOptions
from sae.variants.base import StepContext

FAMILY = ["topk", "batchtopk", "matryoshka"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def counted_host_reads():
    counts = {"n": 0}
    patched = []

    def wrap(owner, name):
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            counts["n"] += 1
            return original(*args, **kwargs)
        setattr(owner, name, counting)
        patched.append((owner, name, original))

    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero"):
        wrap(torch.Tensor, name)
    wrap(torch, "nonzero")
    try:
        yield counts
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def test_the_counter_counts():
    with counted_host_reads() as counts:
        bool(torch.tensor(True))
        int(torch.tensor(3))
        torch.tensor([0, 1]).nonzero()
    assert counts["n"] == 3


def _trainer(variant, device):
    torch.manual_seed(0)
    model = variants.create(variant, 32, 128, k=4)
    options = TrainOptions(tokens=64 * 40, batch_size=64, log_every=1000, checkpoint_every=0, device=device,
                           dead_after_tokens=64, seed=0)
    trainer = Trainer(model, options)
    trainer.init_from_sample(torch.randn(256, 32))
    return trainer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", FAMILY)
def test_non_logging_steps_read_nothing_from_the_device(variant, device, monkeypatch):
    monkeypatch.setattr(autograd, "SYNC_FREE_ON_CPU", True)
    trainer = _trainer(variant, device)
    batches = [torch.randn(64, 32).to(device) for _ in range(8)]
    for x in batches[:3]:                      # warm-up: kernels built, dead latents appear (dead after 64 tokens)
        assert trainer.step(x) == {}
    assert bool(trainer.dead_mask().any())     # the AuxK path runs in the counted steps
    debug = torch.cuda.set_sync_debug_mode if device == "cuda" else (lambda mode: None)
    with counted_host_reads() as counts:
        debug("error")
        try:
            for x in batches[3:]:
                assert trainer.step(x) == {}   # non-logging steps
        finally:
            debug(0)
    assert counts["n"] == 0
    # the CPU's own fast path does read (free there): the same steps, counted, are not zero
    monkeypatch.setattr(autograd, "SYNC_FREE_ON_CPU", False)
    if device == "cpu":
        with counted_host_reads() as counts:
            trainer.step(batches[0])
        assert counts["n"] > 0


@pytest.mark.parametrize("variant", FAMILY)
def test_the_sync_free_form_computes_the_same_loss(variant, monkeypatch):
    """The GPU's fixed-shape form (masked AuxK, padded BatchTopK) against the CPU's exact form, same weights."""
    torch.manual_seed(1)
    model = variants.create(variant, 32, 128, k=4).train()
    x = torch.randn(64, 32)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::5] = True
    ctx = StepContext(step=0, progress=0.0, sparsity_scale=1.0, dead_mask=dead)
    results = []
    for sync_free in (False, True):
        monkeypatch.setattr(autograd, "SYNC_FREE_ON_CPU", sync_free)
        if hasattr(model, "threshold"):
            model.threshold.fill_(-1.0)
        model.zero_grad()
        out = model.training_loss(x, x, ctx)
        out.loss.backward()
        results.append((out.loss.detach(), out.x_hat, out.fire_counts, model.W_enc.grad.clone(),
                        model.W_dec.grad.clone(), out.terms["auxk"]))
    for exact, padded in zip(*results):
        torch.testing.assert_close(padded.float(), exact.float(), rtol=1e-4, atol=1e-5)
    assert float(results[0][5]) > 0            # AuxK was on in both
