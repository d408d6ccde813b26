"""The shared trainer: schedules, scaling, corruption, dead latents, checkpoints, resume, NaN guard."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae import variants
from sae.train import checkpoint
from sae.errors import UserError
from sae.store import from_tensors
from sae.train.trainer import Trainer, TrainOptions, TrainingDiverged, held_out_summary, lr_at, train_on_store
from sae.variants.base import REGISTRY, StepContext
from tiny_variants import TinyNaN, TinyNoisy, TinyReLU, synthetic


@pytest.fixture
def tiny_registry(monkeypatch):
    variants.load_all()
    for cls in (TinyReLU, TinyNoisy, TinyNaN):
        monkeypatch.setitem(REGISTRY, cls.name, cls)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x = synthetic(n=6000, d_in=16)
    return from_tensors(tmp_path_factory.mktemp("store") / "s", x, layer=3, model="synthetic", site="resid_post")


def opts(**kw):
    base = dict(tokens=256 * 40, batch_size=256, seed=0, device="cpu", log_every=5, checkpoint_every=0,
                init_rows=2048, eval_rows=1024)
    base.update(kw)
    return TrainOptions(**base)


def test_lr_schedule_closed_form():
    total, base = 100, 1e-3
    values = [lr_at(s, total, base, 0.1, 0.2) for s in range(total)]
    assert values[0] == pytest.approx(base / 10) and values[9] == pytest.approx(base)
    assert values[50] == base
    assert values[80] == pytest.approx(base * 20 / 20) and values[90] == pytest.approx(base * 10 / 20)
    assert values[99] == pytest.approx(base / 20)
    assert max(values) == base


def test_init_sets_scale_and_decoder_bias():
    x = synthetic(n=2048, d_in=16, scale=50.0)
    model = TinyReLU(16, 64)
    trainer = Trainer(model, opts())
    trainer.init_from_sample(x)
    scaled = x * model.input_scale
    assert scaled.norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-5)  # sqrt(16)
    # the geometric median minimises the sum of distances: its gradient there is ~0
    median = model.b_dec.detach()
    unit = (scaled - median) / (scaled - median).norm(dim=1, keepdim=True)
    assert unit.sum(0).norm().item() < 1e-2 * len(x)
    assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)


def test_training_reduces_loss_and_beats_the_mean(store, tmp_path, tiny_registry):
    summary = _train_api(store, tmp_path / "run", "tiny_relu", opts(tokens=256 * 120))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
    assert summary["held_out"]["fvu"] < 0.3
    assert {"step", "tokens", "loss", "fvu", "l0", "dead_fraction", "lr", "tokens_per_s", "mse"} <= set(lines[-1])
    # held-out FVU recomputed independently from the saved run
    loaded = sae.load(tmp_path / "run")
    held = torch.cat(list(store.activations(3, split="held_out")))[:1024]
    fvu = ((held - loaded(held)) ** 2).sum() / ((held - held.mean(0)) ** 2).sum()
    assert summary["held_out"]["fvu"] == pytest.approx(fvu.item(), rel=1e-4)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["variant"] == "tiny_relu" and config["layer"] == 3 and config["store_digest"] == store.digest
    assert config["training"]["complete"] and "version" in config and "git_commit" in config


def _train_api(store, run, variant, options, **kw):
    return train_on_store(store, variant, run, options, progress=False, expansion=4, **kw)


def test_corruption_noise_and_mask_reach_the_input_not_the_target():
    x = synthetic(n=512, d_in=16)
    model = TinyReLU(16, 32)
    trainer = Trainer(model, opts(noise_std=0.5, mask_prob=0.25))
    trainer.init_from_sample(x)
    model.spy = True
    trainer.step(x[:256])
    x_input, x_target, _ = model.seen_inputs[-1]
    assert torch.allclose(x_target, x[:256] * model.input_scale)
    masked = x_input == 0
    assert 0.18 < masked.float().mean().item() < 0.32
    noise = (x_input - x_target)[~masked]
    assert noise.std().item() == pytest.approx(0.5, rel=0.1)
    # the variant's default noise applies when the user sets none
    assert Trainer(TinyNoisy(16, 32), opts()).noise_std == 0.1
    assert Trainer(TinyNoisy(16, 32), opts(noise_std=0.0)).noise_std == 0.0


def test_sparsity_warmup_and_dead_mask_reach_the_variant():
    x = synthetic(n=2048, d_in=16)
    model = TinyReLU(16, 32)
    trainer = Trainer(model, opts(tokens=256 * 20, sparsity_warmup=0.5, dead_after_tokens=512, revive_every=10**6))
    trainer.init_from_sample(x)
    with torch.no_grad():
        model.b_enc[:5] = -1e4  # latents 0..4 can never fire
    model.spy = True
    for step in range(6):
        trainer.step(x[step * 256:(step + 1) * 256])
    scales = [ctx.sparsity_scale for _, _, ctx in model.seen_inputs]
    assert scales == pytest.approx([(s + 1) / 10 for s in range(6)])
    ctx = model.seen_inputs[-1][2]
    assert ctx.dead_mask[:5].all()  # 1280 tokens without firing > 512
    assert trainer.tokens_since_fired[:5].tolist() == [6 * 256] * 5


def test_revival_reinitialises_dead_latents_and_resets_their_adam_state():
    x = synthetic(n=4096, d_in=16)
    model = TinyReLU(16, 32)
    trainer = Trainer(model, opts(tokens=256 * 40, dead_after_tokens=512, revive_every=4))
    trainer.init_from_sample(x)
    with torch.no_grad():
        model.b_enc[:5] = -1e4
    for step in range(3):
        trainer.step(x[step * 256:(step + 1) * 256])
    state = trainer.optimizer.state[model.W_enc]
    assert state["exp_avg_sq"][:, 5:].abs().sum() > 0
    trainer.step(x[768:1024])  # step 4: revival
    assert trainer.revived_total == 5
    assert (model.b_enc[:5] == 0).all()
    for param, axis in ((model.W_enc, 1), (model.W_dec, 0), (model.b_enc, 0)):
        moments = trainer.optimizer.state[param]["exp_avg"]
        dead_part = moments[:, :5] if axis == 1 else moments[:5]
        assert (dead_part == 0).all(), param.shape
    assert trainer.optimizer.state[model.W_enc]["exp_avg"][:, 5:].abs().sum() > 0
    assert (trainer.tokens_since_fired[:5] == 0).all()
    codes = model.encode_scaled(x[:1024] * model.input_scale)
    assert (codes[:, :5] > 0).any(0).sum() >= 3  # revived latents fire again


def test_nan_loss_stops_with_a_clear_message_and_saves_nothing(store, tmp_path, tiny_registry):
    with pytest.raises(TrainingDiverged, match="NaN/Inf at step 4"):
        _train_api(store, tmp_path / "run", "tiny_nan", opts(checkpoint_every=2))
    saved = checkpoint.list_checkpoints(tmp_path / "run")
    assert [step for step, _ in saved] == [2]
    assert all(torch.isfinite(v).all() for v in load_file(str(saved[0][1] / "sae.safetensors")).values())


@pytest.mark.parametrize("variant", ["tiny_relu", "tiny_noisy"])
def test_resume_is_bitwise_identical(store, tmp_path, variant, tiny_registry):
    full = tmp_path / "full"
    _train_api(store, full, variant, opts(tokens=256 * 12, checkpoint_every=0))
    part = tmp_path / "part"
    _train_api(store, part, variant, opts(tokens=256 * 12, checkpoint_every=5, keep_checkpoints=0))
    # drop everything after step 5: as if the process died right after that checkpoint
    for step, path in checkpoint.list_checkpoints(part):
        if step > 5:
            import shutil
            shutil.rmtree(path)
    (part / "sae.safetensors").unlink()
    _train_api(store, part, variant, opts(tokens=256 * 12, checkpoint_every=5), resume=True)
    a, b = load_file(str(full / "sae.safetensors")), load_file(str(part / "sae.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated lines after the resume


def test_resume_refuses_a_different_variant_or_store(store, tmp_path, tiny_registry):
    run = tmp_path / "run"
    train_on_store(store, "tiny_relu", run, opts(tokens=256 * 4), progress=False, expansion=4)
    with pytest.raises(UserError, match="trains variant tiny_relu, not tiny_noisy"):
        train_on_store(store, "tiny_noisy", run, opts(), resume=True, progress=False)
    with pytest.raises(UserError, match="l1-coefficient"):
        train_on_store(store, "tiny_relu", run, opts(), knobs={"l1_coefficient": 0.5}, resume=True, progress=False)
    other = from_tensors(tmp_path / "other", synthetic(n=3000, d_in=8), layer=3)
    with pytest.raises(UserError, match="d_in is 16"):
        train_on_store(other, "tiny_relu", run, opts(), resume=True, progress=False)
    with pytest.raises(UserError, match="not empty"):
        train_on_store(store, "tiny_relu", run, opts(), progress=False)
    # a finished run resumed again stays the same
    before = load_file(str(run / "sae.safetensors"))
    train_on_store(store, "tiny_relu", run, opts(tokens=256 * 4), resume=True, progress=False)
    after = load_file(str(run / "sae.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_force_replaces_only_run_files(store, tmp_path, tiny_registry):
    """--force replaces a run and what was derived from its weights; a folder holding anything else is
    refused whole, its files untouched."""
    run = tmp_path / "run"
    train_on_store(store, "tiny_relu", run, opts(tokens=256 * 4), progress=False)
    (run / "analysis").mkdir()
    (run / "analysis" / "meta.json").write_text("{}")
    train_on_store(store, "tiny_relu", run, opts(tokens=256 * 4), progress=False, force=True)
    assert (run / "sae.safetensors").is_file() and not (run / "analysis").exists()   # stale analysis gone
    (run / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="holds other files"):
        train_on_store(store, "tiny_relu", run, opts(tokens=256 * 4), progress=False, force=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_empty_or_all_held_out_store_is_refused(tmp_path, tiny_registry):
    held = from_tensors(tmp_path / "held", torch.randn(50, 16), layer=0, doc_id=torch.zeros(50, dtype=torch.int64))
    with pytest.raises(UserError, match="training rows"):
        train_on_store(held, "tiny_relu", tmp_path / "run", opts(batch_size=16, tokens=64), progress=False)


def _checkpoint_cases():
    cases = [("tiny_relu", {})]
    for name in variants.names():
        if not name.startswith("tiny"):
            cases.append((name, {}))
    return cases


@pytest.mark.parametrize("variant,knobs", _checkpoint_cases())
def test_checkpoints_load_to_the_training_time_model(store, tmp_path, variant, knobs, tiny_registry):
    """Every intermediate checkpoint, opened by sae.load, gives exactly the in-memory model's outputs."""
    cls = variants.get(variant)
    torch.manual_seed(0)
    try:
        model = cls.create(16, None, 4.0, **knobs)
    except UserError as error:
        pytest.skip(f"{variant} cannot be built at d_in 16 with its defaults: {error}")
    x = torch.cat(list(store.activations(3, split="train")))[:1024]  # raw units
    trainer = Trainer(model, opts(tokens=256 * 8), tmp_path / "run", {"layer": 3})
    trainer.init_from_sample(x)
    assert model.input_scale.item() != pytest.approx(1.0)  # the scale must be folded into what is saved
    for step in range(6):
        trainer.step(x[(step % 4) * 256:(step % 4 + 1) * 256])
        if step in (2, 5):
            path = trainer.save_checkpoint()
            model.eval()
            with torch.no_grad():
                expected_codes = model.encode(x[:64])
                expected = model.decode(expected_codes)
            model.train()
            loaded = sae.load(path)
            with torch.no_grad():
                assert torch.equal(loaded.encode(x[:64]), expected_codes)
                assert torch.equal(loaded.decode(loaded.encode(x[:64])), expected)
    if variant == "tiny_relu":  # its training loss reconstructs exactly with encode/decode
        out = model.training_loss(x[:64] * model.input_scale, x[:64] * model.input_scale, trainer_ctx())
        assert torch.allclose(out.x_hat / model.input_scale, sae.load(tmp_path / "run")(x[:64]), atol=1e-5)


def trainer_ctx():
    from sae.variants.base import StepContext
    return StepContext()


def test_held_out_scores_match_brute_force(store):
    model = TinyReLU(16, 64)
    model.input_scale.fill_(0.3)
    scores = held_out_summary(model, store, 3, rows=300, device="cpu")
    held = torch.cat(list(store.activations(3, split="held_out")))[:300]
    codes = model.encode(held)
    x_hat = model.decode(codes)
    fvu = ((held - x_hat) ** 2).sum() / ((held - held.mean(0)) ** 2).sum()
    assert scores["rows"] == 300
    assert scores["fvu"] == pytest.approx(fvu.item(), rel=1e-5)
    assert scores["l0"] == pytest.approx((codes > 0).sum(1).float().mean().item())
    assert scores["dead_fraction"] == pytest.approx((~(codes > 0).any(0)).float().mean().item())


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    model = TinyReLU(16, 32)
    trainer = Trainer(model, opts())
    x = synthetic(n=512, d_in=16)
    trainer.init_from_sample(x)
    trainer.step(x[:256])
    tensors, meta = trainer.state_dict()
    json.dumps(meta)  # JSON-able
    other = Trainer(TinyReLU(16, 32), opts())
    other.load_state_dict(model.state_dict(), tensors, meta)
    for p, q in zip(model.parameters(), other.model.parameters()):
        s, t = trainer.optimizer.state[p], other.optimizer.state[q]
        assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])
    assert other.optimizer.steps == trainer.optimizer.steps == 1
    assert math.isclose(other.base_lr, trainer.base_lr)


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_adam_matches_torch_adam(path, monkeypatch):
    """Ours (the compiled update where sae.native is here, else torch's fused one) against torch.optim.Adam,
    with a parameter stored transposed and one whose rows are renormalised after each update."""
    from sae.kernels import native
    from sae.train.optim import Adam
    if path == "torch":
        monkeypatch.setattr(native, "adam_step_", lambda *a, **k: False)
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 5).t())                   # [5, 3], stored transposed
    b, rows = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 5))
    a2, b2, rows2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b, rows))
    ours = Adam([a, b, rows], lr=1e-2, betas=(0.9, 0.99), unit_rows=[rows])
    theirs = torch.optim.Adam([a2, b2, rows2], lr=1e-2, betas=(0.9, 0.99))
    for step in range(5):
        target = torch.randn(5)
        for p, q, r, opt in ((a, b, rows, ours), (a2, b2, rows2, theirs)):
            opt.zero_grad()
            ((p @ q - target) ** 2).sum().backward()
            (r @ p @ q).pow(2).sum().backward()
            opt.step()
        if not ours.renormalised:
            with torch.no_grad():
                rows.div_(rows.norm(dim=1, keepdim=True))
        with torch.no_grad():
            rows2.div_(rows2.norm(dim=1, keepdim=True))
    assert ours.renormalised == (path == "compiled" and native.available())
    for mine, reference in ((a, a2), (b, b2), (rows, rows2)):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


def test_adam_says_renormalised_only_for_rows_it_renormalised():
    from sae.train.optim import Adam
    plain = torch.nn.Parameter(torch.randn(4, 5))
    transposed = torch.nn.Parameter(torch.randn(5, 4).t())            # rows of the transpose are columns here
    for params, unit in (([plain], []), ([transposed], [transposed])):
        opt = Adam(params, lr=1e-2, unit_rows=unit)
        params[0].grad = torch.ones_like(params[0])
        opt.step()
        assert not opt.renormalised                                     # the caller must renormalise


def test_prepare_run_dir_rules(tmp_path):
    assert checkpoint.prepare_run_dir(tmp_path / "new", resume=False, force=False) is None
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.csv").write_text("1")
    with pytest.raises(UserError, match="holds no training run"):
        checkpoint.prepare_run_dir(junk, resume=True, force=False)
    with pytest.raises(UserError, match="not empty"):
        checkpoint.prepare_run_dir(junk, resume=False, force=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        checkpoint.prepare_run_dir(tmp_path / "file", resume=False, force=True)
    # checkpoints written half-way (a hidden temporary folder) are never picked for a resume
    run = tmp_path / "run"
    (run / "checkpoints" / ".step_000010.tmp123").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert checkpoint.prepare_run_dir(run, resume=True, force=False) is None
    assert not (run / "checkpoints" / ".step_000010.tmp123").exists()


@pytest.mark.parametrize("name", ["topk", "relu"])
def test_logged_training_fvu_is_the_window_reconstruction_error(name):
    """The window FVU the trainer logs (for TopK from the loss's own Σ‖x̂ − x‖²) equals one computed here
    from the model as it stood before each step."""
    variants.load_all()
    x = synthetic(n=512, d_in=16)
    model = variants.create(name, d_in=16, d_sae=64, **({"k": 4} if name == "topk" else {}))
    trainer = Trainer(model, opts(tokens=256 * 2, log_every=2), None)
    trainer.init_from_sample(x)
    errors, total = 0.0, x[:512] * model.input_scale
    for step in range(2):
        batch = x[step * 256:(step + 1) * 256]
        with torch.no_grad():
            errors += float(((model(batch) - batch) * model.input_scale).double().pow(2).sum())
        metrics = trainer.step(batch)
    variance = float((total.double() - total.double().mean(0)).pow(2).sum())
    assert metrics["fvu"] == pytest.approx(errors / variance, rel=1e-4)


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka"])
def test_loss_squared_error_is_that_of_its_reconstruction(name):
    variants.load_all()
    x = synthetic(n=256, d_in=16)
    model = variants.create(name, d_in=16, d_sae=64, k=4)
    out = model.training_loss(x, x, StepContext())
    assert "squared_error" not in out.terms
    assert float(out.squared_error) == pytest.approx(float((out.x_hat - x).double().pow(2).sum()), rel=1e-5)
