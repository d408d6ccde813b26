"""Live training (sae.live): SAEs trained straight from a tiny model, checked against independent
computations — a store of the same windows, the model's own hidden states, layer call counts, and
an uninterrupted run for resume."""
from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from sae.errors import UserError

N_LAYERS = 4


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    """A random-weight 4-layer Llama (hidden 32) with the real SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from sae.lm import wrap
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(smollm2_tokenizer), max_position_embeddings=128)
    return wrap(LlamaForCausalLM(config).eval(), smollm2_tokenizer, name="tiny-llama")


def documents():
    """Every 15th BBC article (~150 documents, a few held out by the doc_id rule)."""
    from sae.data import load_documents
    return itertools.islice(load_documents("bbc")[0], 0, None, 15)


def options(steps, batch=128, **kw):
    from sae.train.options import TrainOptions
    return TrainOptions(tokens=steps * batch, batch_size=batch, device="cpu", seed=3, log_every=10,
                        checkpoint_every=kw.pop("checkpoint_every", 0), eval_rows=0, **kw)


def live(tiny, out, steps, layers="1,2", buffer=2 * 2 * 32 * 4 * 600, **kw):
    from sae.train.live import LiveOptions, train_live
    opts = options(steps, checkpoint_every=kw.pop("checkpoint_every", 0))
    source = LiveOptions(model="tiny", layers=layers, site="resid_post", context_size=64,
                         model_batch=kw.pop("model_batch", 4), buffer_size=buffer,
                         save_activations=kw.pop("save_activations", None))
    return train_live(tiny, documents, source, variant=kw.pop("variant", "relu"), out=out, options=opts, d_sae=64,
                      progress=False, **kw)


def hidden_rows(tiny, window_tokens, layer):
    """resid_post of `layer` from the model's own output_hidden_states (no hooks of ours)."""
    with torch.no_grad():  # the base model: no LM head over the 49k-token vocabulary
        states = tiny.model.model(input_ids=window_tokens.long(), output_hidden_states=True).hidden_states
    return states[layer + 1]  # [w, ctx, d]; hidden_states[0] is the embedding


def fvu(model, x):
    with torch.no_grad():
        x_hat = model(x)
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_two_layers_match_training_on_a_store(tiny, tmp_path):
    import sae
    from sae.store import ActivationStore
    from sae.train.trainer import Trainer
    live(tiny, tmp_path / "run", steps=150, save_activations=tmp_path / "store")
    store = ActivationStore(tmp_path / "store")
    assert store.layers == [1, 2] and store.manifest["complete"]
    # the saved rows are the model's own hidden states at those windows
    shard_windows = store.read_shard(0, "window_tokens")[:40]
    index, position = store.read_shard(0, "window_index"), store.read_shard(0, "position").long()
    rows = index < 40
    for layer in (1, 2):
        expected = hidden_rows(tiny, shard_windows, layer)[index[rows], position[rows]]
        torch.testing.assert_close(store.read_shard(0, f"activations.{layer}")[rows], expected, atol=1e-4, rtol=1e-4)
    held = store.split_indices("held_out")
    assert len(held) > 100
    for layer in (1, 2):
        live_model = sae.load(tmp_path / "run" / f"layer_{layer}")
        assert live_model.run_config["layer"] == layer
        # the same SAE trained on the store, same options, batches from the store's shuffle
        from sae import variants
        torch.manual_seed(0)
        trainer = Trainer(variants.create("relu", 32, 64), options(150), None)
        batches = store.train_batches(layer, 128, seed=3)
        trainer.init_from_sample(next(store.activations(layer, 4096, split="train")))
        for _ in range(150):
            trainer.step(next(batches))
        x = store.rows(layer, held)
        live_fvu, store_fvu = fvu(live_model, x), fvu(trainer.model.eval(), x)
        assert live_fvu < 0.9 and store_fvu < 0.9, (live_fvu, store_fvu)
        assert abs(live_fvu - store_fvu) < 0.03, (layer, live_fvu, store_fvu)


def test_deepest_layer_bounds_the_forward(tiny, tmp_path):
    calls = {i: 0 for i in range(N_LAYERS)}
    head_calls = []
    handles = [block.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(tiny.model.model.layers)]
    handles.append(tiny.model.lm_head.register_forward_hook(lambda *a: head_calls.append(1)))
    try:
        live(tiny, tmp_path / "run", steps=5, layers="0,1")
    finally:
        for handle in handles:
            handle.remove()
    assert calls[0] > 0 and calls[1] == calls[0]
    assert calls[2] == 0 and calls[3] == 0 and not head_calls


def test_no_held_out_document_reaches_training(tiny, tmp_path, monkeypatch):
    from sae.data import pack_windows
    from sae.train.trainer import Trainer
    seen = []
    original = Trainer.step

    def recording(self, x_raw):
        if self.config_extra["layer"] == 1:
            seen.append(x_raw.clone())
        return original(self, x_raw)

    monkeypatch.setattr(Trainer, "step", recording)
    live(tiny, tmp_path / "run", steps=40)
    trained = torch.cat(seen)[::7]                                    # [m, d] sample of trained rows
    windows = list(pack_windows(documents(), tiny.tokenizer, 64, tiny.bos_id, tiny.eos_id, tiny.pad_id))
    held = [w for w in windows if w.held_out]
    train = [w for w in windows if not w.held_out][:150]
    assert held, "the test needs held-out documents"

    def rows(ws, skip=0):
        ids = torch.stack([w.input_ids for w in ws])
        return hidden_rows(tiny, ids, 1)[:, skip:].reshape(-1, 32)

    def nearest(a, b):
        return torch.cat([torch.cdist(chunk, b).min(dim=1).values for chunk in a.split(256)])

    # held-out rows after 8 tokens of context: equal only if the 8-token prefix were equal too
    to_held, to_train = nearest(trained, rows(held, skip=8)), nearest(trained, rows(train))
    # a leaked row matches to float rounding (≤ 1e-4 here); the nearest distinct context is ~1e-2 away
    assert float(to_train.max()) < 1e-3             # every trained row is a training-window activation
    assert float(to_held.min()) > 3e-3              # and none is a held-out one


@pytest.mark.parametrize("threaded", [False, True], ids=["cpu-turns", "producer-thread"])
def test_resume_equals_uninterrupted(tiny, tmp_path, threaded, monkeypatch):
    """On the CPU the model and the SAEs take turns in one thread; the producer thread (what a GPU uses)
    is run here on the CPU too, through the same resume and --save-activations paths."""
    from safetensors.torch import load_file
    from sae.train.producer import Producer
    monkeypatch.setattr(Producer, "THREADED", threaded)
    from sae.train import checkpoint
    whole = tmp_path / "whole"
    live(tiny, whole, steps=30, checkpoint_every=10)
    broken = tmp_path / "broken"
    live(tiny, broken, steps=30, checkpoint_every=10, max_steps=17, save_activations=tmp_path / "store")
    for layer in (1, 2):  # as after kill -9: only the step-10 checkpoint survives
        for step, path in checkpoint.list_checkpoints(broken / f"layer_{layer}"):
            if step > 10:
                shutil.rmtree(path)
    with pytest.raises(UserError, match="not empty"):
        live(tiny, broken, steps=30, checkpoint_every=10)
    live(tiny, broken, steps=30, checkpoint_every=10, resume=True, save_activations=tmp_path / "store")
    from sae.store import ActivationStore
    store = ActivationStore(tmp_path / "store")   # written across the interruption: no window twice
    window_ids = torch.cat([store.read_shard(i, "window_ids") for i in range(len(store.shards))])
    assert store.manifest["complete"] and len(window_ids) == len(set(window_ids.tolist())) > 20
    for layer in (1, 2):
        a = load_file(str(whole / f"layer_{layer}" / "sae.safetensors"))
        b = load_file(str(broken / f"layer_{layer}" / "sae.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (layer, name)


def test_bad_input(tiny, tmp_path):
    with pytest.raises(UserError, match="more than once"):
        live(tiny, tmp_path / "a", steps=2, layers="1,1")
    with pytest.raises(UserError, match="fewer than one batch"):
        live(tiny, tmp_path / "b", steps=2, buffer="4KB")
    with pytest.raises(UserError):
        live(tiny, tmp_path / "c", steps=2, layers="1,9")


def test_command_line(tiny, tmp_path, capsys):
    """`sae train --model DIR --dataset FILE --layers 1,2 ...` end to end, and its one-line refusals."""
    import sae
    from sae.cli import main
    model_dir = tmp_path / "model"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    text = tmp_path / "docs.txt"
    from sae.data import load_documents
    text.write_text("\n\n".join(d.text for d in itertools.islice(load_documents("bbc")[0], 0, 400, 20)))
    base = ["train", "--model", str(model_dir), "--dataset", str(text), "--site", "resid_post",
            "--variant", "topk", "--k", "4", "--d-sae", "64", "--batch-size", "64", "--tokens", "1280",
            "--context-size", "32", "--device", "cpu", "--buffer-size", "1MB"]
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--layers", "1,2", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 0
    import json
    for layer in (1, 2):
        model = sae.load(tmp_path / "run" / f"layer_{layer}")
        assert model.d_sae == 64 and model.run_config["layer"] == layer and model.run_config["variant"] == "topk"
        held = json.loads((tmp_path / "run" / f"layer_{layer}" / "train_summary.json").read_text())["held_out"]
        assert held["rows"] > 0 and 0 < held["fvu"] < 1.5 and 0 < held["l0"] <= 4
    capsys.readouterr()
    for extra, message in ((["--layers", "2,2"], "more than once"), (["--layers", "1", "--buffer-size", "8KB"],
                                                                       "fewer than one batch")):
        with pytest.raises(SystemExit) as exit_info:
            main(base + extra + ["--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and last.startswith("error: ") and message in last
        assert "Traceback" not in err


def test_a_dataset_of_held_out_documents_only_is_refused(tiny, tmp_path):
    from sae.data import Document
    from sae.train.live import LiveOptions, train_live
    from sae.store import is_held_out
    held_ids = [i for i in range(200) if bool(is_held_out(torch.tensor([i]))[0])][:3]
    docs = lambda: iter([Document(i, "A held-out document about markets and rates. " * 5, None) for i in held_ids])
    with pytest.raises(UserError, match="no training documents"):
        train_live(tiny, docs, LiveOptions(model="tiny", layers="1", context_size=32, model_batch=2, buffer_size="1MB"),
                   variant="relu", out=tmp_path / "run", options=options(4), d_sae=64, progress=False)


def test_the_producer_stops_after_the_last_generation_used(tiny, tmp_path, monkeypatch):
    """No model time on generations the SAEs never see (on a CPU it would come out of the SAEs' time)."""
    from sae.train.live import LiveState
    from sae.train.producer import Producer
    built, sizes = [], []
    original = Producer.build

    def counting(self, index, batches, max_rows=None):
        built.append(index)
        generation = original(self, index, batches, max_rows)
        sizes.append(generation.n_batches)
        return generation

    monkeypatch.setattr(Producer, "build", counting)
    live(tiny, tmp_path / "run", steps=3, layers="1", buffer=32 * 4 * 300)   # a few batches a generation
    used = LiveState.read(tmp_path / "run").generations
    assert len(used) >= 2                                # the run spans several generations
    assert built == [g["index"] for g in used]           # and the producer made exactly those,
    assert sum(sizes[:-1]) < 3 <= sum(sizes), sizes      # the last one no bigger than the steps left need


def test_the_model_runs_only_on_windows_whose_rows_are_trained(tiny, tmp_path, monkeypatch):
    """Each generation forwards just enough windows for its whole SAE batches: the rows left over at a
    generation's end are less than one window's, never most of a model batch."""
    from sae.train.producer import Producer
    kept, trained = [], []
    original_forward, original_build = Producer.forward, Producer.build

    def counting_forward(self, windows):
        acts = original_forward(self, windows)
        from sae.data import PAD_DOC
        special = torch.tensor(sorted(self.loaded.special_ids))
        kept.append(sum(int(((w.doc_ids != PAD_DOC) & ~torch.isin(w.input_ids, special)).sum())
                        for w in windows if not w.held_out))
        return acts

    def counting_build(self, index, batches, max_rows=None):
        generation = original_build(self, index, batches, max_rows)
        trained.append((sum(kept), generation.n_batches * self.spec.batch_size))
        kept.clear()
        return generation

    monkeypatch.setattr(Producer, "forward", counting_forward)
    monkeypatch.setattr(Producer, "build", counting_build)
    live(tiny, tmp_path / "run", steps=12, layers="1", buffer=32 * 4 * 700, model_batch=16)
    assert len(trained) >= 2
    for rows_forwarded, rows_used in trained:
        assert rows_used <= rows_forwarded < rows_used + 64, trained   # under one 64-token window left over
