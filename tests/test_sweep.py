"""sae sweep: one pass over the data trains a grid; table, PNG and run folders; ranks under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import sae
from sae.errors import UserError
from sae.evaluate.metrics import evaluate
from sae.evaluate.sweep import assign_ranks, build_models, parse_grid, run_sweep

GRID = "l1:l1_coefficient=1/5,relu,linear"
NAMES = ["l1_l1c1", "l1_l1c5", "relu", "linear"]


def sae_cli(*args, launcher=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", *(launcher or []), "sae", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 16, generator=gen) @ torch.randn(16, 16, generator=gen)  # correlated, like real activations
    return sae.ActivationStore.from_tensors(tmp_path_factory.mktemp("sweep") / "store", x)


def sweep_in_process(store, out, variants, **kw):
    kw = {"tokens": 4096, **kw}
    return run_sweep(store.path, out, variants_spec=variants, batch_size=256, expansion=2, device="cpu",
                     progress=False, **kw)


def sweep_args(store, out, *extra):
    return ["sweep", "--activations", str(store.path), "--out", str(out), "--variants", GRID, "--tokens", "4096",
            "--batch-size", "256", "--expansion", "2", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def single(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "sweep"
    proc = sae_cli(*sweep_args(store, out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_sweep_writes_table_png_and_run_folders(store, single):
    out, proc = single
    table = pd.read_parquet(out / "sweep.parquet")
    assert list(table["name"]) == NAMES
    assert pd.read_csv(out / "sweep.csv")["name"].tolist() == NAMES
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "sweep.json").read_text())
    assert record["wall_seconds"] > 0 and [g["name"] for g in record["grid"]] == NAMES
    assert "wall time" in proc.stdout and "l1_l1c5" in proc.stdout
    for row in table.itertuples():
        run = out / row.name
        assert {"config.json", "sae.safetensors", "eval.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
        model = sae.load(run)
        config = json.loads((run / "config.json").read_text())
        assert config["store_digest"] == store.digest and config["variant"] == row.variant
        # the table's figures are those of an independent evaluation of the saved SAE
        again = evaluate(model, store, with_model=False, write=False, progress=False)
        assert row.fvu == pytest.approx(again["fvu"], rel=1e-6)
        assert row.d_sae == model.d_sae
        if row.variant == "linear":
            assert pd.isna(row.l0)
        else:
            assert row.l0 == pytest.approx(again["l0"], rel=1e-6)
    by_name = table.set_index("name")
    assert by_name.loc["l1_l1c5", "l0"] < by_name.loc["l1_l1c1", "l0"]  # a stronger penalty is sparser
    assert by_name.loc["relu", "fvu"] < 0.9  # training actually happened


def test_sharing_batches_does_not_couple_the_saes(store, single, tmp_path):
    """l1_l1c1 trained alone gets the same weights as inside the four-SAE sweep (one read, many SAEs)."""
    out, _ = single
    alone = tmp_path / "alone"
    sweep_in_process(store, alone, "l1:l1_coefficient=1")
    together = load_file(str(out / "l1_l1c1" / "sae.safetensors"))
    by_itself = load_file(str(alone / "l1_l1c1" / "sae.safetensors"))
    for key in together:  # (thread counts differ between this process and the CLI's: float rounding only)
        torch.testing.assert_close(by_itself[key], together[key], rtol=1e-5, atol=1e-6)


def test_torchrun_spreads_saes_across_ranks(store, single, tmp_path):
    out, _ = single
    spread = tmp_path / "spread"
    proc = sae_cli(*sweep_args(store, spread), launcher=["torch.distributed.run", "--nproc-per-node", "2",
                                                         "--standalone"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_parquet(spread / "sweep.parquet")
    assert list(table["name"]) == NAMES and set(table["rank"]) == {0, 1}
    for name in NAMES:  # every rank read the same batches: weights equal the one-process sweep's
        a = load_file(str(out / name / "sae.safetensors"))
        b = load_file(str(spread / name / "sae.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_resume_trains_only_unfinished(store, tmp_path):
    out = tmp_path / "sweep"
    sweep_in_process(store, out, "relu,linear")
    kept = (out / "relu" / "sae.safetensors").stat().st_mtime_ns
    (out / "linear" / "eval.json").unlink()
    with pytest.raises(UserError, match="not empty"):
        sweep_in_process(store, out, "relu,linear")
    with pytest.raises(UserError, match="was swept with tokens"):      # another budget would mix two grids
        sweep_in_process(store, out, "relu,linear", resume=True, tokens=2048)
    assert not (out / "linear" / "eval.json").exists()
    table = sweep_in_process(store, out, "relu,linear", resume=True)
    assert (out / "relu" / "sae.safetensors").stat().st_mtime_ns == kept
    assert (out / "linear" / "eval.json").is_file()
    assert len(table) == 2 and len(pd.read_parquet(out / "sweep.parquet")) == 2
    sweep_in_process(store, out, "relu", force=True)
    assert not (out / "linear").exists()  # --force replaces the previous sweep, not only its overlap
    assert list(pd.read_parquet(out / "sweep.parquet")["name"]) == ["relu"]


def test_default_grid_and_parsing():
    from sae import variants
    grid = parse_grid(None)
    names = [p.name for p in grid]
    assert len(names) == len(set(names))
    registered = variants.names()
    for name in ("topk", "batchtopk"):
        if name in registered:
            assert [p.knobs["k"] for p in grid if p.variant == name] == [16, 32, 64]
    for name in ("relu", "l1", "linear"):
        assert sum(p.variant == name for p in grid) == 1
    points = parse_grid("l1:l1_coefficient=1/2,kl:sparsity_target=0.01/0.05:kl_coefficient=1")
    assert [p.name for p in points] == ["l1_l1c1", "l1_l1c2", "kl_klc1_rho0.01", "kl_klc1_rho0.05"]
    with pytest.raises(UserError, match="has no knob 'k'.*l1_coefficient"):
        parse_grid("l1:k=3")
    with pytest.raises(UserError, match="unknown variant"):
        parse_grid("nonesuch")
    with pytest.raises(UserError, match="more than once"):
        parse_grid("relu,relu")


def test_rank_assignment_is_balanced_for_any_count_and_width():
    costs = {f"sae{i}": width for i, width in enumerate([4608, 64, 1 << 20, 300, 300, 300, 7, 4608, 2048])}
    for world in (1, 2, 3, 8, 12):
        owner = assign_ranks(costs, world)
        assert set(owner) == set(costs) and set(owner.values()) <= set(range(world))
        loads = [sum(costs[n] for n in owner if owner[n] == r) for r in range(world)]
        assert max(loads) - min(loads) <= max(costs.values())
    assert assign_ranks(costs, 2) == assign_ranks(dict(reversed(list(costs.items()))), 2)  # order-free


def test_initial_weights_depend_on_name_and_seed_only():
    grid = parse_grid("l1:l1_coefficient=1/2,relu")
    full = build_models(grid, 16, 2.0, seed=3)
    alone = build_models(grid, 16, 2.0, seed=3, only={"relu"})
    assert list(alone) == ["relu"]
    for key, value in full["relu"].state_dict().items():
        assert torch.equal(alone["relu"].state_dict()[key], value)
    other = build_models(grid, 16, 2.0, seed=4, only={"relu"})
    assert not torch.equal(other["relu"].W_enc, full["relu"].W_enc)


def test_bad_inputs(store, tmp_path):
    no_held = sae.ActivationStore.from_tensors(tmp_path / "s2", torch.randn(600, 16), doc_id=torch.full((600,), 1))
    with pytest.raises(UserError, match="no held-out documents"):
        sweep_in_process(no_held, tmp_path / "o1", "relu")
    with pytest.raises(UserError, match="the store .* does not exist"):
        run_sweep(tmp_path / "missing", tmp_path / "o3")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="not an activation store"):
        run_sweep(tmp_path / "folder", tmp_path / "o4")
    proc = sae_cli("sweep", "--activations", str(store.path), "--out", str(tmp_path / "o2"), "--variants", "l1:k=4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    expected = "error: --variants l1:k=4: l1 has no knob 'k' (it takes: l1_coefficient, pre_act_coefficient)"
    assert proc.stderr.strip().splitlines() == [expected]


def test_sweep_with_model_reports_ce_recovered_and_draws_both_panels(tmp_path):
    import matplotlib.image
    from test_evaluate import tiny_model_dir, window_store
    loaded = tiny_model_dir(tmp_path / "lm")
    store, _, _ = window_store(tmp_path / "s", loaded, model_name=str(tmp_path / "lm"), n_windows=40)
    out = tmp_path / "sweep"
    table = run_sweep(store.path, out, variants_spec="relu,l1", tokens=1024, batch_size=128, expansion=2,
                      device="cpu", windows=8, progress=False)
    assert table["ce_loss_recovered"].notna().all()
    for row in table.itertuples():  # the shared clean / zero-ablated passes give each SAE's own figures
        again = evaluate(sae.load(out / row.name), store, loaded_model=loaded, max_windows=8, write=False,
                         progress=False)
        assert row.ce_loss_recovered == pytest.approx(again["ce_loss_recovered"], rel=1e-5)
        assert row.kl_div_score == pytest.approx(again["kl_div_score"], rel=1e-5)
    height, width = matplotlib.image.imread(str(out / "sweep.png")).shape[:2]
    assert width > 1.5 * height  # two panels side by side: FVU and CE recovered against L0
