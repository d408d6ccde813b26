"""Checkpoints at scale (issue 19): --checkpoint-every in steps or time, the weights written once per
checkpoint, and --resume with a larger --tokens extending the run on purpose."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sae.errors import UserError
from sae.store import ActivationStore
from sae.train import checkpoint, schedule
from sae.train.options import TrainOptions
from sae.train.trainer import train_on_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(4000, 16) @ torch.randn(16, 16)
    return ActivationStore.from_tensors(tmp_path_factory.mktemp("ck") / "s", x, layer=0)


def opts(**kw):
    return TrainOptions(**{**dict(tokens=128 * 12, batch_size=128, seed=0, device="cpu", log_every=4, init_rows=1024,
                                  eval_rows=0, checkpoint_every=4), **kw})


def test_checkpoint_every_parses_steps_and_times_and_refuses_zero():
    assert schedule.parse("500") == 500 and schedule.parse(500) == 500
    assert schedule.parse("10m") == ("time", 600.0) and schedule.parse("90s") == ("time", 90.0)
    assert schedule.parse("1.5h") == ("time", 5400.0)
    for bad in ("0", 0, "0m", "-1", "abc", "2.5"):
        with pytest.raises(UserError, match="--checkpoint-every"):
            schedule.parse(bad)
    assert TrainOptions().checkpoint_every == "10m"


def test_time_based_checkpoints_follow_the_clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(schedule.time, "monotonic", lambda: now[0])
    clock = schedule.CheckpointClock("2m")
    assert not clock.due(1, False)
    now[0] += 119
    assert not clock.due(2, False)
    now[0] += 2
    assert clock.due(3, False)
    clock.saved()
    assert not clock.due(4, True)
    steps = schedule.CheckpointClock(3)
    assert [s for s in range(1, 10) if steps.due(s, False)] == [3, 6, 9]


def test_cli_refuses_checkpoint_every_zero(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sae", "train", "--activations", str(tmp_path / "none"), "--variant",
                           "topk", "--out", str(tmp_path / "run"), "--checkpoint-every", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "--checkpoint-every must be positive" in done.stderr
    assert not (tmp_path / "run").exists()


def test_weights_are_written_once_per_checkpoint(store, tmp_path, monkeypatch):
    writes = []
    import sae.runs
    original = sae.runs.save_weights

    def counting(model, path):
        writes.append(str(path))
        return original(model, path)
    monkeypatch.setattr(sae.runs, "save_weights", counting)
    run = tmp_path / "run"
    train_on_store(store, "topk", run, opts(keep_checkpoints=1), progress=False, knobs={"k": 4}, expansion=2)
    assert len(writes) == 3 and all("checkpoints" in w for w in writes)      # steps 4, 8, 12: once each
    latest = checkpoint.latest(run)
    assert os.stat(run / "sae.safetensors").st_ino == os.stat(latest / "sae.safetensors").st_ino
    a, b = load_file(str(run / "sae.safetensors")), load_file(str(latest / "sae.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for _, p in checkpoint.list_checkpoints(run)] == ["step_000012"]   # pruned, the link stays


def test_resume_with_more_tokens_extends_the_run_and_says_so(store, tmp_path, capsys):
    run = tmp_path / "run"
    train_on_store(store, "topk", run, opts(), progress=False, knobs={"k": 4}, expansion=2)
    with pytest.raises(UserError, match="started with --tokens 1536, not 1024"):
        train_on_store(store, "topk", run, opts(tokens=128 * 8), resume=True, progress=False)
    capsys.readouterr()
    summary = train_on_store(store, "topk", run, opts(tokens=128 * 20), resume=True, progress=False)
    assert "extending the run" in capsys.readouterr().err
    assert summary["steps"] == 20 and summary["tokens_this_run"] == 128 * 8
    assert checkpoint.latest(run).name == "step_000020"
