"""--log wandb|tensorboard|none on every training path (store, live, sweep), with the REAL libraries:
wandb in offline mode (its .wandb transaction log read back record by record) and tensorboard's event
files read back with tensorboard's own EventAccumulator. Each logged figure is checked against the run's
own metrics.jsonl / train_summary.json / eval.json; the run is closed with the right exit code on success,
on an error and on Ctrl-C."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from sae.cli import main
from sae.store import from_tensors
from tiny_variants import synthetic

wandb = pytest.importorskip("wandb")
pytest.importorskip("tensorboard")

SMALL = ["--tokens", "2048", "--batch-size", "128", "--log-every", "4", "--eval-rows", "256", "--device", "cpu"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return from_tensors(tmp_path_factory.mktemp("log") / "store", synthetic(n=4000, d_in=16), layer=3,
                        model="synthetic", site="resid_post")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """wandb offline, into one folder for the module (wandb keeps its first settings for the process);
    each test's runs have names of their own."""
    folder = tmp_path_factory.mktemp("wandb_dir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_DIR", str(folder))
        patch.setenv("WANDB_SILENT", "true")
        yield folder


def cli(*argv):
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        main([str(a) for a in argv])
    return done.value.code, err.getvalue()


def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log: 7-byte header, 32 KiB
    blocks, each chunk crc32c(4) length(2) type(1); types FULL 1, FIRST 2, MIDDLE 3, LAST 4)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb_runs(folder: Path, names=()) -> dict:
    """{display name: {"group", "history": [..], "summary": {..}, "exit": code}} of every offline run, once
    the runs `names` are all there with their exit record (wandb's service may still be writing the file)."""
    import time
    deadline = time.monotonic() + 30
    while True:
        runs = _read_wandb_runs(folder)
        if all(runs.get(name, {}).get("exit") is not None for name in names) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def _read_wandb_runs(folder: Path) -> dict:
    runs = {}
    for path in folder.glob("wandb/offline-run-*/run-*.wandb"):
        run = {"history": [], "summary": {}, "exit": None, "group": None}
        name = None
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                name, run["group"] = record.run.display_name, record.run.run_group
            elif kind == "history":
                run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                       for item in record.history.item})
            elif kind == "summary":
                run["summary"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                       for item in record.summary.update})
            elif kind == "exit":
                run["exit"] = record.exit.exit_code
        runs[name] = run
    return runs


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_store_training_logs_every_metrics_line_and_the_final_eval_to_wandb(store, tmp_path, offline):
    run = tmp_path / "run"
    status, err = cli("train", "--activations", store.path, "--variant", "topk", "--k", "4", "--d-sae", "32",
                      "--out", run, *SMALL, "--log", "wandb", "--log-project", "tests")
    assert status == 0, err
    logged = read_wandb_runs(offline, ["run"])["run"]
    expected = metrics_lines(run)
    assert [h["step"] for h in logged["history"]] == [m["step"] for m in expected] == [4, 8, 12, 16]
    for got, want in zip(logged["history"], expected):
        assert got["fvu"] == pytest.approx(want["fvu"]) and got["loss"] == pytest.approx(want["loss"])
    held = json.loads((run / "train_summary.json").read_text())["held_out"]
    assert logged["summary"]["eval/fvu"] == pytest.approx(held["fvu"])
    assert logged["summary"]["eval/l0"] == pytest.approx(held["l0"])
    assert logged["exit"] == 0


def test_the_old_wandb_flag_still_works_with_a_notice(store, tmp_path, offline):
    status, err = cli("train", "--activations", store.path, "--variant", "relu", "--d-sae", "32",
                      "--out", tmp_path / "old", *SMALL, "--wandb", "proj")
    assert status == 0 and "notice: --wandb proj is now spelt --log wandb --log-project proj" in err
    assert read_wandb_runs(offline, ["old"])["old"]["exit"] == 0


def test_a_failing_or_interrupted_run_is_closed_with_its_exit_code(tmp_path, offline):
    from sae.train import loggers
    for name, error, code in (("failed", RuntimeError("boom"), 1), ("stopped", KeyboardInterrupt(), 130)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        with pytest.raises(type(error)):
            with loggers.session("wandb", group=run_dir):
                loggers.log_metrics(run_dir, {"step": 1, "loss": 2.5})
                raise error
        assert not loggers._ACTIVE
        logged = read_wandb_runs(offline, [name])[name]
        assert logged["history"][0]["loss"] == 2.5 and logged["exit"] == code


def event_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_a_sweep_logs_each_sae_as_its_own_tensorboard_run(store, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("- {variant: topk, k: 4, d_sae: 32}\n- {variant: relu, d_sae: 24, lr: 0.001}\n")
    out = tmp_path / "sweep"
    status, err = cli("sweep", "--activations", store.path, "--out", out, "--grid", grid, "--tokens", "1024",
                      "--batch-size", "128", "--no-model", "--device", "cpu", "--log", "tensorboard")
    assert status == 0, err
    for name in ("topk_k4_d32", "relu_d24_lr0.001"):
        scalars = event_scalars(out / name)
        expected = metrics_lines(out / name)
        assert [step for step, _ in scalars["train/fvu"]] == [m["step"] for m in expected]
        assert [v for _, v in scalars["train/fvu"]] == pytest.approx([m["fvu"] for m in expected], rel=1e-6)
        assert scalars["eval/fvu"][0][1] == pytest.approx(json.loads((out / name / "eval.json").read_text())["fvu"])
    assert json.loads((out / "relu_d24_lr0.001" / "config.json").read_text())["training"]["lr"] == 0.001


def test_live_training_logs_one_run_per_layer(tiny_llama_dir, tmp_path, offline):
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(f"document {i}: " + "the quick brown fox jumps. " * (3 + i % 5) for i in range(80)))
    out = tmp_path / "live"
    status, err = cli("train", "--model", tiny_llama_dir, "--dataset", text, "--layers", "1,2", "--variant", "relu",
                      "--d-sae", "32", "--tokens", "1024", "--batch-size", "128", "--context-size", "32",
                      "--buffer-size", "1MB", "--log-every", "2", "--eval-rows", "64", "--device", "cpu",
                      "--out", out, "--log", "wandb")
    assert status == 0, err
    runs = read_wandb_runs(offline, ["live/layer_1", "live/layer_2"])
    assert {"live/layer_1", "live/layer_2"} <= set(runs) and "live" not in runs
    for layer in (1, 2):
        logged = runs[f"live/layer_{layer}"]
        assert logged["group"] == str(out) and logged["exit"] == 0
        expected = metrics_lines(out / f"layer_{layer}")
        assert [h["fvu"] for h in logged["history"]] == pytest.approx([m["fvu"] for m in expected])
        held = json.loads((out / f"layer_{layer}" / "train_summary.json").read_text())["held_out"]
        assert logged["summary"]["eval/fvu"] == pytest.approx(held["fvu"])


def test_log_wandb_without_wandb_says_how_to_install_it(store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)      # as if it were not installed: `import wandb` fails
    status, err = cli("train", "--activations", store.path, "--variant", "relu", "--out", tmp_path / "r", *SMALL,
                      "--log", "wandb")
    assert status == 2 and err.strip() == "error: --log wandb needs the wandb package: pip install wandb"
    assert not (tmp_path / "r").exists()
    status, err = cli("train", "--activations", store.path, "--variant", "relu", "--out", tmp_path / "r", *SMALL,
                      "--log", "mlflow")
    assert status == 2 and "unknown logger; use one of: none, wandb, tensorboard" in err


def test_ctrl_c_closes_the_logged_run_as_interrupted(store, tmp_path):
    """`sae train` in its own process (the console entry, which ends with os._exit), SIGINT mid-run: the
    TensorBoard run is closed and says so, and the metrics logged before the interruption are all there."""
    import signal
    import subprocess
    import time
    run = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "sae", "train", "--activations", str(store.path), "--variant", "relu", "--d-sae", "32",
         "--tokens", str(128 * 100_000), "--batch-size", "128", "--log-every", "1", "--device", "cpu",
         "--out", str(run), "--log", "tensorboard"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    status = [event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors("status/text_summary")]
    assert status == ["interrupted"]
    logged = [step for step, _ in event_scalars(run)["train/loss"]]
    assert logged == [m["step"] for m in metrics_lines(run)]
