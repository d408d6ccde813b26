"""Transcoders: collect with --target-site, training on input -> target (plain and skip), eval's CE with the
MLP output replaced, export round trips, bad input. Tiny models from configs; no network."""
import json

import pytest
import torch

from sae.collect import CollectOptions, collect
from sae.errors import UserError
from sae.store import ActivationStore
from sae.variants.transcoder import make_transcoder

D = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import write_labelled_corpus
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home", "quickly"]
    return write_labelled_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", words, 64, (4, 16), seed=3)


@pytest.fixture(scope="module")
def llama(tiny_lm):
    return tiny_lm("llama")


@pytest.fixture(scope="module")
def pair_store(llama, corpus, tmp_path_factory):
    """A tiny Llama's mlp_in -> mlp_out rows of layers 0 and 2 in one store."""
    out = tmp_path_factory.mktemp("pairs") / "store"
    collect(CollectOptions(model=llama.name, dataset=str(corpus), out=out, layers=[0, 2], site="mlp_in",
                           target_site="mlp_out", context_size=24, batch_size=3, tokens=400, shard_tokens=150,
                           progress=False), loaded=llama)
    return ActivationStore(out)


def _hooked(loaded, layer, input_ids):
    """(mlp input, mlp output) [B, T, d] of one layer, by a hook of this test's own on the MLP module."""
    seen = {}
    mlp = loaded.model.get_submodule(f"model.layers.{layer}.mlp")
    handle = mlp.register_forward_hook(lambda module, args, output: seen.update(x=args[0], y=output))
    with torch.no_grad():
        loaded.model(input_ids=input_ids)
    handle.remove()
    return seen["x"], seen["y"]


def test_collect_stores_input_and_target_from_one_pass(pair_store, llama):
    store = pair_store
    assert store.target_site == "mlp_out" and store.manifest["site"] == "mlp_in" and len(store.shards) > 1
    for i in range(len(store.shards)):
        windows = store.read_shard(i, "window_tokens").long()
        w, p = store.read_shard(i, "window_index"), store.read_shard(i, "position").long()
        for layer in (0, 2):
            x, y = _hooked(llama, layer, windows)
            torch.testing.assert_close(store.read_shard(i, f"activations.{layer}"), x[w, p], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(store.read_shard(i, f"targets.{layer}"), y[w, p], atol=1e-5, rtol=1e-5)
    # the training reader yields (input, target) of the same rows
    x, y = next(store.train_batches(2, batch_size=64, seed=5, targets=True))
    plain = next(store.train_batches(2, batch_size=64, seed=5))
    assert torch.equal(x, plain) and x.shape == y.shape == (64, D)
    every_x = torch.cat([store.read_shard(i, "activations.2") for i in range(len(store.shards))])
    every_y = torch.cat([store.read_shard(i, "targets.2") for i in range(len(store.shards))])
    rows = [int(((every_x - row).abs().sum(dim=1) == 0).nonzero()[0]) for row in x[:8]]
    torch.testing.assert_close(y[:8], every_y[rows])


def test_collect_bad_target_sites(llama, corpus, tmp_path):
    def go(**kw):
        collect(CollectOptions(model=llama.name, dataset=str(corpus), out=tmp_path / "bad", layers=[0],
                               context_size=24, tokens=50, progress=False, **kw), loaded=llama)
    with pytest.raises(UserError, match="must differ"):
        go(site="mlp_in", target_site="mlp_in")
    with pytest.raises(UserError, match="comes before"):
        go(site="mlp_out", target_site="mlp_in", force=True)
    with pytest.raises(UserError, match="no target site"):
        next(ActivationStore(_plain_store(llama, corpus, tmp_path)).train_batches(0, 16, targets=True))


def _plain_store(llama, corpus, tmp_path):
    out = tmp_path / "plain"
    collect(CollectOptions(model=llama.name, dataset=str(corpus), out=out, layers=[0], site="mlp_in",
                           context_size=24, tokens=100, progress=False), loaded=llama)
    return out


# ---- training --------------------------------------------------------------------------------------
def _train(x, y, steps, skip=False, k=1, d_sae=32, lr=1e-2):
    """A topk transcoder trained in-process on rows x -> y (the trainer's own step with pairs)."""
    from sae.train.trainer import Trainer, TrainOptions
    torch.manual_seed(1)
    model = make_transcoder("topk", x.shape[1], d_sae, k=k, skip=skip)
    trainer = Trainer(model, TrainOptions(tokens=256 * steps, batch_size=256, seed=0, device="cpu", log_every=50,
                                          checkpoint_every=0, lr=lr))
    trainer.init_from_sample(x[:2048], y[:2048])
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(x) - 1000, (256,), generator=gen)
        trainer.step(x[rows], y[rows])
    return model.eval()


def _fvu(model, x, y):
    with torch.no_grad():
        prediction = model.predict(x)
    return float((prediction - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_a_transcoder_learns_a_planted_map_of_sparse_features():
    """x = one of 24 planted directions F_i times a magnitude; y = x Mᵀ. The transcoder must predict y from x
    and its decoder rows must point along the planted images F_i Mᵀ (neither is available to it directly)."""
    torch.manual_seed(0)
    d, n_feat, n = 16, 24, 6000
    F = torch.nn.functional.normalize(torch.randn(n_feat, d), dim=1)
    M = torch.randn(d, d) / d ** 0.5
    feature = torch.randint(0, n_feat, (n,))
    x = F[feature] * (torch.rand(n) + 0.5)[:, None]
    y = x @ M.T
    model = _train(x, y, 150)
    assert _fvu(model, x[-1000:], y[-1000:]) < 0.3
    images = torch.nn.functional.normalize(F @ M.T, dim=1)                       # [24, d] planted output directions
    with torch.no_grad():
        codes = model.encode(x[-1000:])
    best = torch.zeros(n_feat)
    for i in range(n_feat):     # the latent that fires most on feature i's rows, against that feature's image
        rows = feature[-1000:] == i
        latent = int(codes[rows].sum(dim=0).argmax())
        best[i] = torch.nn.functional.cosine_similarity(model.decoder_directions_raw()[latent], images[i], dim=0)
    assert float((best > 0.9).float().mean()) >= 0.35, best    # a random direction in 16-d: cos > 0.9 ~never


def test_the_skip_connection_learns_a_dense_linear_map():
    torch.manual_seed(0)
    d = 16
    M = torch.randn(d, d) / d ** 0.5
    x = torch.randn(6000, d) * 2 + 1
    y = x @ M.T + 0.3
    skip, plain = _train(x, y, 100, skip=True, k=2), _train(x, y, 100, skip=False, k=2)
    fvu_skip, fvu_plain = _fvu(skip, x[-1000:], y[-1000:]), _fvu(plain, x[-1000:], y[-1000:])
    assert fvu_skip < 0.05 and fvu_plain > 5 * fvu_skip, (fvu_skip, fvu_plain)
    raw = skip.W_skip.detach() * skip.input_scale / skip.target_scale          # the skip map in raw units
    assert float((raw - M).norm() / M.norm()) < 0.5
    torch.testing.assert_close(skip.skip_term(x[:5]), x[:5] @ raw.T, atol=1e-4, rtol=1e-4)
    assert not plain.skip and torch.equal(plain.skip_term(x[:5]), torch.zeros(5, d))


def test_contract_and_loss_is_the_fvu_of_the_prediction():
    """decode is affine in the codes (raw units), predict = decode(encode) + skip, and the skip model's
    training loss equals FVU(prediction, target) by autograd-free recomputation."""
    from sae.variants.base import StepContext
    torch.manual_seed(0)
    model = make_transcoder("topk", 8, 32, k=4, skip=True, auxk_coefficient=0.0)
    x, y = torch.randn(64, 8) * 3, torch.randn(64, 8) * 0.5 + 1
    model.init_from_pairs(x, y)
    with torch.no_grad():
        model.W_skip.normal_(0, 0.1)
    codes = model.encode(x)
    torch.testing.assert_close(model.decode(codes), codes @ model.decoder_directions_raw() + model.decoder_bias_raw())
    torch.testing.assert_close(model.predict(x), model.decode(codes) + model.skip_term(x))
    xs, ys = x * model.input_scale, y * model.target_scale
    out = model.training_loss(xs, ys, StepContext(dead_mask=torch.zeros(32, dtype=torch.bool)))
    prediction = model.predict(x) * model.target_scale
    expected = (prediction - ys).pow(2).sum() / (ys - ys.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.loss.detach(), expected.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.x_hat, prediction.detach(), rtol=1e-4, atol=1e-4)


# ---- eval: the MLP output replaced --------------------------------------------------------------------
def test_splice_replaces_the_mlp_output_and_the_error_term_restores_it(llama):
    from sae.evaluate.transcode import splice_transcoder
    torch.manual_seed(0)
    tc = make_transcoder("topk", D, 64, k=4, skip=True)
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.05)
    ids = torch.randint(4, 90, (2, 12))
    with torch.no_grad():
        clean = llama.model(input_ids=ids).logits
        mlp = llama.model.get_submodule("model.layers.2.mlp")      # a hook of the test's own: MLP -> predict(input)
        handle = mlp.register_forward_hook(lambda module, args, output: tc.predict(
            args[0].reshape(-1, D)).reshape(output.shape))
        expected = llama.model(input_ids=ids).logits
        handle.remove()
        with splice_transcoder(llama.model, tc, layer=2):
            spliced = llama.model(input_ids=ids).logits
        with splice_transcoder(llama.model, tc, layer=2, error_term=True):
            restored = llama.model(input_ids=ids).logits
    torch.testing.assert_close(spliced, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(spliced, clean, atol=1e-3)
    assert torch.equal(restored, clean)                              # bit for bit: y + (ŷ − ŷ) is y


def test_train_and_eval_a_transcoder_run_on_the_pair_store(pair_store, llama, tmp_path):
    """`sae train --transcoder` on a collected store, then evaluate(): FVU against the target rows (recomputed
    here from the store), and CE with the MLP output spliced / zero-ablated (the error term gives the clean CE)."""
    import sae
    from sae.evaluate.metrics import evaluate
    from sae.evaluate.scores import is_special
    from sae.train.trainer import TrainOptions, train_on_store
    options = TrainOptions(tokens=128 * 20, batch_size=128, seed=0, device="cpu", log_every=10, checkpoint_every=0,
                           init_rows=256, eval_rows=256)
    summary = train_on_store(pair_store, "topk", tmp_path / "run", options, knobs={"k": 4}, d_sae=64, layer=2,
                             transcoder=True, skip=True, progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["transcoder"] and config["skip"] and config["target_site"] == "mlp_out" and config["site"] == "mlp_in"
    model = sae.load(tmp_path / "run")
    assert model.is_transcoder and model.skip and summary["held_out"]["rows"] > 0
    result = evaluate(tmp_path / "run", pair_store, loaded_model=llama, max_windows=8, probe=False, progress=False)
    held = pair_store.split_indices("held_out")
    keep = ~is_special(pair_store.column("token_ids")[held], llama.special_ids)
    x, y = pair_store.rows(2, held)[keep], pair_store.rows(2, held, "targets")[keep]
    with torch.no_grad():
        fvu = float((model.predict(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert result["transcoder"] and result["site"] == "mlp_out" and result["n_tokens"] == len(x)
    assert abs(result["fvu"] - fvu) < 1e-4 * max(1.0, fvu)
    assert result["ce_loss_spliced"] != result["ce_loss_clean"] and result["ce_loss_recovered"] is not None
    assert result["ce_loss_error_term"] == result["ce_loss_clean"]          # exactly: the same float


# ---- export and import --------------------------------------------------------------------------------
def _transcoder_run(tmp_path, variant, skip, name="run"):
    """A transcoder with random weights and separate, non-unit input and target scales, saved as a run."""
    from sae.runs import save_run
    torch.manual_seed(4)
    knobs = {"k": 6} if variant == "topk" else {}
    model = make_transcoder(variant, 12, 40, skip=skip, **knobs)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
        if variant == "jumprelu":
            model.log_threshold.fill_(-2.0)
        model.input_scale.fill_(2.5)
        model.target_scale.fill_(0.4)
    run = tmp_path / name
    save_run(model, run, {"layer": 3, "site": "mlp_in", "target_site": "mlp_out", "model": "smollm2",
                          "training": {"complete": True}})
    return model.eval(), run


CASES = [("l1", False, "saelens"), ("l1", True, "saelens"), ("jumprelu", False, "saelens"),
         ("jumprelu", True, "saelens"), ("topk", False, "sparsify"), ("topk", True, "sparsify")]


@pytest.mark.parametrize("variant,skip,fmt", CASES)
def test_export_and_read_back(tmp_path, variant, skip, fmt):
    import sae
    from sae.export import export
    model, run = _transcoder_run(tmp_path, variant, skip)
    out = export(run, tmp_path / "out", fmt)
    cfg = json.loads((out / "cfg.json").read_text())
    if fmt == "saelens":
        assert cfg["architecture"] == ("jumprelu_" if variant == "jumprelu" else "") + \
            ("skip_transcoder" if skip else "transcoder")
        assert cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == 12
        assert cfg["hook_name"] == "blocks.3.ln2.hook_normalized" and cfg["hook_name_out"] == "blocks.3.hook_mlp_out"
    else:
        assert cfg["transcode"] is True and cfg["skip_connection"] is skip
    back = sae.load(out)
    assert back.is_transcoder and back.skip is skip and back.run_config["target_site"] == "mlp_out"
    x = torch.randn(50, 12) * 3
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), model.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.predict(x), model.predict(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.skip_term(x), model.skip_term(x), rtol=1e-5, atol=1e-5)


def test_a_topk_transcoder_has_no_saelens_layout(tmp_path):
    from sae.export import export
    _, run = _transcoder_run(tmp_path, "topk", False)
    with pytest.raises(UserError, match="SAELens has no topk transcoder"):
        export(run, tmp_path / "out", "saelens")


@pytest.mark.parametrize("variant,skip", [("l1", False), ("l1", True), ("jumprelu", True)])
def test_saelens_itself_loads_the_transcoder_export(tmp_path, variant, skip):
    sae_lens = pytest.importorskip("sae_lens", reason="sae_lens is not installed (it is not a dependency)")
    from sae.export import export
    model, run = _transcoder_run(tmp_path, variant, skip)
    out = export(run, tmp_path / "out", "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert type(theirs).__name__ == {"l1": "", "jumprelu": "JumpReLU"}[variant] + ("SkipTranscoder" if skip else
                                                                                     "Transcoder")
    x = torch.randn(50, 12) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), model.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), model.predict(x), rtol=1e-5, atol=1e-5)


def test_steering_a_transcoder_feature_edits_the_mlp_output(llama):
    """Clamping a feature to 0 removes f_j(x)·d_j from the MLP output (x its input): against a hook of our own."""
    from sae.evaluate.transcode import steer_transcoder
    torch.manual_seed(1)
    tc = make_transcoder("topk", D, 64, k=4)
    ids = torch.randint(4, 90, (1, 10))
    j = int(torch.randint(0, 64, (1,)))
    mlp = llama.model.get_submodule("model.layers.1.mlp")
    with torch.no_grad():
        handle = mlp.register_forward_hook(lambda module, args, output: output - tc.encode(
            args[0].reshape(-1, D))[:, j:j + 1].reshape(*output.shape[:-1], 1) * tc.decoder_directions_raw()[j])
        expected = llama.model(input_ids=ids).logits
        handle.remove()
        with steer_transcoder(llama.model, tc, 1, {j: 0.0}):
            ablated = llama.model(input_ids=ids).logits
    torch.testing.assert_close(ablated, expected, atol=1e-5, rtol=1e-5)


# ---- live training and bad input ------------------------------------------------------------------
def test_live_training_trains_one_transcoder_per_layer(llama, corpus, tmp_path):
    import sae
    from sae.data import load_documents
    from sae.train.live import LiveOptions, train_live
    from sae.train.trainer import TrainOptions
    source = LiveOptions(model=llama.name, layers="0,2", site="mlp_in", target_site="mlp_out", dataset=str(corpus),
                         context_size=24, model_batch=4, buffer_size=64 * 2 * 2 * D * 4 * 4)
    options = TrainOptions(tokens=64 * 6, batch_size=64, seed=0, device="cpu", checkpoint_every=0, log_every=3,
                           init_rows=64, eval_rows=64)
    results = train_live(llama, lambda: load_documents(str(corpus))[0], source, variant="topk", out=tmp_path / "live",
                         options=options, knobs={"k": 4}, d_sae=64, transcoder=True, skip=True, progress=False)
    for layer in (0, 2):
        model = sae.load(tmp_path / "live" / f"layer_{layer}")
        assert model.is_transcoder and model.skip and model.run_config["target_site"] == "mlp_out"
        assert results[layer]["held_out"]["rows"] > 0 and results[layer]["held_out"]["fvu"] < 2
        ids = torch.randint(4, 90, (1, 8))
        x, y = _hooked(llama, layer, ids)                    # the target scale was measured on MLP outputs
        assert abs(float(model.target_scale) * float(y.norm(dim=-1).mean()) / D ** 0.5 - 1) < 0.5


def _cli(argv, capsys):
    from sae.cli import main
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return done.value.code, err


def test_bad_input_is_one_line(pair_store, llama, corpus, tmp_path, capsys):
    from sae.store import from_tensors
    plain = from_tensors(tmp_path / "plain", torch.randn(600, D), layer=0, model="x", site="mlp_in").path
    cases = [
        (["train", "--activations", plain, "--variant", "topk", "--k", 4, "--d-sae", 64, "--transcoder",
          "--out", tmp_path / "r1"], "--transcoder needs a store with a target site"),
        (["train", "--activations", pair_store.path, "--variant", "topk", "--k", 4, "--d-sae", 64, "--skip",
          "--layer", 0, "--out", tmp_path / "r2"], "--skip adds the skip connection"),
        (["collect", "--model", "smollm2", "--layers", 0, "--site", "mlp_in", "--target-site", "mlp_in",
          "--out", tmp_path / "s"], "--target-site must differ from --site"),
        (["train", "--activations", pair_store.path, "--variant", "topk", "--target-site", "mlp_out",
          "--out", tmp_path / "r3"], "--target-site is for `sae collect`"),
    ]
    for argv, message in cases:
        code, err = _cli(argv, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)


def test_an_mlp_transcoder_is_required_where_an_mlp_is_replaced():
    from sae.variants import create
    from sae.variants.transcoder import check_mlp_transcoder
    tc = make_transcoder("topk", 8, 32, k=4)
    tc.run_config = {"site": "mlp_in", "target_site": "mlp_out"}
    check_mlp_transcoder(tc)
    tc.run_config = {"site": "resid_pre", "target_site": "mlp_out"}
    with pytest.raises(UserError, match="maps resid_pre -> mlp_out"):
        check_mlp_transcoder(tc)
    with pytest.raises(UserError, match="is not a transcoder"):
        check_mlp_transcoder(create("topk", 8, 32, k=4), "layer 3's SAE")


def test_analyze_a_transcoder_run(pair_store, tmp_path):
    """Codes come from the store's input rows; anomalies measure the error against the target rows; the
    decoder rows analysis reads (W_dec_raw, what logit effects use) are the output directions in target units."""
    import pandas as pd

    import sae
    from sae.analyze.pipeline import AnalyzeOptions, analyze
    from sae.train.trainer import TrainOptions, train_on_store
    options = TrainOptions(tokens=128 * 10, batch_size=128, seed=0, device="cpu", log_every=10, checkpoint_every=0,
                           init_rows=256, eval_rows=0)
    train_on_store(pair_store, "topk", tmp_path / "run", options, knobs={"k": 4}, d_sae=64, layer=0,
                   transcoder=True, progress=False)
    model = sae.load(tmp_path / "run")
    analyze(tmp_path / "run", pair_store, options=AnalyzeOptions(with_model=False))
    folder = next(p.parent for p in (tmp_path / "run").rglob("features.parquet"))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["transcoder"] and meta["target_site"] == "mlp_out"
    features = pd.read_parquet(folder / "features.parquet").set_index("feature")
    every_x = torch.cat([pair_store.read_shard(i, "activations.0") for i in range(len(pair_store.shards))])
    every_y = torch.cat([pair_store.read_shard(i, "targets.0") for i in range(len(pair_store.shards))])
    with torch.no_grad():
        codes = model.encode(every_x)
        errors = (model.predict(every_x) - every_y).pow(2).sum(dim=1)
    torch.testing.assert_close(torch.tensor(features["max_activation"].to_numpy()), codes.max(dim=0).values,
                               rtol=1e-4, atol=1e-5)
    worst = pd.read_parquet(folder / "anomalies.parquet").iloc[0]          # the window the prediction fits worst
    shard = [s.name for s in pair_store.shards].index(worst["shard"])
    rows = (pair_store.read_shard(shard, "window_index") == int(worst["window_index"])).nonzero().squeeze(1)
    rows = rows + pair_store.shards[shard].start
    expected = float(errors[rows].mean() / every_y.pow(2).sum(dim=1).mean())
    assert abs(float(worst["error"]) - expected) < 1e-4 * expected
    torch.testing.assert_close(model.W_dec_raw, model.W_dec.detach() / model.target_scale)
