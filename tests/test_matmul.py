"""sae.matmul: the oneDNN fp32 product must be the same computation as torch.mm, forward and backward."""
import pytest
import torch

from sae.kernels import matmul


def _reference(bias, a, b):
    out = a.double() @ b.double()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("layout", ["row", "latent-major"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_addmm_matches_float64_forward_and_backward(layout, with_bias):
    torch.manual_seed(0)
    a = torch.randn(96, 160, requires_grad=True)
    b = torch.randn(160, 384) if layout == "row" else torch.randn(384, 160).t()   # a transposed view
    b.requires_grad_(True)
    bias = torch.randn(384, requires_grad=True) if with_bias else None
    out = matmul.addmm(bias, a, b)
    expected = _reference(bias, a, b)
    assert out.dtype == torch.float32 and out.shape == (96, 384)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)

    grad = torch.randn(96, 384)
    out.backward(grad)
    torch.testing.assert_close(a.grad.double(), grad.double() @ b.detach().double().t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b.grad.double(), a.detach().double().t() @ grad.double(), rtol=1e-5, atol=1e-4)
    assert b.grad.stride() == b.stride()        # a latent-major weight gets a latent-major gradient
    if with_bias:
        torch.testing.assert_close(bias.grad, grad.sum(dim=0), rtol=1e-5, atol=1e-4)


def test_the_fast_path_is_taken_where_it_exists():
    if not matmul.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    a, b = torch.randn(256, 128), torch.randn(128, 512)
    assert matmul._use_onednn(a, b)
    assert not matmul._use_onednn(a.double(), b.double())       # fp32 only
    assert not matmul._use_onednn(a[:2, :4], b[:4, :8])          # tiny products stay on torch.mm


def test_linear_takes_leading_dims_like_F_linear():
    torch.manual_seed(1)
    x, w, bias = torch.randn(3, 70, 128), torch.randn(200, 128), torch.randn(200)
    torch.testing.assert_close(matmul.linear(x, w, bias), torch.nn.functional.linear(x, w, bias),
                               rtol=1e-5, atol=1e-4)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("SAE_MATMUL", "torch")
    matmul.onednn_available.cache_clear()
    try:
        assert not matmul.onednn_available()
        a, b = torch.randn(256, 128), torch.randn(128, 512)
        assert torch.equal(matmul.mm(a, b), torch.mm(a, b))     # exactly torch's own product
    finally:
        monkeypatch.delenv("SAE_MATMUL")
        matmul.onednn_available.cache_clear()


def test_best_cpu_gflops_reports_each_path():
    """scripts/roofline.py (the benchmarks' roofline) measures every product path this machine has."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from roofline import best_cpu_gflops
    rates = best_cpu_gflops(64, 64, 64, repeats=2)
    assert "torch.mm" in rates and all(rate > 0 for rate in rates.values())
    assert ("onednn" in rates) == matmul.onednn_available()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_accelerated_language_model_gives_the_same_logits(family, monkeypatch):
    """A model whose linears (nn.Linear; GPT-2's Conv1D) go through sae.matmul against an untouched copy."""
    import copy

    import transformers as tf
    torch.manual_seed(0)
    if family == "llama":
        config = tf.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = tf.LlamaForCausalLM(config).eval()
    else:
        config = tf.GPT2Config(vocab_size=300, n_embd=128, n_inner=256, n_layer=2, n_head=4, n_positions=128)
        model = tf.GPT2LMHeadModel(config).eval()
    untouched = copy.deepcopy(model)
    calls = []
    real = matmul._onednn_addmm                                     # every oneDNN product goes through it
    monkeypatch.setattr(matmul, "_onednn_addmm", lambda *args: calls.append(1) or real(*args))
    n_linear = sum(1 for m in model.modules() if type(m).__name__ in ("Linear", "Conv1D"))
    assert matmul.accelerate_linears(model) == n_linear > 0
    assert matmul.accelerate_linears(model) == 0                 # idempotent
    ids = torch.randint(0, 300, (4, 64))    # every product big enough for the oneDNN path
    with torch.no_grad():
        fast, reference = model(ids).logits, untouched(ids).logits
    assert len(calls) >= n_linear
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


def test_bf16_products_round_the_inputs_and_return_fp32():
    if not matmul.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    torch.manual_seed(2)
    a, b = torch.randn(256, 128), torch.randn(128, 512)
    bias = torch.randn(512) + 100.0               # large: rounded to bf16 with the product, it would lose ~0.2
    product = a.bfloat16().double() @ b.bfloat16().double()       # rounded inputs, exact sums
    exact = matmul.addmm(bias, a, b)
    with matmul.bf16_products():
        rounded = matmul.addmm(bias, a, b)
        with matmul.bf16_products(False):                          # nesting restores the outer setting
            assert torch.equal(matmul.addmm(bias, a, b), exact)
        assert torch.equal(matmul.addmm(bias, a, b), rounded)
    assert rounded.dtype == torch.float32
    # the product rounded to bf16 (at most 2^-9 of its size), the bias added afterwards in fp32
    error = (rounded.double() - bias.double() - product).abs()
    assert bool((error <= product.abs() * 2 ** -8 + 1e-4).all()), float(error.max())
    assert not torch.equal(rounded, exact)                         # the switch did something
    assert torch.equal(matmul.addmm(bias, a, b), exact)            # and is off again outside


def test_trainer_bf16_products_train_as_well_as_fp32():
    """TopK (sparse kernels) and relu (dense autograd through sae.matmul) under `--bf16` reach the fp32 run's
    held-out FVU within a small tolerance, and the switch is recorded with the run's options."""
    if not matmul.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    from sae import variants
    from sae.train.trainer import Trainer, TrainOptions
    from variant_fitting import sparse_data
    x = sparse_data(n=6144, d_in=64, n_atoms=256, active=6)
    train, held = x[:5120], x[5120:]
    for name, knobs in (("topk", {"k": 8}), ("relu", {})):
        scores = {}
        for bf16 in (False, True):
            torch.manual_seed(0)
            model = variants.get(name).create(64, d_sae=512, **knobs)
            options = TrainOptions(tokens=256 * 120, batch_size=256, checkpoint_every=0, cpu_bf16=bf16, lr=3e-3)
            trainer = Trainer(model, options)
            assert trainer.options.to_json()["cpu_bf16"] is bf16
            trainer.init_from_sample(train[:2048])
            gen = torch.Generator().manual_seed(0)
            for _ in range(options.total_steps):
                trainer.step(train[torch.randint(len(train), (256,), generator=gen)])
            with torch.no_grad():
                model.eval()
                scores[bf16] = float((model(held) - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
        assert scores[True] < 0.5, (name, scores)                       # it learned
        assert abs(scores[True] - scores[False]) < 0.05, (name, scores)  # and as well as fp32
        assert scores[True] != scores[False], (name, scores)             # through bf16 products indeed


def test_linear_off_the_fast_path_is_exactly_F_linear():
    """Where oneDNN is not used (other dtypes, small products; CUDA likewise) the patched layers are torch's own."""
    torch.manual_seed(3)
    x, w, bias = torch.randn(3, 70, 128).double(), torch.randn(200, 128).double(), torch.randn(200).double()
    assert torch.equal(matmul.linear(x, w, bias), torch.nn.functional.linear(x, w, bias))
    small = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    assert torch.equal(matmul.linear(*small), torch.nn.functional.linear(*small))
