"""The penalty variants' sparse path (sae.kernels.autograd.list_entries, decode_listed) against dense autograd, and
the variants taking it once their codes are sparse."""
import pytest
import torch

from sae import kernels
from sae.kernels import autograd, native
from sae import variants
from sae.variants.base import StepContext


def sparse_codes(batch=64, d_sae=512, density=0.03, seed=0):
    """[batch, d_sae] codes ≥ 0 with about `density` nonzero, a leaf with autograd, plus a jump-like cut."""
    generator = torch.Generator().manual_seed(seed)
    pre = torch.randn(batch, d_sae, generator=generator)
    cut = torch.quantile(pre.reshape(-1), 1 - density)
    codes = (pre * (pre > cut)).requires_grad_()
    return codes


@pytest.mark.parametrize("compiled", [True, False])
def test_sparse_codes_decode_and_gradients_match_dense_autograd(compiled, monkeypatch):
    if compiled and not native.available():
        pytest.skip("no C compiler here")
    if not compiled:
        monkeypatch.setattr(native, "offsets_above", lambda *a, **k: None)
        monkeypatch.setattr(native, "bag_sum", lambda *a, **k: None)
        monkeypatch.setattr(native, "decoder_backward", lambda *a, **k: None)
        monkeypatch.setattr(native, "latent_major", lambda *a, **k: None)
    codes = sparse_codes()
    W_dec = torch.randn(512, 40, requires_grad=True)
    b_dec = torch.randn(40, requires_grad=True)
    target = torch.randn(64, 40)
    listing = autograd.list_entries(codes)
    assert listing is not None
    assert torch.equal(listing.offsets[1:], torch.bincount(listing.rows, minlength=64).cumsum(0))
    assert torch.equal(torch.stack([listing.rows, listing.cols]), (codes.detach() > 0).nonzero().T)
    got = autograd.decode_listed(codes[listing.rows, listing.cols], listing, W_dec, b_dec)
    (got - target).pow(2).sum().backward()
    grads = codes.grad.clone(), W_dec.grad.clone(), b_dec.grad.clone()
    codes.grad = W_dec.grad = b_dec.grad = None
    want = codes @ W_dec + b_dec                                          # the dense reference
    (want - target).pow(2).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    live = codes.detach() > 0
    # the codes' gradient where they are nonzero (a zero code's path is cut by the variant's ReLU or jump)
    torch.testing.assert_close(grads[0][live], codes.grad[live], rtol=1e-5, atol=1e-4)
    assert not grads[0][~live].any()
    torch.testing.assert_close(grads[1], W_dec.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[2], b_dec.grad, rtol=1e-5, atol=1e-4)


def test_dense_codes_or_a_sync_free_device_keep_the_dense_product(monkeypatch):
    assert autograd.list_entries(sparse_codes(density=0.5)) is None            # above SPARSE_CODES_DENSITY
    assert autograd.list_entries(torch.zeros(8, 512)) is None                  # nothing fires
    poisoned = sparse_codes().detach().clone()
    poisoned[3, 7] = float("nan")
    assert autograd.list_entries(poisoned) is None                             # a NaN must reach the loss
    monkeypatch.setattr(kernels.autograd, "SYNC_FREE_ON_CPU", True)            # what a GPU does: no host reads
    assert autograd.list_entries(sparse_codes()) is None


def test_the_variants_that_say_they_decode_sparse_are_the_ones_tested_here():
    assert {name for name in variants.names() if variants.get(name).sparse_decoding} == {"jumprelu", "gated", "l1"}


@pytest.mark.parametrize("variant,knobs", [("jumprelu", {"target_l0": 4.0}),
                                           ("jumprelu", {"target_l0": 4.0, "sparsity_penalty": "tanh"}),
                                           ("jumprelu", {"pre_act_coefficient": 0.0}),      # λ, no target
                                           ("gated", {"start_l0": 8.0}), ("gated", {"start_l0": 8.0, "p_end": 0.5}),
                                           ("l1", {}), ("l1", {"pre_act_coefficient": 0.0})])
def test_penalty_variants_train_through_the_sparse_decoder_with_dense_gradients(variant, knobs, monkeypatch):
    """A step's loss and every parameter's gradient equal those of the same step on the dense path (progress 0.5:
    gated's p-annealed penalty is mid-way), and the listed path is the one taken once the codes are sparse."""
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    sae = variants.create(variant, 32, 256, **knobs)
    sae.init_from_data(x)
    if variant == "l1" or "target_l0" not in knobs and variant == "jumprelu":   # these start dense: sparsify them
        with torch.no_grad():
            sae.b_enc -= torch.quantile(sae.pre_acts(x), 0.97, dim=0)
    calls = []
    listing = autograd.list_entries

    def counted(*args, **kwargs):
        found = listing(*args, **kwargs)
        calls.append(found is not None)
        return found

    def step():
        sae.zero_grad()
        out = sae.training_loss(x, x, StepContext(progress=0.5, sparsity_scale=1.0))
        out.loss.backward()
        return out.loss.detach(), {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}

    monkeypatch.setattr(f"sae.variants.{variant}.list_entries", counted)
    sparse_loss, sparse_grads = step()
    assert calls and all(calls)
    monkeypatch.setattr(f"sae.variants.{variant}.list_entries", lambda *a, **k: None)   # the dense path
    dense_loss, dense_grads = step()
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-5)
    assert sparse_grads.keys() == dense_grads.keys() == {name for name, p in sae.named_parameters() if p.requires_grad}
    for name in dense_grads:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("with_bias", [True, False])
def test_encode_centred_equals_the_plain_centred_product_with_its_gradients(with_bias):
    from sae.variants.base import encode_centred
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=generator) + 3.0                    # a large mean, as residual streams have
    W, b_dec = torch.randn(48, 700, generator=generator), torch.randn(48, generator=generator) + 3.0
    bias = torch.randn(700, generator=generator) if with_bias else None
    upstream = torch.randn(300, 700, generator=generator)

    def grads(encode):
        leaves = [t.clone().requires_grad_() for t in (W, b_dec) + ((bias,) if with_bias else ())]
        out = encode(*leaves)
        (out * upstream).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    got, got_grads = grads(lambda W, b_dec, *b: encode_centred(x, W, b_dec, *b))
    want, want_grads = grads(lambda W, b_dec, *b: (x - b_dec) @ W + (b[0] if b else 0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)
