"""Sites per model family, each built tiny from its transformers config: attn_out + mlp_out is exactly what the
block adds to the residual stream (post-norm "sandwich" blocks, parallel blocks and post-LN BERT included),
attn_z through the output projection gives the attention's output, mlp_in is the MLP's input, and every site
equals a hand-written hook on a hand-written module path (no sae code involved in the reference)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import sae.collect.loop as collect_lib
from sae.errors import UserError
from sae.lm import SITES, capture, replace_site, run_until_captured, site_point, wrap
from sae.store import ActivationStore

V = 96
LM = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=128, pad_token_id=3, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
KV = dict(num_key_value_heads=2)
SMALL = dict(vocab_size=V, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
             bos_token_id=1, eos_token_id=2)


def _configs():
    import transformers as tf
    return {  # family: (model class, config)
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**LM, **KV)),
        "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**LM, **KV, sliding_window=None)),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**LM, **KV)),
        "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**LM, **KV, head_dim=8)),
        "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**LM, **KV, head_dim=8)),
        # n_heads * head_dim = 48 != d_model 32, as in real Gemma 2 (8 x 256 vs 2304)
        "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**LM, **KV, head_dim=12, query_pre_attn_scalar=12,
                                                          sliding_window=8)),
        "gemma3": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**LM, **KV, head_dim=8, sliding_window=8)),
        "olmo2": (tf.Olmo2ForCausalLM, tf.Olmo2Config(**LM, **KV)),
        "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(**LM, **KV)),
        "phi": (tf.PhiForCausalLM, tf.PhiConfig(**LM)),
        "cohere": (tf.CohereForCausalLM, tf.CohereConfig(**LM, **KV)),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(**SMALL)),
        "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**LM)),  # use_parallel_residual=True
        "gpt_neox_serial": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**LM, use_parallel_residual=False)),
        "gptj": (tf.GPTJForCausalLM, tf.GPTJConfig(**SMALL, rotary_dim=4)),
        "bert": (tf.BertForMaskedLM, tf.BertConfig(**LM)),
        "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig(**LM, **KV, num_local_experts=2, num_experts_per_tok=1)),
        "granite": (tf.GraniteForCausalLM, tf.GraniteConfig(**LM, **KV, residual_multiplier=0.5)),
        "gemma4": (tf.Gemma4ForCausalLM, tf.Gemma4TextConfig(**LM, **KV, head_dim=8)),
    }


def build(family: str):
    cls, config = _configs()[family]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(config).eval()


# Written by hand from each family's modeling code: (blocks, attention, its output projection, MLP,
# the norms on the attention / MLP outputs before the residual add or None, residual: "pre" (x + attn + mlp,
# serial or parallel) or "post_ln" (BERT: LayerNorm after each add))
HAND = {
    "llama": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", None, "pre"),
    "mistral": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", None, "pre"),
    "qwen2": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", None, "pre"),
    "qwen3": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", None, "pre"),
    "gemma": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", None, "pre"),
    "gemma2": ("model.layers", "self_attn", "self_attn.o_proj", "mlp",
               ("post_attention_layernorm", "post_feedforward_layernorm"), "pre"),
    "gemma3": ("model.layers", "self_attn", "self_attn.o_proj", "mlp",
               ("post_attention_layernorm", "post_feedforward_layernorm"), "pre"),
    "olmo2": ("model.layers", "self_attn", "self_attn.o_proj", "mlp",
              ("post_attention_layernorm", "post_feedforward_layernorm"), "pre"),
    "phi3": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", None, "pre"),
    "phi": ("model.layers", "self_attn", "self_attn.dense", "mlp", None, "pre"),
    "cohere": ("model.layers", "self_attn", "self_attn.o_proj", "mlp", None, "pre"),
    "gpt2": ("transformer.h", "attn", "attn.c_proj", "mlp", None, "pre"),
    "gpt_neox": ("gpt_neox.layers", "attention", "attention.dense", "mlp", None, "pre"),
    "gpt_neox_serial": ("gpt_neox.layers", "attention", "attention.dense", "mlp", None, "pre"),
    "gptj": ("transformer.h", "attn", "attn.out_proj", "mlp", None, "pre"),
    "bert": ("bert.encoder.layer", "attention.output.dropout", "attention.output.dense", "intermediate",
             None, "post_ln"),
}
FAMILIES = tuple(HAND)
LAYER = 1


def hand_read(model, family, input_ids):
    """{name: [B, T, .]} at LAYER from hooks on the hand-written paths above."""
    blocks, attn, proj, mlp, post_norms, _ = HAND[family]
    block = model.get_submodule(f"{blocks}.{LAYER}")
    seen = {}

    def first(value):
        return value[0] if isinstance(value, (tuple, list)) else value

    def out_hook(name):
        return lambda module, args, output: seen.__setitem__(name, first(output))

    def in_hook(name):
        return lambda module, args, kwargs: seen.__setitem__(
            name, args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()))))

    handles = [block.register_forward_pre_hook(in_hook("resid_pre"), with_kwargs=True),
               block.register_forward_hook(out_hook("resid_post")),
               block.get_submodule(attn).register_forward_hook(out_hook("attn_raw")),
               block.get_submodule(proj).register_forward_pre_hook(in_hook("attn_z"), with_kwargs=True),
               block.get_submodule(mlp).register_forward_pre_hook(in_hook("mlp_in"), with_kwargs=True)]
    if family == "bert":
        handles.append(block.get_submodule("output.dropout").register_forward_hook(out_hook("mlp_raw")))
    else:
        handles.append(block.get_submodule(mlp).register_forward_hook(out_hook("mlp_raw")))
    if post_norms:
        handles += [block.get_submodule(post_norms[0]).register_forward_hook(out_hook("attn_out")),
                    block.get_submodule(post_norms[1]).register_forward_hook(out_hook("mlp_out"))]
    with torch.no_grad():
        model(input_ids=input_ids)
    for handle in handles:
        handle.remove()
    if not post_norms:
        seen["attn_out"], seen["mlp_out"] = seen["attn_raw"], seen["mlp_raw"]
    return seen, block


def sae_read(model, site, input_ids):
    with torch.no_grad(), capture(model, site, [LAYER]) as captured:
        run_until_captured(model, input_ids=input_ids)
    return captured[LAYER]


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_add_up_to_the_residual_stream(family):
    model = build(family)
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    ref, block = hand_read(model, family, ids)
    got = {site: sae_read(model, site, ids) for site in SITES if site != "mlp_hidden"}
    for site, value in got.items():
        torch.testing.assert_close(value, ref[site], atol=0, rtol=0, msg=f"{family} {site}")
    assert got["resid_post"].abs().max() > 1  # weights big enough for the identities below to mean something
    tol = dict(atol=1e-5, rtol=1e-5)
    if HAND[family][5] == "pre":
        torch.testing.assert_close(got["resid_pre"] + got["attn_out"] + got["mlp_out"], got["resid_post"], **tol)
    else:  # post-LN: resid_post = LN2(LN1(resid_pre + attn_out) + mlp_out), and mlp_in = LN1(resid_pre + attn_out)
        ln1, ln2 = block.attention.output.LayerNorm, block.output.LayerNorm
        with torch.no_grad():
            torch.testing.assert_close(ln1(got["resid_pre"] + got["attn_out"]), got["mlp_in"], **tol)
            torch.testing.assert_close(ln2(got["mlp_in"] + got["mlp_out"]), got["resid_post"], **tol)
    # attn_z through the output projection (weight and bias) is the attention's output before any post-norm
    proj = block.get_submodule(HAND[family][2])
    weight = proj.weight if type(proj).__name__ != "Conv1D" else proj.weight.T  # GPT-2 Conv1D stores [in, out]
    with torch.no_grad():
        projected = got["attn_z"] @ weight.T + (proj.bias if proj.bias is not None else 0)
    torch.testing.assert_close(projected, ref["attn_raw"], **tol)
    n_heads = model.config.num_attention_heads if hasattr(model.config, "num_attention_heads") else model.config.n_head
    head_dim = getattr(model.config, "head_dim", None) or got["resid_pre"].shape[-1] // n_heads
    assert got["attn_z"].shape == (2, 12, n_heads * head_dim)
    assert got["mlp_in"].shape == got["resid_pre"].shape


@pytest.mark.parametrize("family", [f for f in FAMILIES if HAND[f][5] == "pre"])
def test_replacing_attn_out_removes_exactly_the_attention(family):
    """replace_site at attn_out acts on what joins the residual stream: set to 0.5 everywhere (not 0: a
    post-norm maps 0 to 0), the block adds 0.5 plus its MLP."""
    model = build(family)
    ids = torch.randint(4, 90, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), replace_site(model, "attn_out", LAYER, lambda x: torch.full_like(x, 0.5)), \
            capture(model, "resid_pre", [LAYER], stop=False) as pre, \
            capture(model, "mlp_out", [LAYER], stop=False) as mlp, \
            capture(model, "resid_post", [LAYER], stop=False) as post:
        model(input_ids=ids)
    torch.testing.assert_close(pre[LAYER] + 0.5 + mlp[LAYER], post[LAYER], atol=1e-5, rtol=1e-5)


def test_post_norm_attention_is_told_by_structure_not_name():
    """Llama's post_attention_layernorm is the MLP's pre-norm (its output is mlp_in); Gemma 2's is attn_out."""
    llama, gemma2 = build("llama"), build("gemma2")
    assert site_point(llama, "attn_out", 0).path == "model.layers.0.self_attn"
    assert site_point(llama, "mlp_in", 0).path == "model.layers.0.mlp"
    assert site_point(gemma2, "attn_out", 0).path == "model.layers.0.post_attention_layernorm"
    assert site_point(gemma2, "mlp_out", 0).path == "model.layers.0.post_feedforward_layernorm"
    assert site_point(gemma2, "attn_z", 0).path == "model.layers.0.self_attn.o_proj"


def test_blocks_that_do_not_split_and_sites_a_family_lacks_are_refused():
    granite, gemma4, mixtral = build("granite"), build("gemma4"), build("mixtral")
    for site in ("attn_out", "mlp_out"):  # Granite scales each sublayer; Gemma 4 adds per-layer inputs
        with pytest.raises(UserError, match="residual_multiplier"):
            site_point(granite, site, 0)
        with pytest.raises(UserError, match="does not add just attention"):
            site_point(gemma4, site, 0)
    for site in ("resid_pre", "mlp_in", "attn_z"):
        site_point(granite, site, 0)
        site_point(gemma4, site, 0)
    with pytest.raises(UserError, match="MLP output projection"):  # a mixture of experts has no single one
        site_point(mixtral, "mlp_hidden", 0)
    llama = build("llama")
    attn = llama.model.layers[0].self_attn
    attn.register_module("proj", attn.o_proj)
    del attn.o_proj
    with pytest.raises(UserError, match="attention output projection"):
        site_point(llama, "attn_z", 0)
    mha = torch.nn.Module()
    mha.self_attn = torch.nn.MultiheadAttention(8, 2)  # uses out_proj's weights without calling the module
    with pytest.raises(UserError, match="does not expose"):
        site_point(_one_block_model(mha), "attn_z", 0)


def _one_block_model(block):
    model = torch.nn.Module()
    model.config = type("Config", (), {"num_hidden_layers": 1})()
    model.layers = torch.nn.ModuleList([block])
    return model


# ---- through the CLI: `python -m sae collect --site attn_z / mlp_in` on tiny saved model folders -------------

def _collect(*args):
    return subprocess.run([sys.executable, "-m", "sae", "collect", *map(str, args)], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and "Loading weights" not in line]


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    gen = torch.Generator().manual_seed(2)
    lines = [json.dumps({"text": " ".join(words[int(j)] for j in torch.randint(0, 10, (9,), generator=gen))})
             for _ in range(12)]
    path = tmp_path_factory.mktemp("site_docs") / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _saved(family, folder, tokenizer):
    model = build(family)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cli_collect_attn_z_and_mlp_in_store_what_a_hand_hook_reads(family, docs, tmp_path, tiny_tokenizer):
    from sae.lm import load_model
    folder = _saved(family, tmp_path / "model", tiny_tokenizer)
    procs = {site: subprocess.Popen(
        [sys.executable, "-m", "sae", "collect", "--model", str(folder), "--dataset", str(docs), "--layers",
         str(LAYER), "--site", site, "--context-size", "16", "--tokens", "60", "--out", str(tmp_path / site)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}) for site in ("attn_z", "mlp_in")}
    hf = load_model(str(folder)).model
    for site, proc in procs.items():
        _, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        store = ActivationStore(tmp_path / site)
        assert len(store) == 60
        for i in range(len(store.shards)):
            windows = store.read_shard(i, "window_tokens").long()
            w, p = store.read_shard(i, "window_index"), store.read_shard(i, "position").long()
            expected = hand_read(hf, family, windows)[0][site][w, p]
            stored = store.read_shard(i, f"activations.{LAYER}")
            torch.testing.assert_close(stored, expected, atol=1e-5, rtol=1e-5, msg=f"{family} {site}")


def test_cli_refuses_a_site_the_family_lacks(docs, tmp_path, tiny_tokenizer, capsys, monkeypatch):
    folder = _saved("mixtral", tmp_path / "mixtral", tiny_tokenizer)
    done = _collect("--model", folder, "--dataset", docs, "--layers", 0, "--site", "mlp_hidden",
                    "--context-size", 16, "--out", tmp_path / "o1")
    lines = _error_lines(done.stderr)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "MLP output projection" in lines[0], done.stderr
    # attn_z on a model whose attention has no output projection module (in-process: the same CLI entry point)
    from sae.cli import main
    loaded = wrap(build("llama"), tiny_tokenizer, name="tiny-llama")
    for block in loaded.model.model.layers:
        block.self_attn.register_module("proj", block.self_attn.o_proj)
        del block.self_attn.o_proj
    monkeypatch.setattr(collect_lib, "load_model", lambda *args, **kwargs: loaded)
    monkeypatch.setattr(collect_lib, "check_before_loading", lambda options: None)   # no folder to read early
    capsys.readouterr()  # drop save_pretrained's progress bars
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--model", "tiny-llama", "--dataset", str(docs), "--layers", "0", "--site", "attn_z",
              "--context-size", "16", "--out", str(tmp_path / "o2")])
    lines = _error_lines(capsys.readouterr().err)
    assert exit_info.value.code != 0
    assert len(lines) == 1 and lines[0].startswith("error: ") and "attention output projection" in lines[0], lines
