"""`sae train --activations`: the command line, its bad inputs, kill -9 and Ctrl-C followed by --resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae
from sae import variants
from sae.cli import main
from sae.store import from_tensors
from tiny_variants import synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return from_tensors(tmp_path_factory.mktemp("cli") / "store", synthetic(n=6000, d_in=16), layer=6,
                        model="synthetic", site="resid_post")


def cli(*argv):
    """Run `sae ...` in-process; returns (exit status, stderr)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, err.getvalue()


BASIC = ["--tokens", 256 * 8, "--batch-size", 256, "--device", "cpu", "--eval-rows", 256]
SMALL = [*BASIC, "--expansion", 4]


def test_train_writes_a_loadable_run(store, tmp_path):
    status, err = cli("train", "--activations", store.path, "--variant", "relu", "--out", tmp_path / "run", *SMALL)
    assert status == 0, err
    model = sae.load(tmp_path / "run")
    assert (model.d_in, model.d_sae) == (16, 64)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["layer"] == 6 and config["site"] == "resid_post" and config["store_digest"] == store.digest
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 8


def test_codebook_size_sets_the_vq_codebook(store, tmp_path):
    status, err = cli("train", "--activations", store.path, "--variant", "vq", "--out", tmp_path / "vq", *BASIC,
                      "--codebook-size", 24)
    assert status == 0, err
    model = sae.load(tmp_path / "vq")
    assert model.d_sae == 24 and model.W_dec.shape == (24, 16)
    codes = model.encode(store.rows(None, torch.arange(100)))
    assert torch.equal(codes.sum(dim=1), torch.ones(100))  # one-hot over the 24 codes


def _foreign_knob(variant):
    """A knob some registered variant takes but `variant` does not."""
    for name in variants.names():
        for knob in variants.get(name).KNOBS:
            if knob not in variants.get(variant).KNOBS:
                return knob, [v for v in variants.names() if knob in variants.get(v).KNOBS]
    pytest.skip("no knob outside relu's")


def test_bad_inputs_are_one_clear_line(store, tmp_path):
    base = ["train", "--activations", store.path, "--out", tmp_path / "run", *SMALL]
    cases = [
        (["--variant", "nope"], "valid variants"),
        (["--variant", "relu", "--tokens", 0], "less than one batch"),
        (["--variant", "relu", "--batch-size", 0], "batch-size must be positive"),
        (["--variant", "relu", "--lr", -1], "--lr must be"),
        (["--variant", "relu", "--mask-prob", 1.5], "--mask-prob"),
        (["--variant", "relu", "--noise-std", -0.1], "--noise-std"),
        (["--variant", "relu", "--expansion", 0], "--expansion"),
        (["--variant", "relu", "--layer", 7], "layer 7 is not in the store"),
    ]
    knob, takers = _foreign_knob("relu")
    cases.append((["--variant", "relu", f"--{knob.replace('_', '-')}", 1], f"taken by: {', '.join(takers)}"))
    for extra, message in cases:
        status, err = cli(*base, *extra)
        assert status == 2 and message in err and "Traceback" not in err, (extra, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variant,args,message", [
    ("vq", ["--codebook-size", 0], "codebook"), ("l1", ["--l1-coefficient", -1], "l1-coefficient"),
    ("linear", ["--d-sae", 64], "d_sae"), ("topk", ["--k", 0], "k"), ("topk", ["--k", 500], "k"),
    ("jumprelu", ["--bandwidth", 0], "bandwidth"), ("topk", ["--codebook-size", 64], "only to the variant vq"),
])
def test_nonsense_variant_values(store, tmp_path, variant, args, message):
    if variant not in variants.names():
        pytest.skip(f"{variant} not registered yet")
    status, err = cli("train", "--activations", store.path, "--variant", variant, "--out", tmp_path / "r",
                      *BASIC, *args)
    assert status == 2 and message in err.lower() and "Traceback" not in err, err


def test_store_problems(tmp_path):
    (tmp_path / "notastore").mkdir()
    status, err = cli("train", "--activations", tmp_path / "notastore", "--variant", "relu", "--out", tmp_path / "r")
    assert status == 2 and "not an activation store" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"d_model": 16, "layers": [0], "shards": [], "n_tokens": 0}))
    status, err = cli("train", "--activations", empty, "--variant", "relu", "--out", tmp_path / "r", *SMALL)
    assert status == 2 and "empty" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_non_empty_out_and_resume_mismatch(store, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep")
    status, err = cli("train", "--activations", store.path, "--variant", "relu", "--out", run, *SMALL)
    assert status == 2 and "not empty" in err and (run / "precious.txt").read_text() == "keep"
    run2 = tmp_path / "run2"
    assert cli("train", "--activations", store.path, "--variant", "relu", "--out", run2, *SMALL)[0] == 0
    status, err = cli("train", "--activations", store.path, "--variant", "l1", "--out", run2, *SMALL, "--resume")
    assert status == 2 and "trains variant relu, not l1" in err
    other = from_tensors(tmp_path / "other", synthetic(n=3000, d_in=8), layer=6)
    status, err = cli("train", "--activations", other.path, "--variant", "relu", "--out", run2, *SMALL, "--resume")
    assert status == 2 and "d_in is 16" in err


LONG = ["--tokens", 64 * 300, "--batch-size", 64, "--device", "cpu", "--expansion", 4, "--checkpoint-every", 10,
        "--keep-checkpoints", 2, "--eval-rows", 0, "--seed", 3]


def _spawn(store, run, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAE_DEBUG": "0"}
    return subprocess.Popen([sys.executable, "-m", "sae", "train", "--activations", str(store.path), "--variant",
                             "relu", "--out", str(run), *map(str, LONG), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(run, process, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []:
            return
        if process.poll() is not None:
            pytest.fail(f"training ended before its first checkpoint: {process.stderr.read()}")
        time.sleep(0.005)
    pytest.fail("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    process = _spawn(store, run)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return load_file(str(run / "sae.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_then_resume_matches_an_uninterrupted_run(store, tmp_path, reference):
    run = tmp_path / "run"
    process = _spawn(store, run)
    _wait_for_checkpoint(run, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    process = _spawn(store, run, "--resume")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert _same(load_file(str(run / "sae.safetensors")), reference)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(store, tmp_path, reference):
    run = tmp_path / "run"
    process = _spawn(store, run)
    _wait_for_checkpoint(run, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    step = int(err.split("interrupted at step ")[1].split("/")[0])
    assert step < 300 and (run / "checkpoints" / f"step_{step:06d}").is_dir()
    process = _spawn(store, run, "--resume")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert _same(load_file(str(run / "sae.safetensors")), reference)


def test_help_lists_every_variant_knob():
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["train", "--help"])
    for name in variants.names():
        for knob in variants.get(name).KNOBS:
            assert f"--{knob.replace('_', '-')}" in out.getvalue()


def test_wandb_is_optional(store, tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    status, err = cli("train", "--activations", store.path, "--variant", "relu", "--out", tmp_path / "r", *SMALL,
                      "--wandb", "proj")
    assert status == 2 and "needs the wandb package" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_the_sae_command_tunes_malloc_and_can_be_told_not_to(monkeypatch):
    import sys

    from sae.devices import keep_freed_memory
    monkeypatch.setenv("SAE_MALLOC_DEFAULTS", "1")
    assert keep_freed_memory() is False
    monkeypatch.delenv("SAE_MALLOC_DEFAULTS")
    if sys.platform.startswith("linux"):
        import subprocess   # in a child: the tuning is process-wide, and this test process keeps glibc's defaults
        code = "from sae.devices import keep_freed_memory; import sys; sys.exit(0 if keep_freed_memory() else 1)"
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0
