"""The sparse TopK kernels against dense autograd: same forward, gradients equal to 1e-5 relative."""
import torch

import pytest

from sae.kernels.autograd import _block_count, dense_codes, sparse_decode, topk_rows, topk_select


def _relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _problem(batch=48, d_in=24, d_sae=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=gen, dtype=torch.float64)
    W_enc = torch.randn(d_in, d_sae, generator=gen, dtype=torch.float64) / d_in ** 0.5
    b_enc = torch.randn(d_sae, generator=gen, dtype=torch.float64) * 0.1
    W_dec = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64) / d_in ** 0.5
    target = torch.randn(batch, d_in, generator=gen, dtype=torch.float64)
    b_dec = torch.randn(d_in, generator=gen, dtype=torch.float64) * 0.3
    return x, W_enc, b_enc, W_dec, target, b_dec


def _grads(loss_fn, tensors, dtype=torch.float64):
    tensors = [t.detach().to(dtype).clone().requires_grad_() for t in tensors]
    loss_fn(*tensors).backward()
    return [t.grad.double() for t in tensors]


def _value(loss_fn, tensors, dtype):
    return float(loss_fn(*[t.to(dtype) for t in tensors]))


@pytest.fixture(params=["float64", "float32"])
def precision(request):
    """float64: torch's own paths (the compiled kernels of sae.native take fp32 only); float32: the compiled
    kernels where this machine builds them, torch's fp32 paths elsewhere. The reference stays float64."""
    return getattr(torch, request.param)


def test_topk_encode_decode_gradients_match_dense_autograd(precision):
    x, W_enc, b_enc, W_dec, target, b_dec = _problem()
    k = 7

    def sparse(x, W_enc, b_enc, W_dec, b_dec):
        sel = topk_select(x, W_enc, b_enc, k, b_dec=b_dec)
        return (sparse_decode(sel.values, sel.indices, W_dec) + b_dec - target).pow(2).sum()

    def dense(x, W_enc, b_enc, W_dec, b_dec):
        pre = torch.relu((x - b_dec) @ W_enc + b_enc)                     # [batch, d_sae]
        top = pre.topk(k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, top.values)
        return (codes @ W_dec + b_dec - target).pow(2).sum()

    inputs = [x, W_enc, b_enc, W_dec, b_dec]
    tolerance = 1e-9 if precision == torch.float64 else 1e-6
    assert abs(_value(sparse, inputs, precision) - float(dense(*inputs))) < tolerance * float(dense(*inputs))
    for got, want in zip(_grads(sparse, inputs, precision), _grads(dense, inputs)):
        assert _relative(got, want) < 1e-5


def test_aux_selection_gradients_match_dense_autograd(precision):
    x, W_enc, b_enc, W_dec, target, _ = _problem(seed=1)
    k, k_aux = 5, 6
    dead = torch.zeros(W_enc.shape[1], dtype=torch.bool)
    dead[::3] = True

    def sparse(x, W_enc, b_enc, W_dec):
        sel = topk_select(x, W_enc, b_enc, k, aux_mask=dead, k_aux=k_aux)
        main = sparse_decode(sel.values, sel.indices, W_dec)
        aux = sparse_decode(sel.aux_values, sel.aux_indices, W_dec)
        return (main - target).pow(2).sum() + 0.3 * (aux - target).pow(2).sum()

    def dense(x, W_enc, b_enc, W_dec):
        pre = x @ W_enc + b_enc
        top = pre.topk(k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        aux_top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
        aux_codes = torch.zeros_like(pre).scatter(1, aux_top.indices, aux_top.values.relu())
        return (codes @ W_dec - target).pow(2).sum() + 0.3 * (aux_codes @ W_dec - target).pow(2).sum()

    inputs = [x, W_enc, b_enc, W_dec]
    for got, want in zip(_grads(sparse, inputs, precision), _grads(dense, inputs)):
        assert _relative(got, want) < 1e-5


def test_batch_topk_keeps_exactly_batch_k_and_matches_dense(precision):
    x, W_enc, b_enc, W_dec, target, _ = _problem(seed=2)
    k = 4
    batch_k = k * x.shape[0]

    def sparse(x, W_enc, b_enc, W_dec):
        sel = topk_select(x, W_enc, b_enc, 2 * k, batch_k=batch_k)
        return (sparse_decode(sel.values, sel.indices, W_dec, offsets=sel.offsets) - target).pow(2).sum()

    def dense(x, W_enc, b_enc, W_dec):
        pre = torch.relu(x @ W_enc + b_enc)
        flat = pre.reshape(-1)
        top = flat.topk(batch_k)
        codes = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
        return (codes @ W_dec - target).pow(2).sum()

    sel = topk_select(x, W_enc, b_enc, 2 * k, batch_k=batch_k)
    codes = dense_codes(sel.values, sel.indices, W_enc.shape[1], sel.offsets)
    assert int((codes > 0).sum()) == batch_k
    pre = torch.relu(x @ W_enc + b_enc)
    assert torch.equal(codes > 0, pre >= pre.reshape(-1).topk(batch_k).values.min())
    inputs = [x, W_enc, b_enc, W_dec]
    for got, want in zip(_grads(sparse, inputs, precision), _grads(dense, inputs)):
        assert _relative(got, want) < 1e-5


def test_batch_topk_is_exact_when_one_token_owns_many():
    x, W_enc, b_enc, _, _, _ = _problem(seed=3)
    x[0] *= 50.0                                      # token 0 dominates the batch's top values
    sel = topk_select(x, W_enc, b_enc, 2, batch_k=40)
    codes = dense_codes(sel.values, sel.indices, W_enc.shape[1], sel.offsets)
    pre = torch.relu(x @ W_enc + b_enc)
    want = pre >= pre.reshape(-1).topk(40).values.min()
    assert torch.equal(codes > 0, want) and int(want[0].sum()) > 2


@pytest.mark.parametrize("width, k", [(96, 7), (4608, 32), (1024, 16), (97, 5), (60, 20)])
def test_topk_rows_equals_torch_topk(width, k):
    gen = torch.Generator().manual_seed(width + k)
    pre = torch.randn(64, width, generator=gen)
    pre[1] = 0.5                                        # a row of ties
    pre[2] = torch.randint(0, 4, (width,), generator=gen).float()   # many ties at the k-th value
    pre[3, : width // 2] = -1e9                         # the top k packed in one half of the row
    values, indices = topk_rows(pre, k)
    want = pre.topk(k, dim=1).values                    # sorted, for comparison
    assert torch.equal(values.sort(dim=1, descending=True).values, want)
    assert torch.equal(pre.gather(1, indices), values)
    assert bool((indices.sort(dim=1).values.diff(dim=1) > 0).all())   # k distinct latents a row
    if (width, k) in ((96, 7), (4608, 32)):
        assert _block_count(width, k) is not None       # the prefilter ran, not the fallback


def test_unit_rows_decode_removes_the_parallel_gradient():
    x, W_enc, b_enc, W_dec, target, _ = _problem(seed=4)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    sel = topk_select(x, W_enc, b_enc, 6)
    values = sel.values.detach()

    def decoded(W, unit_rows):
        return (sparse_decode(values, sel.indices, W, unit_rows=unit_rows) - target).pow(2).sum()

    plain, = _grads(lambda W: decoded(W, False), [W_dec])
    projected, = _grads(lambda W: decoded(W, True), [W_dec])
    want = plain - (plain * W_dec).sum(dim=1, keepdim=True) * W_dec     # the dense projection
    assert _relative(projected, want) < 1e-5                             # the backward works in fp32
    assert float((projected * W_dec).sum(dim=1).abs().max()) < 1e-5 * float(plain.norm())
    assert _relative(plain, want) > 1e-3                                 # the projection did something


def test_batch_topk_with_aux_gradients_match_dense_autograd(precision):
    """The flat (variable-width) selection plus the fixed-width AuxK one, through one backward."""
    x, W_enc, b_enc, W_dec, target, b_dec = _problem(seed=5)
    batch_k, k_aux = 3 * x.shape[0], 5
    dead = torch.zeros(W_enc.shape[1], dtype=torch.bool)
    dead[1::4] = True

    def sparse(x, W_enc, b_enc, W_dec, b_dec):
        sel = topk_select(x, W_enc, b_enc, 8, b_dec=b_dec, batch_k=batch_k, aux_mask=dead, k_aux=k_aux)
        assert sel.values.dim() == 1 and sel.offsets.shape == (x.shape[0] + 1,)
        main = sparse_decode(sel.values, sel.indices, W_dec, sel.order, offsets=sel.offsets)
        aux = sparse_decode(sel.aux_values, sel.aux_indices, W_dec)
        return (main + b_dec - target).pow(2).sum() + 0.3 * (aux - target).pow(2).sum()

    def dense(x, W_enc, b_enc, W_dec, b_dec):
        pre = (x - b_dec) @ W_enc + b_enc
        flat = pre.relu().reshape(-1)
        top = flat.topk(batch_k)
        codes = torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)
        aux_top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
        aux_codes = torch.zeros_like(pre).scatter(1, aux_top.indices, aux_top.values.relu())
        return (codes @ W_dec + b_dec - target).pow(2).sum() + 0.3 * (aux_codes @ W_dec - target).pow(2).sum()

    inputs = [x, W_enc, b_enc, W_dec, b_dec]
    tolerance = 1e-9 if precision == torch.float64 else 1e-6
    assert abs(_value(sparse, inputs, precision) - float(dense(*inputs))) < tolerance * float(dense(*inputs))
    for got, want in zip(_grads(sparse, inputs, precision), _grads(dense, inputs)):
        assert _relative(got, want) < 1e-5
