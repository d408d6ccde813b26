"""The classic autoencoder family, trained with a minimal Adam loop of the test's own (not the trainer)."""
import math

import pytest
import torch

import sae
from sae.errors import UserError
from sae.variants import create
from sae.variants.base import StepContext
from sae.variants.kl import kl_sparsity
from sae.variants.vae import gaussian_kl
from variant_fitting import (assert_save_load_identical, firing_again_after_silencing, fit as _fit, fvu,  # noqa: F401
                             one_thread, sparse_data)  # (one_thread: autouse)


def fit(model, x, **options):
    """The shared loop with each variant's default input corruption (denoising's noise)."""
    return _fit(model, x, corrupt=True, **options)


CLASSIC = ["linear", "relu", "l1", "kl", "denoising", "contractive", "vae", "vq"]


@pytest.mark.parametrize("name", CLASSIC)
def test_each_classic_variant_trains_and_beats_the_mean(name):
    x = sparse_data()
    train, held_out = x[:2560], x[2560:]
    width = {"linear": 8, "vae": 32}.get(name, 64)
    knobs = {"l1": {"l1_coefficient": 0.5}}.get(name, {})       # the default λ suits d_in in the hundreds
    model, losses = fit(create(name, d_in=32, d_sae=width, **knobs), train)
    assert sum(losses[-20:]) / 20 < sum(losses[:5]) / 5
    if name == "linear":                                        # PCA at the same width, fitted on train
        centred = train - train.mean(dim=0)
        axes = torch.linalg.svd(centred, full_matrices=False).Vh[:8]
        pca_hat = (held_out - train.mean(dim=0)) @ axes.T @ axes + train.mean(dim=0)
        pca = float((pca_hat - held_out).pow(2).sum() / (held_out - held_out.mean(dim=0)).pow(2).sum())
        assert fvu(model, held_out) < pca + 0.03, (fvu(model, held_out), pca)
    else:
        assert fvu(model, held_out) < (0.85 if name == "vq" else 0.5), name   # 64 codes quantise 32-D coarsely
    if name == "vae":
        assert model.extra_metrics(held_out * model.input_scale)["active_dims"] >= 4   # no posterior collapse
    if name == "vq":
        metrics = model.extra_metrics(held_out * model.input_scale)
        assert metrics["usage"] > 0.5 and 1 < metrics["perplexity"] <= 64


def test_linear_learns_the_principal_subspace():
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(8, 2, generator=gen)).Q                    # [8, 2] the true plane
    x = (torch.randn(4000, 2, generator=gen) * torch.tensor([3.0, 2.0])) @ basis.T
    x = x + 0.05 * torch.randn(4000, 8, generator=gen) + 1.5
    model, _ = fit(create("linear", d_in=8, d_sae=2), x, steps=1500, lr=1e-2)
    centred = x - x.mean(dim=0)
    pca = torch.linalg.svd(centred, full_matrices=False).Vh[:2].T                  # [8, 2] top-2 PCA axes
    learned = torch.linalg.qr(model.W_dec.detach().T).Q                            # [8, 2]
    cosines = torch.linalg.svdvals(learned.T @ pca)                                # cos(principal angles)
    assert float(cosines.min()) >= 0.999


def test_overcomplete_unregularised_relu_codes_are_dense():
    x = sparse_data(d_in=16, n_atoms=48)
    model, _ = fit(create("relu", d_in=16, d_sae=64), x, steps=400)
    with torch.no_grad():
        codes = model.encode(x[:512])
    l0 = float((codes > 0).sum(dim=1).float().mean())
    assert l0 > 16          # more latents fire per token than the input has dimensions
    assert fvu(model, x[2560:]) < 0.05


def test_vq_codes_are_one_hot_and_decode_to_codebook_rows():
    x = sparse_data()
    model, _ = fit(create("vq", d_in=32, d_sae=64), x, steps=100)
    with torch.no_grad():
        codes = model.encode(x[:200])
        assert torch.equal(codes.sum(dim=1), torch.ones(200)) and set(codes.unique().tolist()) == {0.0, 1.0}
        index = codes.argmax(dim=1)
        scaled = x[:200] * model.input_scale
        brute = ((scaled - model.b_dec)[:, None, :] - model.W_dec[None]).pow(2).sum(-1).argmin(dim=1)
        assert torch.equal(index, brute)
        assert torch.allclose(model.decode(codes), (model.W_dec[index] + model.b_dec) / model.input_scale)


def test_vq_revive_restarts_codes_at_poorly_reconstructed_tokens():
    model = create("vq", d_in=8, d_sae=16)
    x = torch.randn(64, 8)
    x_hat = x.clone()
    x_hat[[5, 9]] += 10.0                              # only tokens 5 and 9 are badly reconstructed
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 7]] = True
    before = model.W_dec.detach().clone()
    assert model.revive(dead, x, x_hat) == 2
    restarted = {tuple(model.W_dec[i].tolist()) for i in (2, 7)}
    assert restarted == {tuple((x[i] - model.b_dec).tolist()) for i in (5, 9)}
    assert torch.equal(model.W_dec[~dead], before[~dead])


def test_l1_revives_latents_sparse_at_the_live_decoder_norm():
    """A revived l1 latent fires on the batch's top REVIVED_L0/d_sae share with small codes (at b_enc = 0 it would
    fire on about half the tokens) and its decoder row takes the live rows' mean norm; live latents are untouched."""
    from sae.variants.l1 import REVIVED_L0
    x = sparse_data(n=2048)
    model, _ = fit(create("l1", d_in=32, d_sae=512, l1_coefficient=0.5), x, steps=20)
    scaled = x * model.input_scale
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::4] = True
    live_before = (model.W_enc.detach()[:, ~dead].clone(), model.W_dec.detach()[~dead].clone())
    live_norm = float(model.W_dec.detach()[~dead].norm(dim=1).mean())
    with torch.no_grad():
        assert model.revive(dead, scaled, model.decode_scaled(model.encode_scaled(scaled))) == 128
        codes = model.encode_scaled(scaled)[:, dead]                       # [2048, 128]
        live_max = float(model.encode_scaled(scaled)[:, ~dead].max())
    share = float((codes > 0).float().mean())
    assert share == pytest.approx(REVIVED_L0 / 512, rel=0.1)            # 1/8 of the tokens, not 1/2
    assert float(codes.max()) < live_max                                  # small codes
    assert torch.allclose(model.W_dec.detach()[dead].norm(dim=1), torch.full((128,), live_norm), rtol=1e-5)
    assert torch.equal(model.W_enc.detach()[:, ~dead], live_before[0])
    assert torch.equal(model.W_dec.detach()[~dead], live_before[1])


def test_l1_pre_activation_loss_lifts_latents_that_stopped_firing():
    """Latents pushed just below firing on every token get no gradient from the reconstruction or the L1 term,
    so they stay dead; the default pre-activation loss Σ ReLU(−pre)‖W_dec‖ pulls them back up."""
    x = sparse_data()

    def silence(model, scaled):
        model.b_enc[:16] -= model.pre_acts(scaled)[:, :16].max(dim=0).values + 0.05   # silent on every token

    def killed_then_trained(pre_act_coefficient):
        model, _ = fit(create("l1", d_in=32, d_sae=128, l1_coefficient=0.5), x, steps=30)
        return firing_again_after_silencing(model, x, pre_act_coefficient, silence, fitter=fit)

    assert killed_then_trained(0.0) == 0
    assert killed_then_trained(create("l1", d_in=32, d_sae=128).knobs["pre_act_coefficient"]) >= 4


def test_vae_closed_form_kl_equals_monte_carlo():
    gen = torch.Generator().manual_seed(2)
    mu, logvar = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    n = 400_000
    std = (0.5 * logvar).exp()
    z = mu + std * torch.randn(n, 5, generator=gen)
    log_q = -0.5 * (((z - mu) / std).pow(2) + logvar + math.log(2 * math.pi))
    log_p = -0.5 * (z.pow(2) + math.log(2 * math.pi))
    samples = log_q - log_p                                                      # [n, 5]
    estimate, stderr = samples.mean(dim=0), samples.std(dim=0) / math.sqrt(n)
    assert torch.all((estimate - gaussian_kl(mu, logvar)).abs() < 4 * stderr + 1e-4)


def test_vae_samples_have_the_posterior_mean_and_std():
    model = create("vae", d_in=8, d_sae=4)
    mu, logvar = torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([0.0, -2.0, 1.0, -4.0])
    torch.manual_seed(0)
    z = model.sample(mu.expand(200_000, 4), logvar.expand(200_000, 4))
    assert torch.allclose(z.mean(dim=0), mu, atol=0.02)
    assert torch.allclose(z.std(dim=0), (0.5 * logvar).exp(), rtol=0.01)
    assert torch.equal(model.encode_scaled(torch.ones(3, 8)), model.posterior(torch.ones(3, 8))[0])  # encode = μ


def test_contractive_penalty_equals_autograd_jacobian_norm():
    torch.manual_seed(3)
    model = create("contractive", d_in=12, d_sae=40)
    model.b_enc.data.normal_()
    x = torch.randn(6, 12)
    closed = model.jacobian_penalty(x)
    for i in range(6):
        jac = torch.func.jacrev(lambda row: model.encode_scaled(row[None])[0])(x[i])   # [d_sae, d_in]
        assert torch.allclose(closed[i], jac.pow(2).sum(), rtol=1e-5)
    codes = model.encode_scaled(x)
    term = model.penalty(x, codes, StepContext())["contractive"]
    assert torch.allclose(term, model.knobs["contractive_coefficient"] * closed.mean())


def test_kl_sparsity_penalty_matches_the_bernoulli_kl():
    rho_hat = torch.tensor([0.02, 0.3, 0.9])
    want = sum(0.05 * math.log(0.05 / r) + 0.95 * math.log(0.95 / (1 - r)) for r in rho_hat.tolist())
    assert abs(float(kl_sparsity(0.05, rho_hat)) - want) < 1e-5
    assert float(kl_sparsity(0.05, torch.full((4,), 0.05))) == pytest.approx(0.0, abs=1e-6)
    assert create("kl", d_in=8, d_sae=16).fire_threshold == 0.5


@pytest.mark.parametrize("name", CLASSIC)
def test_save_load_gives_identical_outputs(name, tmp_path):
    x = sparse_data(n=600)
    model, _ = fit(create(name, d_in=32, d_sae=8 if name == "linear" else 48), x, steps=20)
    assert_save_load_identical(model, x, tmp_path / "run")


@pytest.mark.parametrize("name, d_sae, knobs", [
    ("linear", 32, {}), ("linear", 40, {}), ("vq", 0, {}), ("relu", -3, {}),
    ("l1", 64, {"l1_coefficient": -1.0}), ("kl", 64, {"sparsity_target": 1.5}),
    ("kl", 64, {"sparsity_target": 0.0}), ("kl", 64, {"kl_coefficient": -0.1}),
    ("contractive", 64, {"contractive_coefficient": -1.0}), ("vae", 16, {"beta": -1.0}),
    ("relu", 64, {"k": 4}),
])
def test_bad_widths_and_knobs_are_user_errors(name, d_sae, knobs):
    with pytest.raises(UserError):
        create(name, d_in=32, d_sae=d_sae, **knobs)


def test_default_widths():
    assert create("linear", d_in=64).d_sae == 8
    assert create("relu", d_in=16).d_sae == 128
    assert create("vae", d_in=16).d_sae == 16
    assert create("denoising", d_in=16).default_noise_std > 0


def test_linear_exposes_its_tied_encoder():
    model = create("linear", d_in=16, d_sae=4)
    model.b_dec.data.normal_()
    x = torch.randn(5, 16)
    assert torch.allclose(model.encode_scaled(x), x @ model.W_enc + model.b_enc, atol=1e-6)
    assert set(model.state_dict()) == {"W_dec", "b_dec", "input_scale"}


def test_linear_matches_pca_on_real_activations(smollm2_store, tmp_path):
    """Baldi & Hornik on real data: gradient-trained `linear` reaches PCA's held-out FVU at the same width."""
    from sae.train.trainer import TrainOptions, train_on_store

    store = smollm2_store
    train_x = torch.cat(list(store.activations(split="train")))        # [n_train, 576]
    held_x = torch.cat(list(store.activations(split="held_out")))      # [n_held, 576]
    assert len(held_x) > 200
    d_sae = store.d_model // 8
    mean = train_x.mean(dim=0)
    _, _, v = torch.linalg.svd(train_x - mean, full_matrices=False)
    basis = v[:d_sae]                                                  # [d_sae, 576] top principal axes
    centred = held_x - mean
    pca_hat = centred @ basis.T @ basis + mean
    total = (held_x - held_x.mean(dim=0)).pow(2).sum()
    pca_fvu = float((held_x - pca_hat).pow(2).sum() / total)

    options = TrainOptions(tokens=1024 * 400, batch_size=1024, device="cpu", eval_rows=0, checkpoint_every=0)
    train_on_store(store, "linear", tmp_path / "linear", options, progress=False)
    model = sae.load(tmp_path / "linear")
    with torch.no_grad():
        linear_fvu = float((held_x - model.decode(model.encode(held_x))).pow(2).sum() / total)
    assert pca_fvu < 0.9
    assert abs(linear_fvu - pca_fvu) <= 0.01, (linear_fvu, pca_fvu)
