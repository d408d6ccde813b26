"""--model-dtype: the model is read straight into its dtype (no fp32 copy in host memory first), the dtype is
recorded in the store manifest, eval.json and run configs, and stores follow the model's dtype."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae.errors import UserError
from sae.lm.loading import load_model, parse_model_dtype
from sae.store import ActivationStore

HERE = Path(__file__).parent
DTYPES = ["float32", "bfloat16"]   # what every x86/ARM CPU runs; float16 is checked at load only


def sae_main(capsys, *args):
    from sae.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import write_labelled_corpus
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    return write_labelled_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", words, 60, (8, 30), seed=0)


def test_parse_model_dtype_and_one_line_refusals(tiny_llama_dir, corpus, tmp_path, capsys):
    assert parse_model_dtype("auto", "cpu") == torch.float32
    assert parse_model_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert parse_model_dtype(None, "cuda:1") == torch.bfloat16
    assert parse_model_dtype("bfloat16") == torch.bfloat16 and parse_model_dtype("float16") == torch.float16
    assert parse_model_dtype(torch.float32) == torch.float32
    with pytest.raises(UserError, match="--model-dtype 'fp8' is not one of auto, float32, bfloat16, float16"):
        parse_model_dtype("fp8")
    from sae.collect import CollectOptions
    with pytest.raises(UserError, match="--model-dtype"):
        CollectOptions(model="m", layers=[0], site="resid_post", dataset="d", out=tmp_path / "x", model_dtype="half")
    for command in (["collect", "--model", tiny_llama_dir, "--dataset", corpus, "--layers", "0", "--out", tmp_path / "s"],
                    ["eval", "--run", tmp_path / "r", "--activations", tmp_path / "s"],
                    ["analyze", "--run", tmp_path / "r", "--activations", tmp_path / "s"],
                    ["sweep", "--activations", tmp_path / "s", "--out", tmp_path / "w"],
                    ["train", "--model", tiny_llama_dir, "--layers", "0", "--variant", "relu", "--out", tmp_path / "t"]):
        status, _, err = sae_main(capsys, *command, "--model-dtype", "fp8")
        assert status == 2 and len(err.strip().splitlines()) == 1, (command, err)
        assert "--model-dtype" in err and "auto, float32, bfloat16, float16" in err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_loaded_parameters_have_the_asked_dtype(tiny_llama_dir, dtype):
    loaded = load_model(str(tiny_llama_dir), "cpu", dtype)
    floating = {p.dtype for p in loaded.model.parameters() if p.is_floating_point()}
    assert floating == {getattr(torch, dtype)}
    assert load_model(str(tiny_llama_dir), "cpu").model.dtype == torch.float32   # auto on the CPU


_MEASURE = r"""
import gc, json, sys
import torch, transformers
from safetensors import safe_open
from sae.lm.loading import load_model, load_tokenizer
folder, dtype = sys.argv[1], sys.argv[2]
load_tokenizer(folder)                                  # every import and lazy module before the baseline
with torch.device("meta"):
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
with safe_open(folder + "/model.safetensors", "pt"):
    pass

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

gc.collect()
with open("/proc/self/clear_refs", "w") as handle:      # resets the peak (VmHWM) to the current RSS
    handle.write("5")
before = kib("VmRSS")
loaded = load_model(folder, "cpu", dtype)
print(json.dumps({"peak_delta": kib("VmHWM") - before, "dtype": str(loaded.model.dtype).replace("torch.", ""),
                  "n_params": sum(p.numel() for p in loaded.model.parameters())}))
"""


def _peak_load(folder, dtype) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), dtype], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_bf16_load_takes_no_fp32_copy_in_host_memory(tmp_path):
    """A bf16 checkpoint (as Llama-3-8B's is on the Hub) loaded with --model-dtype bfloat16: the peak host memory
    of the load (in a fresh process, past its imports) is well under the model's fp32 size; loading the same
    folder as float32 (the old always-fp32 path) costs about the fp32 size, so the probe does see copies."""
    import transformers as tf
    sys.path.insert(0, str(HERE))
    from conftest import _char_tokenizer
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=96, max_position_embeddings=256)
    folder = tmp_path / "lm"
    tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(folder))
    _char_tokenizer().save_pretrained(str(folder))
    bf16 = _peak_load(folder, "bfloat16")
    fp32 = _peak_load(folder, "float32")
    fp32_bytes = 4 * bf16["n_params"]
    print(f"\nfp32 size {fp32_bytes / 2**20:.1f} MiB; peak host memory of the load: "
          f"bfloat16 {bf16['peak_delta'] / 2**20:.1f} MiB, float32 {fp32['peak_delta'] / 2**20:.1f} MiB")
    assert bf16["dtype"] == "bfloat16" and fp32["dtype"] == "float32"
    assert bf16["peak_delta"] < 0.6 * fp32_bytes
    assert fp32["peak_delta"] > 0.9 * fp32_bytes


def _collect(capsys, model, corpus, out, *extra):
    status, _, err = sae_main(capsys, "collect", "--model", model, "--dataset", corpus, "--layers", "0,1",
                              "--context-size", "24", "--tokens", "600", "--batch-windows", "4", "--out", out,
                              "--device", "cpu", *extra)
    assert status == 0, err
    return ActivationStore(out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_collect_and_eval_in_each_dtype(tiny_llama_dir, corpus, tmp_path, capsys, dtype):
    """The store follows the model's dtype unless --dtype says otherwise; both are in the manifest; the rows
    match a float32 collection to the dtype's precision; eval replays the model in that dtype."""
    reference = _collect(capsys, tiny_llama_dir, corpus, tmp_path / "ref", "--model-dtype", "float32")
    store = _collect(capsys, tiny_llama_dir, corpus, tmp_path / "s", "--model-dtype", dtype)
    assert store.manifest["model_dtype"] == dtype and store.manifest["dtype"] == dtype
    assert reference.manifest["model_dtype"] == "float32" and reference.manifest["dtype"] == "float32"
    got = torch.cat(list(store.activations(layer=1))).float()
    want = torch.cat(list(reference.activations(layer=1)))
    assert got.shape == want.shape
    tolerance = 1e-6 if dtype == "float32" else 5e-2
    assert ((got - want).norm() / want.norm()).item() < tolerance
    kept = _collect(capsys, tiny_llama_dir, corpus, tmp_path / "kept", "--model-dtype", dtype, "--dtype", "float32")
    assert kept.manifest["dtype"] == "float32" and kept.manifest["model_dtype"] == dtype
    # resuming under another model dtype is refused
    status, _, err = sae_main(capsys, "collect", "--model", tiny_llama_dir, "--dataset", corpus, "--layers", "0,1",
                              "--context-size", "24", "--tokens", "900", "--batch-windows", "4", "--out", tmp_path / "s",
                              "--resume", "--model-dtype", "float32" if dtype != "float32" else "bfloat16")
    assert status == 2 and "model_dtype" in err and len(err.strip().splitlines()) == 1

    from sae import variants
    from sae.runs import save_run
    torch.manual_seed(0)
    model = variants.create("relu", d_in=store.d_model, d_sae=64)
    run = tmp_path / "run"
    save_run(model, run, {"layer": 1, "site": "resid_post", "model": str(tiny_llama_dir),
                          "store_digest": reference.digest})
    figures = {}
    for model_dtype in ("float32", dtype):
        status, _, err = sae_main(capsys, "eval", "--run", run, "--activations", reference.path, "--layer", "1",
                                  "--device", "cpu", "--model-dtype", model_dtype, "--windows", "8", "--json")
        assert status == 0, err
        figures[model_dtype] = json.loads((run / "eval.json").read_text())
        assert figures[model_dtype]["model_dtype"] == model_dtype
    for key in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated"):
        assert figures[dtype][key] == pytest.approx(figures["float32"][key], rel=2e-2), key


def test_live_training_records_the_model_dtype(tiny_llama_dir, corpus, tmp_path, capsys):
    status, _, err = sae_main(capsys, "train", "--model", tiny_llama_dir, "--dataset", corpus, "--layers", "1",
                              "--context-size", "24", "--variant", "relu", "--out", tmp_path / "run",
                              "--tokens", "2048", "--batch-size", "256", "--buffer-size", "1MB", "--eval-rows", "256",
                              "--device", "cpu", "--model-dtype", "bfloat16",
                              "--save-activations", tmp_path / "saved")
    assert status == 0, err
    config = json.loads((tmp_path / "run" / "layer_1" / "config.json").read_text())
    assert config["model_dtype"] == "bfloat16"
    assert ActivationStore(tmp_path / "saved").manifest["dtype"] == "bfloat16"
