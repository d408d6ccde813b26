"""sae.splice: identity SAEs leave the model untouched, replacements match a hand-written hook,
and keep_mask positions keep their original activation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sae
from sae.evaluate.splice import replace, splice, zero_ablate


class IdentitySAE(nn.Module):
    """codes = x, x_hat = codes: an exact identity."""

    def __init__(self, d):
        super().__init__()
        self.d_in = self.d_sae = d
        self.anchor = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return x.clone()

    def decode(self, codes):
        return codes.clone()


class ScaleSAE(IdentitySAE):
    """x_hat = scale · x."""

    def __init__(self, d, scale):
        super().__init__(d)
        self.scale = scale

    def decode(self, codes):
        return codes * self.scale


def tiny_model(family: str):
    torch.manual_seed(0)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, vocab_size=97)).eval()
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64)).eval()
    if family == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, vocab_size=97)).eval()
    raise ValueError(family)


def site_width(model, site):
    return model.config.intermediate_size if site == "mlp_hidden" and hasattr(model.config, "intermediate_size") \
        else (4 * model.config.n_embd if site == "mlp_hidden" else model.config.hidden_size)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("site", ["resid_post", "attn_out", "mlp_out", "mlp_hidden"])
def test_identity_sae_leaves_logits_unchanged(family, site):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with splice(model, IdentitySAE(site_width(model, site)), site, 1) as handle:
            spliced = model(input_ids=ids).logits
        halved_sae = ScaleSAE(site_width(model, site), 0.5)
        with sae.splice(model, halved_sae, site=site, layer=1):
            halved = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert handle.calls == 1
    assert torch.equal(spliced, clean)
    assert not torch.allclose(halved, clean, atol=1e-4)  # the hook really acts
    assert torch.equal(after, clean)  # and is removed on exit


def test_splice_matches_hand_written_hook():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (2, 10))
    block = model.model.layers[0]

    def halve(module, args, out):
        return (out[0] * 0.5,) + tuple(out[1:]) if isinstance(out, tuple) else out * 0.5

    handle = block.register_forward_hook(halve)
    try:
        with torch.no_grad():
            expected = model(input_ids=ids).logits
    finally:
        handle.remove()
    with torch.no_grad(), splice(model, ScaleSAE(32, 0.5), "resid_post", 0):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)


def test_keep_mask_keeps_original_activation_in_every_run():
    """Spliced, zero-ablated and arbitrary replacements keep the original at masked positions,
    read independently from the next block's input (resid_pre of layer 1 = resid_post of layer 0)."""
    from sae.lm import capture

    model = tiny_model("llama")
    ids = torch.randint(0, 97, (2, 10))
    keep = torch.zeros(2, 10, dtype=torch.bool)
    keep[:, 0] = True
    keep[1, 6] = True
    with torch.no_grad():
        with capture(model, "resid_pre", [1], stop=False) as clean_seen:
            model(input_ids=ids)
        runs = {"zero": lambda: zero_ablate(model, "resid_post", 0, keep_mask=keep),
                "spliced": lambda: splice(model, ScaleSAE(32, 3.0), "resid_post", 0, keep_mask=keep),
                "custom": lambda: replace(model, "resid_post", 0, lambda x: x + 1.0, keep_mask=keep)}
        for name, make in runs.items():
            with make(), capture(model, "resid_pre", [1], stop=False) as seen:
                model(input_ids=ids)
            clean, got = clean_seen[1], seen[1]
            torch.testing.assert_close(got[keep], clean[keep], msg=name)
            expected_rest = {"zero": torch.zeros_like(clean[~keep]), "spliced": 3.0 * clean[~keep],
                             "custom": clean[~keep] + 1.0}[name]
            torch.testing.assert_close(got[~keep], expected_rest, msg=name)


def test_error_term_keeps_forward_and_passes_gradient_to_codes():
    model = tiny_model("gpt2")
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    sae_model = ScaleSAE(32, 0.25)
    with splice(model, sae_model, "resid_post", 0, error_term=True, record_codes=True) as handle:
        logits = model(input_ids=ids).logits
        codes = handle.codes
    torch.testing.assert_close(logits, clean, rtol=1e-5, atol=1e-5)
    assert codes.shape == (1, 6, 32) and codes.requires_grad
    logits.sum().backward()


def test_splice_accepts_loaded_model():
    from sae.lm import LoadedModel

    model = tiny_model("llama")
    loaded = LoadedModel(model=model, tokenizer=None, name="tiny", family="llama", n_layers=2, d_model=32,
                         is_causal=True, bos_id=1, eos_id=2, pad_id=2, special_ids={1, 2})
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with splice(loaded, ScaleSAE(32, 0.0), "resid_post", 1):
            ablated = model(input_ids=ids).logits
    assert not torch.allclose(clean, ablated)
