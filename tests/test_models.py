"""sae.models: site resolution per family against hand-written hooks, early stop, replace_site, loading."""
import pytest
import torch

from sae.errors import UserError
from sae.lm import (SITES, capture, load_model, replace_site, run_until_captured, site_point, unembedding,
                        wrap)

FAMILIES = ("llama", "gpt2", "gpt_neox", "bert")

# Independent module paths, written by hand per family: (blocks, attention, mlp, mlp-hidden function)
PATHS = {
    "llama": ("model.layers", "self_attn", "mlp", lambda mlp, x: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)),
    "gpt2": ("transformer.h", "attn", "mlp", lambda mlp, x: mlp.act(mlp.c_fc(x))),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp", lambda mlp, x: mlp.act(mlp.dense_h_to_4h(x))),
    "bert": ("bert.encoder.layer", "attention.output.dense", "output.dense", None),
}
INPUT_PATHS = {  # modules whose input is (mlp_in, attn_z), by hand
    "llama": ("mlp", "self_attn.o_proj"), "gpt2": ("mlp", "attn.c_proj"),
    "gpt_neox": ("mlp", "attention.dense"), "bert": ("intermediate", "attention.output.dense"),
}


def reference(loaded, layer, input_ids):
    """Every site at `layer`, read by our own hooks and hidden_states (no sae code involved)."""
    hf = loaded.model
    blocks, attn_path, mlp_path, hidden_fn = PATHS[loaded.family]
    block = hf.get_submodule(f"{blocks}.{layer}")
    seen = {}
    handles = [block.get_submodule(attn_path).register_forward_hook(
        lambda m, a, o: seen.__setitem__("attn_out", o[0] if isinstance(o, tuple) else o))]
    for site, path in zip(("mlp_in", "attn_z"), INPUT_PATHS[loaded.family]):
        handles.append(block.get_submodule(path).register_forward_pre_hook(
            lambda m, a, site=site: seen.__setitem__(site, a[0])))
    if loaded.family == "bert":
        handles.append(block.get_submodule("output.dense").register_forward_hook(
            lambda m, a, o: seen.__setitem__("mlp_out", o)))
        handles.append(block.get_submodule("intermediate").register_forward_hook(
            lambda m, a, o: seen.__setitem__("mlp_hidden", o)))
    else:
        mlp = block.get_submodule(mlp_path)

        def mlp_hook(m, a, o):
            seen["mlp_out"] = o
            seen["mlp_hidden"] = hidden_fn(mlp, a[0])
        handles.append(mlp.register_forward_hook(mlp_hook))
    with torch.no_grad():
        out = hf(input_ids=input_ids, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    seen["resid_pre"] = out.hidden_states[layer]
    seen["resid_post"] = out.hidden_states[layer + 1]
    return seen, out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_matches_an_independent_hook(tiny_lm, family):
    loaded = tiny_lm(family)
    input_ids = torch.randint(4, 90, (2, 12))
    layer = 1
    expected, _ = reference(loaded, layer, input_ids)
    for site in SITES:
        with torch.inference_mode(), capture(loaded.model, site, [layer, 2]) as captured:
            run_until_captured(loaded.model, input_ids=input_ids)
        assert captured[layer].shape == (2, 12, loaded.d_model if site != "mlp_hidden" else 64), site
        torch.testing.assert_close(captured[layer], expected[site], atol=1e-5, rtol=1e-5, msg=site)
    if family != "bert":  # pre-LN: the residual stream adds exactly the two block outputs
        torch.testing.assert_close(expected["resid_post"] - expected["resid_pre"],
                                   expected["attn_out"] + expected["mlp_out"], atol=1e-5, rtol=1e-4)


def test_module_path_site_and_input_suffix(tiny_lm):
    loaded = tiny_lm("llama")
    ids = torch.randint(4, 90, (1, 8))
    expected, _ = reference(loaded, 2, ids)
    with capture(loaded.model, "model.layers.{layer}.mlp", [2]) as a, torch.no_grad():
        run_until_captured(loaded.model, input_ids=ids)
    with capture(loaded.model, "model.layers.2.mlp.down_proj:input", ["x"]) as b, torch.no_grad():
        run_until_captured(loaded.model, input_ids=ids)
    torch.testing.assert_close(a[2], expected["mlp_out"])
    torch.testing.assert_close(b["x"], expected["mlp_hidden"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_stops_after_the_deepest_hooked_layer(tiny_lm, family):
    loaded = tiny_lm(family, n_layers=6)
    blocks = loaded.model.get_submodule(PATHS[family][0])
    calls = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, block in enumerate(blocks)]
    head = loaded.model.get_output_embeddings()
    handles.append(head.register_forward_hook(lambda m, a, o: calls.append("head")))
    ids = torch.randint(4, 90, (1, 8))
    with torch.no_grad(), capture(loaded.model, "resid_post", [1, 3]) as captured:
        assert run_until_captured(loaded.model, input_ids=ids) is None
    assert calls == [0, 1, 2, 3] and set(captured) == {1, 3}
    calls.clear()
    with torch.no_grad(), capture(loaded.model, "resid_pre", [2]):
        run_until_captured(loaded.model, input_ids=ids)
    assert calls == [0, 1]  # resid_pre of layer 2 needs only layers 0 and 1
    calls.clear()
    with torch.no_grad(), capture(loaded.model, "resid_post", [1], stop=False):
        out = run_until_captured(loaded.model, input_ids=ids)
    assert calls == [0, 1, 2, 3, 4, 5, "head"] and out is not None
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_site_changes_the_forward(tiny_lm, family):
    loaded = tiny_lm(family)
    ids = torch.randint(4, 90, (2, 10))
    with torch.no_grad():
        clean = loaded.model(input_ids=ids).logits
        with replace_site(loaded.model, "resid_post", 1, lambda x: x.clone()):
            same = loaded.model(input_ids=ids).logits
        with replace_site(loaded.model, "mlp_hidden", 1, torch.zeros_like):
            ablated = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(same, clean)
    assert not torch.allclose(ablated, clean, atol=1e-4)
    if family != "bert":
        # zeroing attn_out at a layer: resid_post = resid_pre + mlp_out exactly
        with torch.no_grad(), replace_site(loaded.model, "attn_out", 1, torch.zeros_like):
            with capture(loaded.model, "resid_pre", [1], stop=False) as pre, \
                    capture(loaded.model, "resid_post", [1], stop=False) as post, \
                    capture(loaded.model, "mlp_out", [1], stop=False) as mlp:
                loaded.model(input_ids=ids)
        torch.testing.assert_close(post[1], pre[1] + mlp[1], atol=1e-5, rtol=1e-5)
    # replace_site on resid_pre (an input site) takes effect as well
    with torch.no_grad(), replace_site(loaded.model, "resid_pre", 0, torch.zeros_like):
        zeroed = loaded.model(input_ids=ids).logits
    assert not torch.allclose(zeroed, clean, atol=1e-4)


def test_bad_sites_and_layers(tiny_lm):
    loaded = tiny_lm("gpt2")
    with pytest.raises(UserError, match=r"layers 0\.\.3"):
        site_point(loaded.model, "resid_post", 4)
    with pytest.raises(UserError, match="resid_pre, resid_post, attn_out, mlp_out, mlp_hidden"):
        site_point(loaded.model, "residual", 0)
    with pytest.raises(UserError, match="unknown model"):
        load_model("no-such-owner/no-such-model-xyz")
    with pytest.raises(UserError):
        load_model("/nonexistent/folder")


def test_unembedding(tiny_lm):
    loaded = tiny_lm("llama")
    W_U, norm = unembedding(loaded)
    assert W_U.shape == (96, 32) and norm.shape == (32,)
    assert W_U.data_ptr() == loaded.model.lm_head.weight.data_ptr()


def test_load_model_from_a_local_folder(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    assert (loaded.family, loaded.n_layers, loaded.d_model, loaded.is_causal) == ("llama", 4, 32, True)
    assert (loaded.bos_id, loaded.eos_id) == (1, 2) and {1, 2, 3} <= loaded.special_ids
    assert not loaded.model.training


def test_wrap_bert_is_not_causal(tiny_lm):
    assert not tiny_lm("bert").is_causal and tiny_lm("gpt_neox").is_causal


@pytest.mark.slow
def test_embedded_smollm2(smollm2):
    assert (smollm2.family, smollm2.n_layers, smollm2.d_model) == ("llama", 30, 576)
    assert "Q4_1" in smollm2.note and smollm2.bos_id is not None
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad(), capture(smollm2.model, "resid_post", [6]) as captured:
        run_until_captured(smollm2.model, input_ids=ids)
    with torch.no_grad():
        hidden = smollm2.model(input_ids=ids, output_hidden_states=True).hidden_states[7]
    torch.testing.assert_close(captured[6], hidden)
    assert wrap(smollm2.model, smollm2.tokenizer).n_layers == 30
