"""sae.native: the compiled top-k and sampled dot products against torch's own (brute-force) results."""
import subprocess
import sys

import pytest
import torch

from sae.kernels import autograd as kernels
from sae.kernels import native

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler here: the torch path is used")


def _same_selection(pre, values, indices, k):
    expected = pre.topk(k, dim=1).values                                        # [n, k] sorted
    assert torch.equal(values.sort(dim=1, descending=True).values, expected)
    assert torch.equal(pre.gather(1, indices), values)                          # values sit at their indices
    assert all(row.unique().numel() == k for row in indices)                    # no column twice


@needs_native
@pytest.mark.parametrize("n,width,k,blocks", [(1024, 4608, 32, 64), (37, 4608, 32, 72), (5, 96, 3, 8),
                                              (64, 1000, 7, 20), (16, 4096, 100, 256)])
def test_topk_rows_equals_torch_topk(n, width, k, blocks):
    generator = torch.Generator().manual_seed(n + width)
    pre = torch.randn(n, width, generator=generator)
    values, indices = native.topk_rows(pre, k, blocks)
    _same_selection(pre, values, indices, k)


@needs_native
def test_topk_rows_ties_constants_infinities_and_nan_rows():
    pre = torch.randn(8, 512)
    pre[0] = 0.0                                             # all equal: any k columns, all distinct
    pre[1] = torch.randint(0, 3, (512,)).float()             # heavy ties at the k-th value
    pre[2, ::7] = float("inf")                               # more infinities than k
    pre[3] = float("-inf"); pre[3, 5] = 1.0                  # one finite entry among -inf
    pre[4, 100] = float("nan")                               # redone by torch.topk (NaN first)
    values, indices = native.topk_rows(pre, 16, 32)
    ok = [0, 1, 2, 3, 5, 6, 7]
    _same_selection(pre[ok], values[ok], indices[ok], 16)
    reference = pre[4:5].topk(16, dim=1, sorted=False)
    assert torch.isnan(values[4]).sum() == 1 and torch.equal(indices[4].sort().values,
                                                            reference.indices[0].sort().values)


@needs_native
def test_kernels_topk_rows_takes_the_compiled_path_and_agrees():
    pre = torch.randn(300, 4608)
    assert kernels._native_block_count(4608, 32) == 64
    values, indices = kernels.topk_rows(pre, 32)
    _same_selection(pre, values, indices, 32)
    assert native.topk_rows(pre.t().contiguous().t(), 32, 64) is None   # not row-major: the torch path's job
    assert native.topk_rows(pre.double(), 32, 64) is None


def test_selected_dots_match_brute_force_both_forms():
    dense, rows = torch.randn(40, 64), torch.randn(200, 64)
    indices = torch.randint(0, 200, (40, 5))
    expected = (dense[:, None, :] * rows[indices]).sum(-1)
    torch.testing.assert_close(kernels.selected_dots(dense, rows, indices), expected, rtol=1e-5, atol=1e-5)
    offsets = torch.tensor([0, 3, 3, 8])                                        # flat, a token with none
    flat = torch.randint(0, 200, (8,))
    bags = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2])
    torch.testing.assert_close(kernels.selected_dots(dense[:3], rows, flat, offsets),
                               (dense[bags] * rows[flat]).sum(-1), rtol=1e-5, atol=1e-5)


def test_switched_off_by_environment():
    code = "import sae.kernels.native as n, sae.kernels.autograd as k, torch; p = torch.randn(64, 4608); " \
           "v, i = k.topk_rows(p, 32); assert n.library() is None; " \
           "assert torch.equal(v.sort(1, descending=True).values, p.topk(32, 1).values); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "SAE_NATIVE": "0"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_no_compiler_means_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    native.library.cache_clear()
    try:
        assert native.library() is None and native.topk_rows(torch.randn(4, 64), 2, 8) is None
        values, _ = kernels.topk_rows(torch.ones(4, 64), 2)
        assert values.shape == (4, 2)
    finally:
        native.library.cache_clear()


@needs_native
def test_normalize_rows_and_weighted_row_sum_equal_torch():
    rows = torch.randn(700, 96) * 5
    rows[3] = 0.0                                                               # a zero row stays zero (eps)
    expected = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-8)
    assert native.normalize_rows_(rows, 1e-8)
    torch.testing.assert_close(rows, expected, rtol=1e-6, atol=1e-7)
    weights = torch.randn(700)
    got = native.weighted_row_sum(rows, weights, -2.0)
    torch.testing.assert_close(got.double(), -2.0 * (weights.double() @ rows.double()), rtol=1e-5, atol=1e-5)
    assert native.weighted_row_sum(rows.t(), torch.randn(96)) is None            # not row-major: torch's job
    assert not native.normalize_rows_(rows.t(), 1e-8)


@needs_native
def test_the_fp32_training_path_runs_on_the_compiled_kernels(monkeypatch):
    """test_kernels' float32 cases compare these paths with dense autograd; here: they are the ones taken."""
    used = set()
    for name in ("topk_rows", "bag_sum", "decoder_backward", "latent_major", "weighted_row_sum"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _f=original, _n=name, **k: used.add(_n) or _f(*a, **k))
    W_dec = torch.randn(96, 24)
    W_enc = torch.nn.Parameter(W_dec.clone().t())                           # [24, 96] latent-major, as the variants keep it
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(96)), torch.nn.Parameter(torch.zeros(24))
    W_dec = torch.nn.Parameter(W_dec)
    sel = kernels.topk_select(torch.randn(48, 24), W_enc, b_enc, 7, b_dec=b_dec)
    kernels.sparse_decode(sel.values, sel.indices, W_dec, sel.order, unit_rows=True).pow(2).sum().backward()
    assert used == {"topk_rows", "bag_sum", "decoder_backward", "latent_major", "weighted_row_sum"}


@needs_native
def test_entries_above_lists_every_entry_over_the_bound_in_row_order():
    pre = torch.randn(70, 4608)
    pre[3, :40] = 0.5                                                           # exactly the bound: not above
    rows, cols, values = native.entries_above(pre, 0.5)
    want_rows, want_cols = (pre > 0.5).nonzero(as_tuple=True)                   # row-major order
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
    assert torch.equal(values, pre[want_rows, want_cols])
    assert native.entries_above(pre, float("inf")) is None                      # the torch path's job
