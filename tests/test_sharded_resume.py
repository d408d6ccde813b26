"""`--shard-latents` checkpoints and --resume (sae.train.sharded_checkpoint), two gloo ranks on the CPU: a run killed
with SIGKILL after a checkpoint resumes to the weights of an uninterrupted run; another world size is refused in one
line and leaves every file of the run as it was."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
D_IN, D_SAE, K, BATCH, STEPS, EVERY = 16, 40, 4, 32, 200, 10

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(store: Path, out: Path) -> list[str]:
    # dead after two batches: AuxK and the dead-latent counters take part in what is resumed
    return ["-m", "sae", "train", "--activations", str(store), "--out", str(out), "--shard-latents",
            "--variant", "topk", "--k", str(K), "--d-sae", str(D_SAE), "--batch-size", str(BATCH),
            "--tokens", str(STEPS * BATCH), "--lr", "3e-3", "--device", "cpu", "--seed", "4",
            "--dead-after-tokens", str(2 * BATCH), "--checkpoint-every", str(EVERY), "--keep-checkpoints", "0"]


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), *args]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each worker in its own session, so no process group holds
    them all)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden ones too) -> sha256, and every folder -> 'dir'."""
    return {str(path.relative_to(folder)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(store, uninterrupted run, a run killed with SIGKILL after its first checkpoint)."""
    from sae.store import from_tensors
    root = tmp_path_factory.mktemp("sharded_resume")
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3000, D_IN, generator=generator) @ torch.randn(D_IN, D_IN, generator=generator)
    store = from_tensors(root / "store", x).path
    whole, killed = root / "whole", root / "killed"
    done = subprocess.run(torchrun_command(2, train_args(store, whole)), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    first = killed / "checkpoints" / f"sharded_step_{EVERY:06d}" / "complete.json"
    with open(root / "killed.log", "w") as log:
        launcher = subprocess.Popen(torchrun_command(2, train_args(store, killed)), cwd=ROOT, env=ENV,
                                    stdout=log, stderr=log)
        deadline = time.monotonic() + 240
        while not first.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        for pid in [*descendants(launcher.pid), launcher.pid]:   # kill -9, the workers first
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait(timeout=60)
    assert first.exists(), (root / "killed.log").read_text()[-3000:]
    assert launcher.returncode == -signal.SIGKILL
    assert not (killed / "config.json").exists(), "killed before it finished"
    return store, whole, killed


def test_uninterrupted_run_checkpoints_each_rank_and_world_size(runs):
    from sae.train import sharded_checkpoint
    _, whole, _ = runs
    complete = sharded_checkpoint.list_complete(whole)
    assert [step for step, _ in complete] == list(range(EVERY, STEPS + 1, EVERY))
    marker = json.loads((complete[-1][1] / "complete.json").read_text())
    assert marker["world_size"] == 2 and marker["step"] == STEPS
    assert marker["slices"] == [[0, D_SAE // 2], [D_SAE // 2, D_SAE]]
    # the last checkpoint's two slices are the assembled SAE's rows
    final = load_file(str(whole / "sae.safetensors"))
    parts = [load_file(str(complete[-1][1] / f"rank_{rank:05d}.safetensors")) for rank in range(2)]
    assert torch.equal(torch.cat([part["model.W_dec"] for part in parts]), final["W_dec"])
    assert torch.equal(torch.cat([part["model.W_enc"] for part in parts], dim=1), final["W_enc"])
    assert all(torch.equal(part["model.b_dec"], final["b_dec"]) for part in parts)
    assert {"optim.0.exp_avg", "optim.0.exp_avg_sq", "optim.0.step", "tokens_since_fired"} <= set(parts[0])


def test_another_world_size_is_refused_and_nothing_changes(runs, capsys):
    from sae.cli import main
    store, _, killed = runs
    before = tree_hashes(killed)
    three = subprocess.run(torchrun_command(3, [*train_args(store, killed), "--resume"]), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert three.returncode != 0
    assert "was written by 2 ranks, this launch has 3" in three.stderr
    assert "Traceback" not in three.stderr.split("error:")[0]
    assert tree_hashes(killed) == before
    # one process (no torchrun): the same refusal, one line, exit status 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*train_args(store, killed)[2:], "--resume"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot resume") and "2 ranks, this launch has 1" in lines[0]
    # an unsharded --resume of a sharded run is refused too
    args = [a for a in train_args(store, killed)[2:] if a != "--shard-latents"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--resume"])
    assert exit_info.value.code == 2 and "it is a --shard-latents run" in capsys.readouterr().err
    assert tree_hashes(killed) == before


def test_killed_run_resumes_to_the_uninterrupted_weights(runs):
    from sae.train import sharded_checkpoint
    store, whole, killed = runs
    complete = sharded_checkpoint.list_complete(killed)
    resumed_step, resumed_from = complete[-1]
    assert 0 < resumed_step < STEPS
    print(f"killed after checkpoint {resumed_step} of {STEPS} steps")
    kept = {path: os.stat(path) for path in resumed_from.iterdir()}
    # what a kill in the middle of the next checkpoint leaves: a part and a temporary file, no marker
    half = sharded_checkpoint.step_dir(killed, resumed_step + EVERY)
    half.mkdir(exist_ok=True)
    (half / "rank_00000.safetensors").write_bytes(b"half a file")
    (half / ".rank_00001.safetensors.tmp999999999").write_bytes(b"half a file")
    assert sharded_checkpoint.latest(killed) == resumed_from

    again = subprocess.run(torchrun_command(2, [*train_args(store, killed), "--resume"]), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    # it continued from the checkpoint (never rewrote it) rather than starting afresh
    assert {path: (stat.st_ino, stat.st_mtime_ns) for path, stat in kept.items()} == \
           {path: (os.stat(path).st_ino, os.stat(path).st_mtime_ns) for path in kept}
    assert [step for step, _ in sharded_checkpoint.list_complete(killed)] == list(range(EVERY, STEPS + 1, EVERY))
    assert not (half / "rank_00000.safetensors").read_bytes().startswith(b"half")
    a, b = load_file(str(whole / "sae.safetensors")), load_file(str(killed / "sae.safetensors"))
    assert a.keys() == b.keys()
    differences = {name: float((a[name].double() - b[name].double()).abs().max()) for name in a}
    print(f"max |resumed - uninterrupted| per tensor: {differences}")
    for name in a:
        assert torch.equal(a[name], b[name]), (name, differences[name])   # bitwise
    # metrics.jsonl: the lines after the checkpoint were dropped and logged again, once each, identically
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert lines == reference


def test_listing_needs_the_marker_and_every_rank_part(tmp_path):
    """No processes: a checkpoint counts only with its marker and each rank's two files; resuming keeps the newest
    complete one, drops the others and the metrics logged after it."""
    from sae.errors import UserError
    from sae.train import sharded_checkpoint

    def fake(step: int, world: int, ranks: range, marker: bool = True) -> Path:
        folder = sharded_checkpoint.step_dir(tmp_path, step)
        folder.mkdir(parents=True)
        for rank in ranks:
            for path in sharded_checkpoint.rank_files(folder, rank):
                path.write_text("{}")
        if marker:
            (folder / "complete.json").write_text(json.dumps({"step": step, "world_size": world, "config": {}}))
        return folder

    whole = fake(10, 2, range(2))
    fake(20, 2, range(1))                 # rank 1's part is missing
    fake(30, 2, range(2), marker=False)   # killed before the marker
    assert sharded_checkpoint.list_complete(tmp_path) == [(10, whole)]
    assert sharded_checkpoint.find_resumable(tmp_path, 2) == whole
    with pytest.raises(UserError, match="written by 2 ranks, this launch has 4"):
        sharded_checkpoint.find_resumable(tmp_path, 4)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 10, 15, 20)))
    sharded_checkpoint.prepare_resume(tmp_path, whole)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["sharded_step_000010"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [5, 10]
