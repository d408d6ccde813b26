"""sae.evaluate / sae.probing: metrics on hand-made data with known answers, downstream figures
against an independent forward, special tokens, and bad input through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from sae.evaluate.metrics import evaluate, format_table
from sae.lm import LoadedModel, capture
from sae.store import MANIFEST, ActivationStore, is_held_out, write_shard
from sae.files import write_json

BOS, EOS, VOCAB, CTX = 1, 2, 61, 16


class HandSAE(nn.Module):
    """encode = relu(x @ W) (or x @ W when signed), decode = codes @ D: any linear map we like."""

    def __init__(self, W, D, signed=False, threshold=0.0, run_config=None):
        super().__init__()
        self.W, self.D = nn.Parameter(W.float()), nn.Parameter(D.float())
        self.d_in, self.d_sae = W.shape
        self.signed_codes = signed
        self.fire_threshold = None if signed else threshold
        self.run_config = dict(run_config or {})

    def encode(self, x):
        pre = x @ self.W
        return pre if self.signed_codes else torch.relu(pre)

    def decode(self, codes):
        return codes @ self.D


def identity_sae(d, **kw):
    return HandSAE(torch.eye(d), torch.eye(d), signed=True, **kw)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                         bos_token_id=BOS, eos_token_id=EOS)).eval()
    return LoadedModel(model=model, tokenizer=None, name="tiny-llama", family="llama", n_layers=2, d_model=32,
                       is_causal=True, bos_id=BOS, eos_id=EOS, pad_id=EOS, special_ids={BOS, EOS})


def tiny_model_dir(path):
    """tiny_llama() saved as a local model folder with a word-level tokenizer, loadable by sae.models.load_model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    loaded = tiny_llama()
    loaded.model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return loaded


def window_store(path, loaded, site="resid_post", layer=0, n_windows=24, labels=False, model_name="tiny-llama"):
    """A store as `sae collect` writes one: BOS-led windows, two documents each (EOS between), every
    position's activation captured with the model. Returns (store, window_tokens, doc_of_position)."""
    gen = torch.Generator().manual_seed(1)
    window_tokens = torch.randint(3, VOCAB, (n_windows, CTX), generator=gen)  # [w, ctx]
    window_tokens[:, 0] = BOS
    window_tokens[:, CTX // 2] = EOS
    doc = torch.arange(n_windows)[:, None] * 2 + (torch.arange(CTX)[None, :] > CTX // 2).long()  # [w, ctx]
    with torch.no_grad(), capture(loaded.model, site, [layer], stop=False) as seen:
        loaded.model(input_ids=window_tokens)
    acts = seen[layer]  # [w, ctx, d]
    columns = {f"activations.{layer}": acts.reshape(-1, acts.shape[-1]).contiguous(),
               "token_ids": window_tokens.reshape(-1).int(), "window_tokens": window_tokens.int(),
               "window_index": torch.arange(n_windows).repeat_interleave(CTX),
               "position": torch.arange(CTX).repeat(n_windows).int(), "doc_id": doc.reshape(-1)}
    if labels:
        columns["label"] = doc.reshape(-1) % 3
    path.mkdir(parents=True)
    write_shard(path / "shard_00000.safetensors", columns)
    write_json(path / MANIFEST, {"model": model_name, "layers": [layer], "site": site, "d_model": acts.shape[-1],
                                 "n_tokens": n_windows * CTX, "context_size": CTX, "dataset": "random",
                                 "dtype": "float32", "shards": ["shard_00000.safetensors"],
                                 "shard_rows": [n_windows * CTX]})
    return ActivationStore(path), window_tokens, doc


# ---- reconstruction and sparsity -----------------------------------------------------------------
def test_fvu_mse_cosine_l2_ratio_known_answers(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=gen) * 2 + 1
    store = ActivationStore.from_tensors(tmp_path / "s", x)
    held = x[store.split_indices("held_out")].double()
    sae_model = HandSAE(torch.eye(8), 0.5 * torch.eye(8), signed=True)  # x_hat = x / 2
    result = evaluate(sae_model, store, with_model=False)
    expected_fvu = float((0.25 * held.pow(2).sum()) / (held - held.mean(0)).pow(2).sum())
    assert result["n_tokens"] == len(held)
    assert result["fvu"] == pytest.approx(expected_fvu, rel=1e-9)
    assert result["explained_variance"] == pytest.approx(1 - expected_fvu, rel=1e-9)
    assert result["mse"] == pytest.approx(float((0.25 * held.pow(2)).mean()), rel=1e-9)
    assert result["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert result["l2_ratio"] == pytest.approx(0.5, abs=1e-6)
    assert result["l0"] is None and result["dead_fraction"] is None  # signed codes
    assert "skipped" in result["downstream_skipped"]


def test_l0_dead_fraction_density_with_threshold(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=gen)
    x[:, 4:] = -x[:, 4:].abs() - 0.1  # latents 4, 5 never fire
    store = ActivationStore.from_tensors(tmp_path / "s", x)
    held = x[store.split_indices("held_out")]
    for tau in (0.0, 0.5):
        result = evaluate(HandSAE(torch.eye(6), torch.eye(6), threshold=tau), store, with_model=False)
        assert result["l0"] == pytest.approx(float((held > tau).sum(1).double().mean()), rel=1e-9)
        assert result["dead_fraction"] == pytest.approx(2 / 6)
        hist = result["density_histogram"]
        assert hist["n_dead"] == 2 and sum(hist["counts"]) == 4
        density = (held > tau).float().mean(0)[:4]
        expected, _ = np.histogram(np.log10(density.numpy()), bins=hist["log10_density_edges"])
        assert hist["counts"] == expected.tolist()


def test_extra_metrics_are_reported(tmp_path):
    store = ActivationStore.from_tensors(tmp_path / "s", torch.randn(3000, 4))
    sae_model = identity_sae(4)
    sae_model.register_buffer("input_scale", torch.tensor(2.0))
    sae_model.extra_metrics = lambda x_scaled: {"perplexity": float(x_scaled.abs().mean())}
    result = evaluate(sae_model, store, with_model=False)
    held = store.rows(None, store.split_indices("held_out"))
    assert result["perplexity"] == pytest.approx(float((held * 2).abs().mean()), rel=1e-5)


# ---- sparse probing ---------------------------------------------------------------------------
def planted_store(path, n_docs=200, tokens=8, d=12, n_labels=4):
    gen = torch.Generator().manual_seed(0)
    doc_id = torch.arange(n_docs).repeat_interleave(tokens)
    label = doc_id % n_labels
    x = torch.randn(n_docs * tokens, d, generator=gen) * 0.3
    x[torch.arange(len(x)), label] += 3.0  # feature `label` equals the label
    return ActivationStore.from_tensors(path, x, doc_id=doc_id, label=label)


def test_planted_feature_gives_top1_probing_accuracy_one(tmp_path):
    store = planted_store(tmp_path / "s")
    result = evaluate(HandSAE(torch.eye(12), torch.eye(12)), store, with_model=False)
    probing = result["sparse_probing"]
    assert probing["1"] == 1.0 and probing["2"] == 1.0 and probing["5"] == 1.0
    assert probing["full"] == 1.0
    assert probing["n_tasks"] == 4
    assert probing["n_test_docs"] + probing["n_train_docs"] == 200


def test_probing_of_label_blind_latents_is_near_chance(tmp_path):
    store = planted_store(tmp_path / "s")
    W = torch.zeros(12, 12)
    W[4:, :8] = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))  # reads only noise dims
    result = evaluate(HandSAE(W, torch.zeros(12, 12)), store, with_model=False)
    assert result["sparse_probing"]["1"] < 0.75
    assert result["sparse_probing"]["full"] == 1.0


# ---- downstream -----------------------------------------------------------------------------------
def own_ce(lm, ids, mask, hook=None):
    """Mean next-token CE over masked positions with an optional forward hook on layer 0's output."""
    handle = lm.model.layers[0].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            logp = lm(input_ids=ids).logits.log_softmax(-1)
    finally:
        if handle:
            handle.remove()
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(nll[mask[:, :-1]].mean()), logp


def test_downstream_identity_zero_and_independent_ce(tmp_path):
    loaded = tiny_llama()
    store, window_tokens, doc = window_store(tmp_path / "s", loaded)
    held_windows = is_held_out(doc).any(dim=1)
    ids = window_tokens[held_windows]
    mask = is_held_out(doc[held_windows]) & (ids != BOS) & (ids != EOS)
    mask[:, -1] = False
    special = (ids == BOS) | (ids == EOS)
    assert held_windows.sum() > 0

    config = {"site": "resid_post", "layer": 0}
    result = evaluate(identity_sae(32, run_config=config), store, loaded_model=loaded)
    clean, clean_logp = own_ce(loaded.model, ids, mask)

    def zero_hook(module, args, out):
        return torch.where(special[..., None], out, torch.zeros_like(out))

    zero, zero_logp = own_ce(loaded.model, ids, mask, zero_hook)
    assert result["downstream_windows"] == int(held_windows.sum())
    assert result["downstream_tokens"] == int(mask.sum())
    assert result["ce_loss_clean"] == pytest.approx(clean, rel=1e-5)
    assert result["ce_loss_spliced"] == pytest.approx(clean, rel=1e-6)
    assert result["ce_loss_zero_ablated"] == pytest.approx(zero, rel=1e-5)
    assert result["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert result["kl_div_spliced"] == pytest.approx(0.0, abs=1e-6)
    kl_zero = (clean_logp.exp() * (clean_logp - zero_logp)).sum(-1)[mask]
    assert result["kl_div_zero_ablated"] == pytest.approx(float(kl_zero.mean()), rel=1e-4)
    assert result["kl_div_score"] == pytest.approx(1.0, abs=1e-6)

    zero_sae = HandSAE(torch.eye(32), torch.zeros(32, 32), run_config=config)
    result = evaluate(zero_sae, store, loaded_model=loaded, probe=False)
    assert result["ce_loss_spliced"] == pytest.approx(result["ce_loss_zero_ablated"], rel=1e-6)
    assert result["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert result["kl_div_score"] == pytest.approx(0.0, abs=1e-6)


def test_special_tokens_keep_original_activation_and_leave_every_figure(tmp_path):
    """An SAE that wrecks only special-token rows scores as a perfect identity everywhere."""
    loaded = tiny_llama()
    store, _, _ = window_store(tmp_path / "s", loaded)

    class WrecksSpecials(HandSAE):
        def encode(self, x):
            return x.clone()

        def decode(self, codes):  # rows equal to a BOS/EOS activation map to garbage
            special_rows = store.rows(None, torch.nonzero(torch.isin(store.column("token_ids"),
                                                                     torch.tensor([BOS, EOS]))).squeeze(1))
            hit = (codes[:, None, :] - special_rows[None]).abs().amax(-1).min(-1).values < 1e-6
            return torch.where(hit[:, None], codes * 100 + 50, codes)

    sae_model = WrecksSpecials(torch.eye(32), torch.eye(32), signed=True,
                               run_config={"site": "resid_post", "layer": 0})
    result = evaluate(sae_model, store, loaded_model=loaded)
    assert result["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert result["ce_loss_spliced"] == pytest.approx(result["ce_loss_clean"], rel=1e-6)
    n_special_held = int((torch.isin(store.column("token_ids"), torch.tensor([BOS, EOS]))
                          & store.held_out_mask()).sum())
    assert n_special_held > 0
    assert result["n_tokens"] == int(store.held_out_mask().sum()) - n_special_held


def test_encoder_only_model_has_no_downstream_and_says_why(tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    loaded = tiny_llama()
    store, _, _ = window_store(tmp_path / "s", loaded)
    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=VOCAB)).eval()
    bert_loaded = LoadedModel(model=bert, tokenizer=None, name="tiny-bert", family="bert", n_layers=2, d_model=32,
                              is_causal=False, bos_id=BOS, eos_id=EOS, pad_id=0, special_ids={0, BOS, EOS})
    result = evaluate(identity_sae(32, run_config={"site": "resid_post", "layer": 0}), store,
                      loaded_model=bert_loaded)
    assert "ce_loss_clean" not in result and "encoder-only" in result["downstream_skipped"]
    assert "fvu" in result and "encoder-only" in format_table(result)


# ---- bad input -----------------------------------------------------------------------------------
def test_mismatched_run_and_store_name_what_differs(tmp_path):
    from sae.errors import UserError
    store = ActivationStore.from_tensors(tmp_path / "s", torch.randn(3000, 8), model="m1", site="resid_post")
    with pytest.raises(UserError, match="d_model: run 4, store 8"):
        evaluate(identity_sae(4, run_config={"d_in": 4}), store, with_model=False)
    with pytest.raises(UserError, match="model: run 'm2', store 'm1'.*site: run 'mlp_out'"):
        evaluate(identity_sae(8, run_config={"model": "m2", "site": "mlp_out"}), store, with_model=False)
    with pytest.raises(UserError, match="layer 3"):
        evaluate(identity_sae(8, run_config={"layer": 3}), store, with_model=False)
    no_held = ActivationStore.from_tensors(tmp_path / "s2", torch.randn(300, 8), doc_id=torch.full((300,), 1))
    with pytest.raises(UserError, match="no held-out documents"):
        evaluate(identity_sae(8), no_held, with_model=False)


def sae_main(capsys, *args):
    """`sae ARGS` in this process: (exit status, stdout, stderr)."""
    from sae.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def sae_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sae", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_bad_inputs(tmp_path, capsys):
    store = ActivationStore.from_tensors(tmp_path / "s", torch.randn(3000, 8), model="m1", site="resid_post")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"variant": "relu", "d_in": 8, "d_sae": 16, "knobs": {}}))
    cases = [(["eval", "--run", str(run), "--activations", str(store.path)], "no weights"),
             (["eval", "--run", str(tmp_path / "nothing"), "--activations", str(store.path)], "not a run folder"),
             (["eval", "--run", str(run), "--activations", str(tmp_path / "nothing")], "does not exist")]
    for args, message in cases:
        status, _, err = sae_main(capsys, *args)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    proc = sae_cli(*cases[0][0])  # the real console path: one line, no traceback
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {run} has no weights (sae.safetensors is missing): "
                                                f"was its training finished?"]


def test_cli_eval_with_model_writes_eval_json_and_table(tmp_path, capsys):
    from sae import variants
    from sae.runs import save_run
    loaded = tiny_model_dir(tmp_path / "lm")
    store, _, _ = window_store(tmp_path / "s", loaded, model_name=str(tmp_path / "lm"), labels=True)
    torch.manual_seed(0)
    model = variants.create("relu", d_in=32, d_sae=64)
    run = tmp_path / "run"
    save_run(model, run, {"layer": 0, "site": "resid_post", "model": str(tmp_path / "lm"), "store_digest": store.digest})
    status, out, err = sae_main(capsys, "eval", "--run", str(run), "--activations", str(store.path), "--device", "cpu")
    assert status == 0, err
    written = json.loads((run / "eval.json").read_text())
    expected = evaluate(model, store, loaded_model=loaded, layer=0, write=False, progress=False)
    for key in ("fvu", "l0", "dead_fraction", "ce_loss_clean", "ce_loss_spliced", "ce_loss_recovered", "kl_div_score"):
        assert written[key] == pytest.approx(expected[key], rel=1e-5), key
    assert "ce_loss_recovered" in out and "fvu" in out
    status, out, _ = sae_main(capsys, "eval", "--run", str(run), "--activations", str(store.path), "--no-model", "--json")
    assert status == 0 and json.loads(out)["downstream_skipped"] == "skipped (--no-model)"
