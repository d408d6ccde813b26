"""sae.load on other tools' layouts (SAELens, sparsify, Hub repos of either), refusals of pickles,
save_pretrained/from_pretrained/push_to_hub, and SAELens activation caches as training stores."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sae
from sae import interop, variants
from sae.errors import UserError
from sae.runs import from_pretrained, push_to_hub, read_config, save_pretrained

D_IN, D_SAE = 12, 48


def rand(*shape, seed=None, scale=0.3):
    if seed is not None:
        torch.manual_seed(seed)
    return torch.randn(*shape) * scale


def raw_inputs(n=150, seed=3):
    torch.manual_seed(seed)
    return torch.randn(n, D_IN) * 2.0 + 0.5


def write_saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def standard_tensors(seed=0):
    torch.manual_seed(seed)
    return {"W_enc": rand(D_IN, D_SAE), "b_enc": rand(D_SAE, scale=0.2), "W_dec": rand(D_SAE, D_IN),
            "b_dec": rand(D_IN, scale=0.5)}


def v6_cfg(arch, hook="blocks.8.hook_resid_pre", **extra):
    return {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"model_name": "gpt2", "hook_name": hook, "sae_lens_version": "6.5.0"}, **extra}


# ---- SAELens folders written by hand (not by our export) ----------------------------------------
def test_saelens_standard_without_input_centring_and_with_scaling_factor(tmp_path):
    w = standard_tensors()
    scaling = 0.5 + torch.rand(D_SAE)
    folder = write_saelens(tmp_path / "std", v6_cfg("standard", apply_b_dec_to_input=False),
                           {**w, "scaling_factor": scaling})
    model = sae.load(folder)
    assert model.name == "l1" and isinstance(model, variants.SAE)
    x = raw_inputs()
    expected_codes = torch.relu(x @ w["W_enc"] + w["b_enc"])          # no b_dec subtracted
    expected_x_hat = (expected_codes * scaling) @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        assert (expected_codes > 0).any()
        torch.testing.assert_close(model.encode(x), expected_codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(model.encode(x)), expected_x_hat, rtol=1e-5, atol=1e-5)
    assert (model.run_config["layer"], model.run_config["site"]) == (8, "resid_pre")


def test_saelens_pre_6_topk_config(tmp_path):
    """SAELens 5.x wrote flat keys: hook_name, activation_fn_str='topk', activation_fn_kwargs={'k': ...}."""
    w = standard_tensors(1)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "model_name": "gpt2-small",
           "hook_point": "blocks.4.hook_mlp_out", "hook_point_layer": 4, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": True, "normalize_activations": False,
           "finetuning_scaling_factor": False, "context_size": 128}
    model = sae.load(write_saelens(tmp_path / "old", cfg, w))
    x = raw_inputs()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(5, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), expected, rtol=1e-5, atol=1e-5)
    assert model.name == "topk" and model.knobs["k"] == 5
    assert (model.run_config["layer"], model.run_config["site"]) == (4, "mlp_out")
    assert read_config(tmp_path / "old")["variant"] == "topk"  # what analysis and the dashboard read


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path):
    """SAELens >= 6.x TopK option: codes = topk(pre · ‖W_dec_j‖), x̂ = Σ codes_j W_dec_j / ‖W_dec_j‖ + b_dec."""
    w = standard_tensors(5)
    w["W_dec"] = w["W_dec"] * (0.2 + 3 * torch.rand(D_SAE, 1))  # rows far from unit norm
    model = sae.load(write_saelens(tmp_path / "rescaled", v6_cfg("topk", k=5, rescale_acts_by_decoder_norm=True), w))
    x = raw_inputs()
    norms = w["W_dec"].norm(dim=1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms
    top = pre.topk(5, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(codes), (codes / norms) @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_folders_written_by_saelens_itself(tmp_path, arch):
    """Where SAELens is installed: its own save_model output loads here and computes what SAELens computes."""
    pytest.importorskip("sae_lens", reason="sae_lens is not installed (it is not a dependency)")
    from sae_lens import SAE
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    make = {"standard": (StandardSAE, StandardSAEConfig, {}),
            "topk": (TopKSAE, TopKSAEConfig, {"k": 6, "rescale_acts_by_decoder_norm": True}),
            "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}), "gated": (GatedSAE, GatedSAEConfig, {})}[arch]
    theirs = make[0](make[1](d_in=D_IN, d_sae=D_SAE, **make[2]))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            param.copy_(torch.rand_like(param) * 0.4 if name == "threshold" else torch.randn_like(param) * 0.3)
    theirs.save_model(str(tmp_path / arch))
    ours = sae.load(tmp_path / arch)
    theirs = SAE.load_from_disk(str(tmp_path / arch), device="cpu")
    x = raw_inputs()
    with torch.no_grad():
        codes = theirs.encode(x)
        assert (codes > 0).float().mean() > 0.02
        torch.testing.assert_close(ours.encode(x), codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(codes), theirs.decode(codes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_saelens_jumprelu_and_gated(tmp_path, arch):
    if arch not in variants.load_all():
        pytest.skip(f"variant {arch} is not in the registry yet")
    w = standard_tensors(2)
    x = raw_inputs()
    x_c = x - w["b_dec"]
    if arch == "jumprelu":
        w["threshold"] = torch.rand(D_SAE) * 0.4
        pre = x_c @ w["W_enc"] + w["b_enc"]
        expected = torch.relu(pre) * (pre > w["threshold"])
    else:
        b_enc = w.pop("b_enc")
        w.update({"b_gate": b_enc, "r_mag": rand(D_SAE, scale=0.2), "b_mag": rand(D_SAE, scale=0.2)})
        gate = (x_c @ w["W_enc"] + w["b_gate"]) > 0
        expected = gate * torch.relu(x_c @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    model = sae.load(write_saelens(tmp_path / arch, v6_cfg(arch), w))
    assert model.name == arch
    with torch.no_grad():
        assert (expected > 0).float().mean() > 0.05
        torch.testing.assert_close(model.encode(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(expected), expected @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)


def test_saelens_unsupported_settings_are_refused(tmp_path):
    w = standard_tensors()
    with pytest.raises(UserError, match="layer_norm"):
        sae.load(write_saelens(tmp_path / "ln", v6_cfg("standard", normalize_activations="layer_norm"), w))
    with pytest.raises(UserError, match="architecture 'temporal'"):
        sae.load(write_saelens(tmp_path / "tc", v6_cfg("temporal"), w))
    bad = dict(w, W_enc=torch.zeros(D_IN + 1, D_SAE))
    with pytest.raises(UserError, match="W_enc has shape"):
        sae.load(write_saelens(tmp_path / "shape", v6_cfg("standard"), bad))


# ---- the Hugging Face Hub ---------------------------------------------------------------------
def release_copy(root: Path) -> Path:
    """A local folder laid out like a SAELens release repo: one folder per hook."""
    for layer in (7, 8):
        write_saelens(root / f"blocks.{layer}.hook_resid_pre", v6_cfg("standard", f"blocks.{layer}.hook_resid_pre"),
                      standard_tensors(layer))
    return root


def test_hub_id_is_fetched_with_the_release_subfolder(tmp_path, monkeypatch):
    import huggingface_hub
    repo = release_copy(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, revision=None, **kwargs):
        calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns, "revision": revision})
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = sae.load("jbloom/GPT2-Small-SAEs-Reformatted", subfolder="blocks.8.hook_resid_pre")
    assert calls == [{"repo_id": "jbloom/GPT2-Small-SAEs-Reformatted",
                      "allow_patterns": ["blocks.8.hook_resid_pre/*"], "revision": None}]
    w = standard_tensors(8)
    x = raw_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]),
                                   rtol=1e-5, atol=1e-5)
    assert model.run_config["layer"] == 8
    from_pretrained("org/release", subfolder="blocks.7.hook_resid_pre", revision="v1")
    assert calls[-1] == {"repo_id": "org/release", "allow_patterns": ["blocks.7.hook_resid_pre/*"], "revision": "v1"}
    # the same layout as a local copy of the repo
    local = sae.load(repo, subfolder="blocks.8.hook_resid_pre")
    with torch.no_grad():
        torch.testing.assert_close(local.encode(x), model.encode(x))
    with pytest.raises(UserError, match="subfolder="):
        sae.load(repo)  # several SAEs inside: the message names them
    # no subfolder: only the root's files are fetched (never a whole multi-SAE release)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, revision=None: [
        "README.md", "blocks.7.hook_resid_pre/cfg.json", "blocks.7.hook_resid_pre/sae_weights.safetensors"])
    with pytest.raises(UserError, match="no SAE at its root.*blocks.7.hook_resid_pre"):
        sae.load("org/release")
    assert "blocks.8.hook_resid_pre/*" not in calls[-1]["allow_patterns"]
    assert "cfg.json" in calls[-1]["allow_patterns"] and "sae.safetensors" in calls[-1]["allow_patterns"]


def test_hub_failure_is_one_line(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as error:
        sae.load("org/name", subfolder="x")
    assert "org/name" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(UserError, match="does not exist"):
        sae.load("./no/such/folder")


# ---- sparsify ----------------------------------------------------------------------------------
def sparsify_folder(folder: Path, k=6, **cfg_extra) -> dict:
    """sparsify's save_to_disk layout: cfg.json (SparseCoderConfig + d_in) and sae.safetensors."""
    folder.mkdir(parents=True)
    torch.manual_seed(4)
    tensors = {"encoder.weight": rand(D_SAE, D_IN), "encoder.bias": rand(D_SAE, scale=0.1),
               "W_dec": rand(D_SAE, D_IN), "b_dec": rand(D_IN, scale=0.5)}
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **cfg_extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae.safetensors"))
    return tensors


def test_sparsify_checkpoint_loads_as_topk(tmp_path):
    w = sparsify_folder(tmp_path / "ckpt" / "layers.6")
    model = sae.load(tmp_path / "ckpt" / "layers.6")
    assert model.name == "topk" and model.d_sae == D_SAE and model.knobs["k"] == 6
    x = raw_inputs()
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(6, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(codes), codes @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
    assert (model.run_config["layer"], model.run_config["site"]) == (6, "resid_post")
    assert sae.load(tmp_path / "ckpt", subfolder="layers.6").d_sae == D_SAE


def test_sparsify_checkpoint_converts_to_saelens(tmp_path):
    """sae export also takes a foreign folder: sparsify -> SAELens keeps the function."""
    from test_export import saelens_reference

    from sae.export import export
    w = sparsify_folder(tmp_path / "layers.3")
    out = export(tmp_path / "layers.3", tmp_path / "saelens", "saelens")
    x = raw_inputs()
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(6, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    ref_codes, ref_x_hat = saelens_reference(out, x)
    torch.testing.assert_close(ref_codes, codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_x_hat, codes @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5)
    assert json.loads((out / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.3.hook_resid_post"


def test_sparsify_transcoders_load_and_autoencoder_skips_are_refused(tmp_path):
    sparsify_folder(tmp_path / "tc", transcode=True)     # transcoders: tests/test_transcoder.py
    assert sae.load(tmp_path / "tc").is_transcoder
    sparsify_folder(tmp_path / "skip", skip_connection=True)
    with pytest.raises(UserError, match="skip connection"):
        sae.load(tmp_path / "skip")


# ---- pickles --------------------------------------------------------------------------------------
def test_pickle_formats_are_refused_with_the_reason(tmp_path):
    folder = tmp_path / "dictionary_learning"
    folder.mkdir()
    (folder / "ae.pt").write_bytes(b"\x80\x04not really a pickle")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    for target in (folder, folder / "ae.pt"):
        with pytest.raises(UserError) as error:
            sae.load(target)
        assert "pickle" in str(error.value) and "ae.pt" in str(error.value)
        assert "dictionary_learning" in str(error.value)


# ---- save_pretrained / from_pretrained / push_to_hub -------------------------------------------
def test_save_pretrained_round_trip_and_push(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = variants.create("l1", d_in=D_IN, d_sae=D_SAE)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
        model.input_scale.fill_(1.7)
    model.run_config = {"layer": 6, "site": "resid_post", "model": "smollm2"}
    folder = save_pretrained(model, tmp_path / "hub_ready")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "sae.safetensors", "README.md"}
    assert "library_name: sae" in (folder / "README.md").read_text()
    loaded = from_pretrained(folder)
    x = raw_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        assert torch.equal(loaded.decode(loaded.encode(x)), model.decode(model.encode(x)))
    assert loaded.run_config["layer"] == 6 and loaded.run_config["variant"] == "l1"

    import huggingface_hub
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploads.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id, commit_message, ignore_patterns):
            uploads.append(("upload", Path(folder_path), repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(folder, "me/my-sae", private=True)
    assert uploads == [("create", "me/my-sae", True), ("upload", folder, "me/my-sae")]
    assert url.endswith("me/my-sae")
    with pytest.raises(UserError):
        push_to_hub(tmp_path, "me/not-a-run")  # refused before any network call
    assert len(uploads) == 2


# ---- SAELens activation caches ----------------------------------------------------------------
CTX = 16


def saelens_cache(folder: Path, n_seq=60, d=D_IN, hooks=("blocks.2.hook_resid_post", "blocks.4.hook_resid_post"),
                  with_tokens=True, seed=0, max_shard_size="30KB"):
    """A cache as SAELens's CacheActivationsRunner writes it: one row per sequence, an Array2D column
    [context, d_in] per hook, a token_ids column, saved with datasets' save_to_disk."""
    from datasets import Array2D, Dataset, Features, Sequence, Value
    torch.manual_seed(seed)
    columns = {hook: (torch.randn(n_seq, CTX, d) * (i + 1)).numpy() for i, hook in enumerate(hooks)}
    features = {hook: Array2D(shape=(CTX, d), dtype="float32") for hook in hooks}
    if with_tokens:
        columns["token_ids"] = torch.randint(0, 1000, (n_seq, CTX), dtype=torch.int32).numpy()
        features["token_ids"] = Sequence(Value("int32"), length=CTX)
    Dataset.from_dict(columns, features=Features(features)).save_to_disk(str(folder), max_shard_size=max_shard_size)
    return {k: torch.from_numpy(v) for k, v in columns.items()}


def test_saelens_cache_reads_as_a_store(tmp_path):
    columns = saelens_cache(tmp_path / "cache")
    store = interop.open_store(tmp_path / "cache")
    assert len(store) == 60 * CTX and store.d_model == D_IN and store.layers == [2, 4]
    assert store.manifest["site"] == "resid_post" and len(store.shards) > 1  # several Arrow files/chunks
    flat = {layer: columns[f"blocks.{layer}.hook_resid_post"].reshape(-1, D_IN) for layer in (2, 4)}
    assert torch.equal(torch.cat(list(store.activations(4, batch_size=100))), flat[4])
    picks = torch.tensor([0, 17, 333, 334, 700, 959])
    assert torch.equal(store.rows(2, picks), flat[2][picks])
    shuffled = torch.tensor([959, 3, 700, 17, 334, 0])                  # training batches: any order, only those rows
    store.read = lambda *a, **k: pytest.fail("gather must not read whole chunks")
    assert torch.equal(store.gather(2, shuffled), flat[2][shuffled])
    del store.read
    # every row traces back to its context: window_tokens[window_index, position] is the row's token
    tokens = columns["token_ids"].reshape(-1)
    for shard_index, shard in enumerate(store.shards):
        windows = store.read_shard(shard_index, "window_tokens")
        index = store.read_shard(shard_index, "window_index")
        position = store.read_shard(shard_index, "position").long()
        assert torch.equal(windows[index, position], tokens[shard.start:shard.start + shard.n_rows])
    # held-out rule by sequence: a sequence's rows are all on one side
    doc = store.column("doc_id")
    held = store.held_out_mask()
    assert held.any() and (~held).any()
    assert all(len(set(held[doc == d].tolist())) == 1 for d in range(60))
    first = next(iter(store.train_batches(2, batch_size=64, seed=5)))
    again = next(iter(store.train_batches(2, batch_size=64, seed=5)))
    assert torch.equal(first, again) and first.shape == (64, D_IN)
    with pytest.raises(UserError, match="pass --layer"):
        store.resolve_layer(None)


def test_old_sharded_cache_layout_and_lazy_reading(tmp_path):
    """Older SAELens wrote shard_0/, shard_1/ ...; columns are memory-mapped, not loaded."""
    parts = [saelens_cache(tmp_path / "old" / f"shard_{i}", n_seq=10, hooks=("blocks.0.hook_mlp_out",),
                           with_tokens=False, seed=i) for i in range(3)]
    store = interop.open_store(tmp_path / "old")
    expected = torch.cat([p["blocks.0.hook_mlp_out"].reshape(-1, D_IN) for p in parts])
    assert store.layers == [0] and len(store) == 30 * CTX and not store.has_windows
    assert torch.equal(torch.cat(list(store.activations(batch_size=128))), expected)
    view = store._columns_flat["blocks.0.hook_mlp_out"].views[0]
    assert not view.flags.owndata and not view.flags.writeable  # a view into the memory-mapped Arrow file


def test_training_on_a_saelens_cache(tmp_path):
    from sae.train.trainer import TrainOptions, train_on_store
    if "topk" not in variants.load_all():
        pytest.skip("variant topk is not in the registry yet")
    # low-rank data, so that a small SAE can reconstruct it well
    torch.manual_seed(0)
    basis = torch.randn(4, D_IN)
    from datasets import Array2D, Dataset, Features
    acts = (torch.randn(120, CTX, 4) @ basis).numpy()
    Dataset.from_dict({"blocks.3.hook_resid_pre": acts},
                      features=Features({"blocks.3.hook_resid_pre": Array2D(shape=(CTX, D_IN), dtype="float32")})
                      ).save_to_disk(str(tmp_path / "cache"))
    store = interop.open_store(tmp_path / "cache")
    options = TrainOptions(tokens=60_000, batch_size=256, device="cpu", checkpoint_every=0, eval_rows=512,
                           init_rows=1024, log_every=50)
    summary = train_on_store(store, "topk", tmp_path / "run", options, knobs={"k": 4}, d_sae=32, progress=False)
    config = read_config(tmp_path / "run")
    assert config["store_digest"] == store.digest and config["site"] == "resid_pre" and config["layer"] == 3
    model = sae.load(tmp_path / "run")
    held = torch.cat(list(store.activations(split="held_out")))
    with torch.no_grad():
        x_hat = model.decode(model.encode(held))
    fvu = ((held - x_hat).pow(2).sum() / (held - held.mean(0)).pow(2).sum()).item()
    assert fvu < 0.2, (fvu, summary.get("held_out"))


def test_train_command_accepts_a_saelens_cache(tmp_path):
    source = (Path(sae.__file__).parent / "commands" / "train.py").read_text()
    if "open_store" not in source:
        pytest.skip("sae/commands/train.py does not open --activations through sae.interop.open_store yet")
    from sae.cli import main
    saelens_cache(tmp_path / "cache", hooks=("blocks.1.hook_resid_post",))
    with pytest.raises(SystemExit) as done:
        main(["train", "--activations", str(tmp_path / "cache"), "--variant", "topk", "--k", "4",
              "--d-sae", "32", "--tokens", "4096", "--batch-size", "256", "--device", "cpu",
              "--out", str(tmp_path / "run")])
    assert done.value.code in (0, None)
    assert read_config(tmp_path / "run")["layer"] == 1
