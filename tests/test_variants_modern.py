"""The modern SAE family (TopK and relatives), trained with a minimal Adam loop of the test's own."""
import math

import pytest
import torch

import sae
from sae.errors import UserError
from sae.kernels.autograd import sparse_decode
from sae.variants import create
from sae.variants.base import StepContext
from variant_fitting import (assert_save_load_identical, firing_again_after_silencing, fit, fvu,  # noqa: F401
                             one_thread, sparse_data)  # (one_thread: autouse)


MODERN = ["topk", "batchtopk", "gated", "jumprelu", "matryoshka"]


KNOBS = {"topk": {"k": 8}, "batchtopk": {"k": 8}, "matryoshka": {"k": 8},
         "gated": {"l1_coefficient": 0.1}, "jumprelu": {"l0_coefficient": 0.05}}


@pytest.mark.parametrize("name", MODERN)
def test_each_modern_variant_trains_and_beats_the_mean(name):
    x = sparse_data()
    model, losses = fit(create(name, d_in=32, d_sae=128, **KNOBS[name]), x[:2560])
    assert sum(losses[-20:]) / 20 < sum(losses[:5]) / 5
    assert fvu(model, x[2560:]) < 0.5, name
    with torch.no_grad():
        l0 = float((model.encode(x[2560:]) > 0).sum(dim=1).float().mean())
    assert 0 < l0 < 64, name                                  # sparse: well under half the latents


def test_topk_l0_is_exactly_k():
    x = sparse_data()
    model, _ = fit(create("topk", d_in=32, d_sae=128, k=6), x[:2560], steps=60)
    with torch.no_grad():
        codes = model.encode(x[2560:])
    assert torch.equal((codes > 0).sum(dim=1), torch.full((len(codes),), 6))


def test_batchtopk_l0_is_k_in_training_and_close_to_k_at_inference():
    x = sparse_data()
    model, _ = fit(create("batchtopk", d_in=32, d_sae=128, k=6), x[:2560], steps=200)
    model.train()
    out = model.training_loss(x[:512] * model.input_scale, x[:512] * model.input_scale, StepContext())
    assert int(out.fire_counts.sum()) == 6 * 512                     # exactly k per token on average
    model.eval()
    assert float(model.threshold) > 0
    with torch.no_grad():
        codes = model.encode(x[2560:])
        single = model.encode(x[2560:2561])
    l0 = float((codes > 0).sum(dim=1).float().mean())
    assert 4.5 < l0 < 7.5
    assert torch.allclose(single, codes[:1], atol=1e-6)             # a token's code ignores its batch-mates


def _topk_with_dead_latents():
    x = sparse_data()
    model = create("topk", d_in=32, d_sae=128, k=4)
    model.input_scale.fill_(math.sqrt(32) / x.norm(dim=1).mean())
    model.init_from_data(x[:1024] * model.input_scale)
    return model, x * model.input_scale


def test_auxk_fits_the_detached_residual_without_a_second_decoder_bias():
    model, scaled = _topk_with_dead_latents()
    with torch.no_grad():
        model.b_dec.add_(0.5)                                          # a bias that would show if added twice
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::2] = True
    batch = scaled[:256]
    x_hat, sel, terms, _ = model.losses(batch, batch, StepContext(dead_mask=dead))
    assert sel.aux_indices.shape[1] == 16 and bool(dead[sel.aux_indices].all())
    residual = batch - x_hat.detach()
    aux_codes = torch.zeros(256, 128).scatter(1, sel.aux_indices, sel.aux_values.detach())
    by_hand = (aux_codes @ model.W_dec.detach() - residual).pow(2).sum()
    total_variance = (batch - batch.mean(dim=0)).pow(2).sum()
    assert torch.allclose(terms["auxk"], model.knobs["auxk_coefficient"] * by_hand / total_variance, rtol=1e-5)
    params = [model.b_dec, model.W_dec, model.W_enc, model.b_enc]
    grads = torch.autograd.grad(terms["auxk"], params, retain_graph=True)
    assert float(grads[1][~dead].abs().max()) == 0.0                    # only dead latents learn from AuxK
    assert float(grads[2][:, ~dead].abs().max()) == 0.0

    def aux_by_hand(residual):
        codes = torch.zeros(256, 128).scatter(1, sel.aux_indices, sel.aux_values)
        loss = (codes @ model.W_dec - residual).pow(2).sum() / total_variance
        return model.knobs["auxk_coefficient"] * loss

    want = list(torch.autograd.grad(aux_by_hand(residual), params, retain_graph=True))
    rows = model.W_dec.detach()                         # unit rows: the kernel removes the parallel part
    want[1] = want[1] - (want[1] * rows).sum(dim=1, keepdim=True) * rows
    for got, expected in zip(grads, want):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    undetached = torch.autograd.grad(aux_by_hand(batch - x_hat), params[:1], retain_graph=True)[0]
    assert not torch.allclose(undetached, grads[0], atol=1e-6)          # the check above can tell the difference


def test_auxk_revives_latents_killed_on_purpose():
    model, _ = _topk_with_dead_latents()
    x = sparse_data()
    fit(model, x[:2560], steps=40, init=False)
    killed = torch.arange(0, 128, 4)
    with torch.no_grad():                                # shrink them below every token's top-k
        model.W_enc[:, killed] *= 0.1
        model.b_enc[killed] = 0.0
        codes = model.encode(x[2560:])
    assert int((codes[:, killed] > 0).sum()) == 0

    def revived_after(auxk_coefficient):
        clone = create("topk", d_in=32, d_sae=128, k=4, auxk_coefficient=auxk_coefficient)
        clone.load_state_dict(model.state_dict())
        fit(clone, x[:2560], steps=150, dead_after=512, init=False)
        with torch.no_grad():
            return int(((clone.encode(x[2560:])[:, killed] > 0).sum(dim=0) > 0).sum())

    with_auxk, without = revived_after(1 / 32), revived_after(0.0)
    assert with_auxk >= 0.5 * len(killed) and with_auxk > without


def test_matryoshka_first_group_reconstructs_on_its_own():
    x = sparse_data()
    sizes = "8,8,16,32,64"

    def first_group_fvu(name, **knobs):
        model, _ = fit(create(name, d_in=32, d_sae=128, k=8, **knobs), x[:2560], steps=200)
        with torch.no_grad():
            codes = model.encode_scaled(x[2560:] * model.input_scale)
            codes[:, 8:] = 0
            x_hat = model.decode(codes)
        held = x[2560:]
        return float((x_hat - held).pow(2).sum() / (held - held.mean(dim=0)).pow(2).sum())

    nested = first_group_fvu("matryoshka", group_sizes=sizes)
    flat = first_group_fvu("batchtopk")
    assert nested < 0.9 and nested < flat


def test_matryoshka_group_losses_use_prefixes():
    model = create("matryoshka", d_in=16, d_sae=32, k=4, group_sizes="8,8,16")
    x = torch.randn(64, 16)
    x_hat, sel, terms, stats = model.losses(x, x, StepContext())
    total_variance = (x - x.mean(dim=0)).pow(2).sum()
    for g, end in enumerate([8, 16, 32]):
        values = sel.values.detach() * (sel.indices < end)
        prefix = sparse_decode(values, sel.indices, model.W_dec.detach(), offsets=sel.offsets) + model.b_dec.detach()
        assert torch.allclose(stats[f"fvu_group{g}"], (prefix - x).pow(2).sum() / total_variance, rtol=1e-5)


def test_jumprelu_straight_through_pseudo_gradients():
    from sae.variants.jumprelu import _JumpReLU, _Step
    pre = torch.tensor([[1.1, 0.5, 2.0], [0.9, 1.2, -1.0], [1.3, 0.8, 1.9]], requires_grad=True)
    threshold = torch.tensor([1.0, 1.0, 2.0], requires_grad=True)
    eps = 0.5
    near = ((pre.detach() - threshold.detach()).abs() < eps / 2).float()     # K((pre − θ)/ε) ≠ 0
    codes = _JumpReLU.apply(pre, threshold, eps)
    assert torch.equal(codes.detach(), pre.detach() * (pre.detach() > threshold.detach()))
    grad_pre, grad_threshold = torch.autograd.grad(codes.sum(), [pre, threshold])
    assert torch.equal(grad_pre, (pre.detach() > threshold.detach()).float())
    assert torch.allclose(grad_threshold, -(threshold.detach() / eps) * near.sum(dim=0))
    step = _Step.apply(pre, threshold, eps)
    assert torch.equal(step.detach(), (pre.detach() > threshold.detach()).float())
    grad_pre, grad_threshold = torch.autograd.grad(step.sum(), [pre, threshold])
    assert torch.allclose(grad_threshold, -near.sum(dim=0) / eps)
    assert torch.allclose(grad_pre, near / eps)


def test_jumprelu_threshold_starts_at_the_target_firing_rate():
    x = sparse_data()
    model = create("jumprelu", d_in=32, d_sae=512)
    model.init_from_data(x[:1024])
    with torch.no_grad():
        l0 = float((model.encode_scaled(x[:1024]) > 0).sum(dim=1).float().mean())
    assert 50 < l0 < 80                                                  # about min(64, d_sae / 4)


def test_gated_starts_sparse_with_small_codes_and_revives_the_same_way():
    """By default (start_l0 64) the gate opens on about 64 of 512 latents per token at step 0 and the codes are
    those of a ReLU with the gate's bias (magnitude just above zero where the gate opens); start_l0 = 0 keeps the
    paper's zero biases (about half the latents open). A revived latent starts as sparse."""
    x = sparse_data()
    model = create("gated", d_in=32, d_sae=512)
    assert model.knobs["start_l0"] == 64
    scaled = x[:1024] * (math.sqrt(32) / x.norm(dim=1).mean())
    model.init_from_data(scaled)
    with torch.no_grad():
        codes = model.encode_scaled(scaled)                                 # [1024, 512]
        pi_gate, _ = model.paths(scaled)
    assert 56 < float((codes > 0).sum(dim=1).float().mean()) < 72
    assert torch.allclose(codes, torch.relu(pi_gate), atol=1e-5)
    paper = create("gated", d_in=32, d_sae=512, start_l0=0.0)
    paper.init_from_data(scaled)
    with torch.no_grad():
        assert float((paper.encode_scaled(scaled) > 0).sum(dim=1).float().mean()) > 150
    dead = torch.zeros(512, dtype=torch.bool)
    dead[:100] = True
    with torch.no_grad():
        assert model.revive(dead, scaled, torch.zeros_like(scaled)) == 100
        revived = model.encode_scaled(scaled)[:, dead]
    assert float((revived > 0).float().mean()) == pytest.approx(64 / 512, rel=0.1)


def test_jumprelu_default_pre_activation_loss_lifts_latents_below_their_threshold():
    """Latents pushed just below θ on every token get no gradient from the reconstruction and none from the
    L0 target (outside the kernel's window), so they stay dead; the default pre-activation loss pulls them back."""
    x = sparse_data()

    def silence(model, scaled):
        gap = (model.pre_acts(scaled)[:, :16] - model.threshold[:16]).max(dim=0).values
        model.b_enc[:16] -= gap + 0.1                               # silent on every token, outside ε/2

    def killed_then_trained(pre_act_coefficient):
        # a narrow kernel (ε 0.05), so that 0.1 below θ is outside its window: at the default ε 0.5 it is inside,
        # and the L0 target's pseudo-gradient alone could revive them
        model, _ = fit(create("jumprelu", d_in=32, d_sae=128, target_l0=8.0, bandwidth=0.05), x, steps=30)
        return firing_again_after_silencing(model, x, pre_act_coefficient, silence)

    assert killed_then_trained(0.0) == 0
    assert killed_then_trained(create("jumprelu", d_in=32, d_sae=128).knobs["pre_act_coefficient"]) >= 4


def test_jumprelu_trains_at_a_higher_default_rate_than_the_rule():
    from sae.train.options import default_lr
    from sae.variants.jumprelu import LR_FACTOR
    for d_sae in (4608, 65536):
        model = create("jumprelu", d_in=64, d_sae=d_sae)
        rule = 8e-4 * math.sqrt(16384 / d_sae)
        assert default_lr(model) == pytest.approx(min(4e-3, LR_FACTOR * rule))
        assert default_lr(model) > default_lr(create("topk", d_in=64, d_sae=d_sae, k=8))


@pytest.mark.parametrize("name", MODERN)
def test_save_load_gives_identical_outputs(name, tmp_path):
    x = sparse_data(n=600)
    model, _ = fit(create(name, d_in=32, d_sae=64, **KNOBS[name]), x, steps=20)
    assert_save_load_identical(model, x, tmp_path / "run")


@pytest.mark.parametrize("name, d_sae, knobs", [
    ("topk", 64, {"k": 64}), ("topk", 64, {"k": 100}), ("topk", 64, {"k": 0}), ("batchtopk", 64, {"k": -2}),
    ("jumprelu", 64, {"bandwidth": 0.0}), ("jumprelu", 64, {"bandwidth": -0.1}),
    ("matryoshka", 64, {"group_sizes": "16,16"}), ("matryoshka", 64, {"group_sizes": "0,64"}),
    ("matryoshka", 64, {"group_sizes": "a,b"}), ("gated", 64, {"l1_coefficient": -1.0}),
    ("topk", 64, {"auxk_coefficient": -1.0}), ("gated", 64, {"k": 4}),
])
def test_bad_knobs_are_user_errors(name, d_sae, knobs):
    with pytest.raises(UserError):
        create(name, d_in=32, d_sae=d_sae, **knobs)


@pytest.mark.parametrize("name", MODERN)
def test_reconstruct_equals_decode_of_encode_and_counts_firings(name):
    x = sparse_data(n=600) * 3.0 + 1.0                                  # raw units: input_scale matters
    model, _ = fit(create(name, d_in=32, d_sae=64, **KNOBS[name]), x, steps=20)
    model.input_scale.fill_(0.7)
    with torch.no_grad():
        codes = model.encode(x)                                          # [n, d_sae], dense
        x_hat, counts = model.reconstruct(x)
        torch.testing.assert_close(x_hat, model.decode(codes), rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, (codes > model.fire_threshold).sum(dim=0))


def test_matryoshka_prefix_residuals_match_autograd_of_the_plain_loop():
    from sae.variants.matryoshka import _PrefixResiduals
    gen = torch.Generator().manual_seed(0)
    parts = torch.randn(6, 4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    target = torch.randn(6, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, t: _PrefixResiduals.apply(p, t)[0], (parts, target))
    residual, plain = target, []
    for g in range(4):
        residual = residual - parts[:, g]
        plain.append(residual.pow(2).sum())
    squared, last = _PrefixResiduals.apply(parts, target)
    torch.testing.assert_close(squared, torch.stack(plain))
    torch.testing.assert_close(last, residual)
