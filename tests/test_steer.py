"""sae.steer / sae.ablate on a tiny Llama, checked with a hook of the test's own: the residual stream that
reaches the next layer moves by exactly (value − code) · the feature's raw decoder direction, computed here
from W_dec and input_scale and from decode() itself."""
from __future__ import annotations

import pytest
import torch

import sae
from sae import variants

LAYER = 1


@pytest.fixture(scope="module")
def setup(tiny_lm):
    loaded = tiny_lm("llama")
    torch.manual_seed(0)
    model = variants.create("relu", d_in=32, d_sae=64)
    with torch.no_grad():
        model.input_scale.fill_(3.7)          # raw units differ from the SAE's scaled ones
        model.b_enc.add_(0.5)                 # many features fire
    ids = torch.randint(4, 90, (2, 12))
    return loaded, model, ids


def next_layer_input(loaded, ids):
    """[batch, seq, d] what layer LAYER + 1 receives: the site resid_post of LAYER after any steering."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone()
    handle = loaded.model.model.layers[LAYER + 1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            loaded.model(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"]


def raw_direction(model, j):
    """Feature j's decoder direction in raw units, two ways: W_dec / input_scale and decode(e_j) − decode(0)."""
    by_weights = model.W_dec[j].detach() / model.input_scale
    e = torch.zeros(2, model.d_sae)
    e[1, j] = 1.0
    with torch.no_grad():
        decoded = model.decode(e)
    torch.testing.assert_close(decoded[1] - decoded[0], by_weights, rtol=1e-5, atol=1e-6)
    return by_weights


def test_decoder_directions_raw_are_the_decoders_own_rows_in_raw_units(setup):
    _, model, _ = setup
    rows = model.decoder_directions_raw()
    for j in (0, 7, 63):
        torch.testing.assert_close(rows[j], raw_direction(model, j))
    torch.testing.assert_close(model.W_dec_raw, rows)
    assert not torch.allclose(rows, model.W_dec)           # W_dec stays in scaled units


def test_steering_sets_the_features_code(setup):
    loaded, model, ids = setup
    clean = next_layer_input(loaded, ids)                   # [2, 12, 32]
    features = {3: 5.0, 40: 0.0}
    with sae.steer(loaded.model, model, site="resid_post", layer=LAYER, features=features):
        steered = next_layer_input(loaded, ids)
    with torch.no_grad():
        codes = model.encode(clean.reshape(-1, 32))       # [24, 64]
    expected = sum((value - codes[:, j])[:, None] * raw_direction(model, j)[None, :] for j, value in features.items())
    assert codes[:, 3].abs().sum() > 0 or codes[:, 40].abs().sum() > 0
    torch.testing.assert_close((steered - clean).reshape(-1, 32), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(next_layer_input(loaded, ids), clean)   # the hook is gone after the block


def test_add_mode_and_ablation(setup):
    loaded, model, ids = setup
    clean = next_layer_input(loaded, ids)
    with sae.steer(loaded.model, model, site="resid_post", layer=LAYER, features={9: 2.5}, mode="add"):
        added = next_layer_input(loaded, ids)
    torch.testing.assert_close(added - clean, (2.5 * raw_direction(model, 9)).expand_as(clean), rtol=1e-4,
                               atol=1e-5)
    with sae.ablate(loaded.model, model, site="resid_post", layer=LAYER, features=[9, 11]):
        ablated = next_layer_input(loaded, ids)
    with torch.no_grad():
        codes = model.encode(clean.reshape(-1, 32))
    expected = -(codes[:, [9, 11]] @ torch.stack([raw_direction(model, 9), raw_direction(model, 11)]))
    torch.testing.assert_close((ablated - clean).reshape(-1, 32), expected, rtol=1e-4, atol=1e-5)


def test_bad_features_are_refused(setup):
    loaded, model, _ = setup
    with pytest.raises(ValueError, match="out of range"):
        with sae.steer(loaded.model, model, site="resid_post", layer=LAYER, features={64: 1.0}):
            pass
    with pytest.raises(ValueError, match="unknown steering mode"):
        with sae.steer(loaded.model, model, site="resid_post", layer=LAYER, features={1: 1.0}, mode="double"):
            pass
