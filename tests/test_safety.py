"""Nothing a user does loses data: --force replaces only this tool's own output, never the input or a folder
holding anything else; a second writer into a folder is refused in one line naming the first; a lock left
by a killed process is recognised as stale. Every refused case leaves every input file byte-identical."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae.cli import main
from sae.files import LOCK, FolderLock
from sae.store import from_tensors
from tiny_variants import synthetic


def cli(*argv):
    """`sae ...` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, err.getvalue()


def digest(folder: Path) -> dict[str, str]:
    """Every file below `folder` (hidden ones included) -> its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """proj/store (an activation store) and proj/run (a trained and analysed run)."""
    root = tmp_path_factory.mktemp("proj")
    from_tensors(root / "store", synthetic(n=3000, d_in=16), layer=0, model="synthetic", site="resid_post")
    status, err = cli("train", "--activations", root / "store", "--variant", "topk", "--k", 4, "--d-sae", 32,
                      "--tokens", 2048, "--batch-size", 256, "--out", root / "run", "--device", "cpu")
    assert status == 0, err
    status, err = cli("analyze", "--run", root / "run", "--activations", root / "store", "--no-model")
    assert status == 0, err
    return root


def refused(project, argv, message):
    before = digest(project)
    status, err = cli(*argv)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert digest(project) == before                     # nothing lost, nothing changed


# each case: the command line (P = the project folder) and a piece of its one-line refusal
FORCE_CASES = [
    ("analyze into the store", ["analyze", "--run", "P/run", "--activations", "P/store", "--out", "P/store", "--force"],
     "holds this command's input"),
    ("analyze into the run", ["analyze", "--run", "P/run", "--activations", "P/store", "--out", "P/run", "--force"],
     "holds this command's input"),
    ("analyze into the project", ["analyze", "--run", "P/run", "--activations", "P/store", "--out", "P", "--force"],
     "holds this command's input"),
    ("export into the project", ["export", "P/run", "--format", "saelens", "P", "--force"], "holds this command's input"),
    ("export into the store", ["export", "P/run", "--format", "saelens", "P/store", "--force"], "holds other files"),
    ("export into the run", ["export", "P/run", "--format", "saelens", "P/run/analysis", "--force"], "outside the run"),
    ("train over the store", ["train", "--activations", "P/store", "--variant", "topk", "--out", "P/store", "--force",
                              "--tokens", 1024, "--batch-size", 256], "holds other files"),
    ("collect over the run", ["collect", "--model", "m", "--layers", 0, "--out", "P/run", "--force"], "holds other files"),
    ("analysis without --force", ["analyze", "--run", "P/run", "--activations", "P/store"], "already holds an analysis"),
]


@pytest.mark.parametrize("name, argv, message", FORCE_CASES, ids=[case[0] for case in FORCE_CASES])
def test_force_never_replaces_what_is_not_its_own(project, name, argv, message):
    argv = [str(a).replace("P", str(project), 1) if str(a).startswith("P") else a for a in argv]
    refused(project, argv, message)


def test_force_replaces_its_own_analysis(project, tmp_path):
    out = tmp_path / "analysis"
    for _ in range(2):
        status, err = cli("analyze", "--run", project / "run", "--activations", project / "store", "--no-model",
                          "--out", out, "--force")
        assert status == 0, err
    assert (out / "features.parquet").is_file()


def _hold_lock(folder: Path, command: str) -> subprocess.Popen:
    """Another process that takes the folder's lock and keeps it until killed."""
    code = (f"import sys, time; from sae.files import FolderLock\n"
            f"with FolderLock({str(folder)!r}, {command!r}):\n    print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("command", ["train", "collect"])
def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(project, tmp_path, command):
    out = tmp_path / "out"
    holder = _hold_lock(out, f"sae {command}")
    argv = (["train", "--activations", project / "store", "--variant", "topk", "--k", 4, "--d-sae", 32,
             "--tokens", 1024, "--batch-size", 256, "--out", out, "--device", "cpu"] if command == "train" else
            ["collect", "--model", tmp_path / "no_such_model", "--layers", 0, "--out", out])
    try:
        status, err = cli(*argv)
        assert status == 2 and f"process {holder.pid}" in err and "in use by sae" in err, err
        assert sorted(p.name for p in out.iterdir()) == [LOCK]       # the holder's folder untouched
    finally:
        holder.send_signal(signal.SIGKILL)                          # kill -9: the lock file stays behind
        holder.wait()
    assert (out / LOCK).is_file()
    status, err = cli(*argv)                                        # a dead process's lock is stale
    if command == "train":
        assert status == 0, err
        assert (out / "sae.safetensors").is_file() and not (out / LOCK).exists()
    else:                                                           # got past the lock, to the model
        assert status == 2 and "in use" not in err and "no_such_model" in err, err


def test_the_lock_is_exclusive_between_processes(tmp_path):
    holder = _hold_lock(tmp_path, "sae analyze")
    try:
        from sae.errors import UserError
        with pytest.raises(UserError, match=f"process {holder.pid}"):
            with FolderLock(tmp_path, "sae train"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path, "sae train") as lock:       # taken over once its holder is gone
        assert lock.held and (tmp_path / LOCK).is_file()
    assert not (tmp_path / LOCK).exists()
    time.sleep(0)


@pytest.mark.parametrize("changed", [["--tokens", 1024], ["--lr", 0.01], ["--batch-size", 128], ["--expansion", 4]])
def test_resume_with_other_settings_is_refused_not_ignored(project, tmp_path, changed):
    run = tmp_path / "run"
    base = ["train", "--activations", project / "store", "--variant", "topk", "--k", 4, "--tokens", 2048,
            "--batch-size", 256, "--out", run, "--device", "cpu", "--checkpoint-every", 4]
    status, err = cli(*base)
    assert status == 0, err
    before = digest(run)
    status, err = cli(*base, "--resume", *changed)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "cannot resume" in err, err
    assert changed[0] in err
    assert digest(run) == before
    status, err = cli(*base, "--resume")              # the same command resumes (here: nothing left to do)
    assert status == 0, err


def test_derived_results_record_their_weights_and_stale_ones_are_refused(project, tmp_path):
    """eval.json and analysis/meta.json record the digest of the weights they came from (checked against
    an independent sha256 of the file); after the weights change, the exports that publish the analysis
    refuse it in one line instead of publishing a stale one."""
    import shutil

    import sae
    from sae.runs import save_run
    run = tmp_path / "run"
    shutil.copytree(project / "run", run)
    status, err = cli("eval", "--run", run, "--activations", project / "store", "--no-model")
    assert status == 0, err
    status, err = cli("analyze", "--run", run, "--activations", project / "store", "--no-model", "--force")
    assert status == 0, err
    expected = hashlib.sha256((run / "sae.safetensors").read_bytes()).hexdigest()[:16]
    eval_json = json.loads((run / "eval.json").read_text())
    meta = json.loads((run / "analysis" / "meta.json").read_text())
    assert eval_json["weights_digest"] == meta["weights_digest"] == expected
    status, err = cli("export", run, "--format", "html", tmp_path / "html")
    assert status == 0, err
    model = sae.load(run)                                  # "retrain": other weights in the same run folder
    with torch.no_grad():
        model.W_dec.mul_(2.0)
    save_run(model, run, {k: v for k, v in model.run_config.items() if k not in ("version", "git_commit")})
    for fmt in ("html", "saelens"):
        status, err = cli("export", run, "--format", fmt, tmp_path / f"stale_{fmt}")
        assert status == 2 and "other weights" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"stale_{fmt}").exists()


# ---- files we wrote, damaged: one line, for every command that reads them --------------------------------
def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_header(path: Path):
    data = bytearray(path.read_bytes())
    data[8:24] = b"\xff" * 16
    path.write_bytes(bytes(data))


def _edit_json(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


STORE_DAMAGE = {
    "truncated shard": lambda s: _truncate(s / "shard_00000.safetensors"),
    "bad shard header": lambda s: _flip_header(s / "shard_00000.safetensors"),
    "deleted shard": lambda s: (s / "shard_00000.safetensors").unlink(),
    "wrong d_model": lambda s: _edit_json(s / "manifest.json", lambda m: m.update(d_model=17)),
    "n_tokens disagrees": lambda s: _edit_json(s / "manifest.json", lambda m: m.update(n_tokens=5)),
    "manifest cut short": lambda s: (s / "manifest.json").write_text('{"layers": [0], "d_mo'),
    "manifest lacks keys": lambda s: _edit_json(s / "manifest.json", lambda m: m.pop("d_model")),
}
RUN_DAMAGE = {
    "config lacks d_in": lambda r: _edit_json(r / "config.json", lambda c: c.pop("d_in")),
    "config with a wrong d_in": lambda r: _edit_json(r / "config.json", lambda c: c.update(d_in=8)),
    "config with a bad width": lambda r: _edit_json(r / "config.json", lambda c: c.update(d_sae="wide")),
    "weights truncated": lambda r: _truncate(r / "sae.safetensors"),
    "weights header damaged": lambda r: _flip_header(r / "sae.safetensors"),
    "weights of another shape": lambda r: _swap_weights(r),
}


def _swap_weights(run: Path):
    from sae import variants
    from sae.runs import save_weights
    save_weights(variants.create("topk", d_in=16, d_sae=8, k=2), run / "sae.safetensors")


@pytest.fixture
def damaged_copy(project, tmp_path):
    import shutil

    def make(kind: str, damage) -> Path:
        copy = tmp_path / f"copy{len(list(tmp_path.glob('copy*')))}"
        shutil.copytree(project, copy)
        damage(copy / kind)
        return copy
    return make


@pytest.mark.parametrize("case", list(STORE_DAMAGE))
@pytest.mark.parametrize("command", ["train", "eval", "analyze"])
def test_a_damaged_store_is_one_line(damaged_copy, case, command):
    copy = damaged_copy("store", STORE_DAMAGE[case])
    argv = {"train": ["train", "--activations", copy / "store", "--variant", "topk", "--out", copy / "new",
                      "--tokens", 1024, "--batch-size", 256],
            "eval": ["eval", "--run", copy / "run", "--activations", copy / "store", "--no-model"],
            "analyze": ["analyze", "--run", copy / "run", "--activations", copy / "store", "--no-model", "--force",
                        "--out", copy / "new_analysis"]}[command]
    refused(copy, argv, "")


@pytest.mark.parametrize("case", list(RUN_DAMAGE))
@pytest.mark.parametrize("command", ["eval", "analyze", "export"])
def test_a_damaged_run_is_one_line(damaged_copy, case, command):
    copy = damaged_copy("run", RUN_DAMAGE[case])
    argv = {"eval": ["eval", "--run", copy / "run", "--activations", copy / "store", "--no-model"],
            "analyze": ["analyze", "--run", copy / "run", "--activations", copy / "store", "--no-model",
                        "--out", copy / "new_analysis"],
            "export": ["export", copy / "run", "--format", "saelens", copy / "exported"]}[command]
    refused(copy, argv, "")


def test_nan_and_oversized_inputs_are_refused_before_any_work(tmp_path):
    from sae.errors import UserError
    x = synthetic(n=512, d_in=16)
    x[7, 3] = float("nan")
    with pytest.raises(UserError, match="NaN or Inf in 1 of 512 rows"):
        from_tensors(tmp_path / "nan_store", x)
    assert not (tmp_path / "nan_store").exists() or not any((tmp_path / "nan_store").iterdir())
    from_tensors(tmp_path / "store", synthetic(n=2048, d_in=16), layer=0)
    base = ["train", "--activations", tmp_path / "store", "--out", tmp_path / "run", "--tokens", 1024,
            "--batch-size", 256]
    for extra, message in ((["--variant", "l1", "--l1-coefficient", "nan"], "finite"),
                           (["--variant", "relu", "--grad-clip", "nan"], "--grad-clip must be positive"),
                           (["--variant", "topk", "--d-sae", int(2e12)], "more than this machine's")):
        status, err = cli(*base, *extra)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "run").exists()


def test_resume_skips_a_damaged_checkpoint_and_refuses_nan_weights(project, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from sae.train.checkpoint import list_checkpoints
    run = tmp_path / "run"
    base = ["train", "--activations", project / "store", "--variant", "topk", "--k", 4, "--tokens", 2048,
            "--batch-size", 256, "--out", run, "--checkpoint-every", 2, "--keep-checkpoints", 0, "--device", "cpu"]
    status, err = cli(*base)
    assert status == 0, err
    steps = list_checkpoints(run)
    newest = steps[-1][1]
    _truncate(newest / "sae.safetensors")
    status, err = cli(*base, "--resume")
    assert status == 0 and f"checkpoint {newest.name} is damaged" in err, err   # the one before is used
    weights = load_file(str(steps[-2][1] / "sae.safetensors"))
    weights["W_dec"][0, 0] = float("nan")
    save_file(weights, str(steps[-2][1] / "sae.safetensors"))
    for _, path in steps[:-2] + steps[-1:]:
        import shutil
        shutil.rmtree(path)
    status, err = cli(*base, "--resume")
    assert status == 2 and "NaN or Inf" in err and len(err.strip().splitlines()) == 1, err


def test_unfinished_runs_and_stores_are_refused_unless_allowed(damaged_copy):
    """What kill -9 leaves (config.json's training.complete false; a manifest with complete false) is refused
    in one line naming --resume; --allow-incomplete lets it through with a warning."""
    copy = damaged_copy("run", lambda r: _edit_json(r / "config.json", lambda c: c["training"].update(complete=False)))
    cases = [["eval", "--run", copy / "run", "--activations", copy / "store", "--no-model"],
             ["analyze", "--run", copy / "run", "--activations", copy / "store", "--no-model", "--out", copy / "a"],
             ["export", copy / "run", "--format", "sparsify", copy / "exported"]]
    for argv in cases:
        refused(copy, argv, "--resume")
        status, err = cli(*argv, "--allow-incomplete")
        assert status == 0 and "warning: " in err and "unfinished" in err, err
    store_copy = damaged_copy("store", lambda s: _edit_json(s / "manifest.json", lambda m: m.update(complete=False)))
    train = ["train", "--activations", store_copy / "store", "--variant", "topk", "--out", store_copy / "new",
             "--tokens", 1024, "--batch-size", 256]
    refused(store_copy, train, "sae collect ... --resume")
    refused(store_copy, ["eval", "--run", store_copy / "run", "--activations", store_copy / "store", "--no-model"],
            "unfinished")
    status, err = cli(*train, "--allow-incomplete")
    assert status == 0 and "warning: the store" in err, err


def test_limits_and_leftovers(project, tmp_path, tiny_llama_dir):
    from sae.files import remove_stale_temporaries
    corpus = tmp_path / "docs.txt"
    corpus.write_text("the cat sat on the mat. " * 50)
    store, run = project / "store", project / "run"
    for argv, message in (
            (["collect", "--model", tiny_llama_dir, "--dataset", corpus, "--layers", 0, "--context-size", 100000,
              "--out", tmp_path / "long"], "more than"),
            (["eval", "--run", run, "--activations", store, "--batch-rows", 0], "--batch-size"),
            (["eval", "--run", run, "--activations", store, "--probe-rows", -5], "--probe-rows"),
            (["collect", "--model", tiny_llama_dir, "--layers", 0, "--shard-tokens", 0, "--out", tmp_path / "s"],
             "--shard-tokens"),
            (["train", "--activations", store, "--variant", "topk", "--out", tmp_path / "r", "--resume", "--force"],
             "contradict"),
            (["dashboard", store / "manifest.json"], "is a file")):
        refused(project, argv, message)
    assert not (tmp_path / "long").exists()
    # leftovers of a killed process go; a live writer's stay
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".analysis.tmp{dead.pid}").mkdir()
    (tmp_path / f".sae.safetensors.tmp{dead.pid}").write_bytes(b"half")
    alive = tmp_path / ".other.tmp1"
    alive.write_bytes(b"mine")                                   # pid 1 (init) is alive
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.glob(".*")) == [alive.name]


def test_pickled_model_weights_need_an_explicit_opt_in(tiny_llama_dir, tmp_path):
    """A model folder holding only pytorch_model.bin is refused (a pickle can run code) unless the user says
    --trust-pickled-weights; the folder's safetensors twin loads as before."""
    import shutil

    from safetensors.torch import load_file
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, folder)
    for weights in folder.glob("*.safetensors"):
        torch.save(load_file(str(weights)), folder / "pytorch_model.bin")
        weights.unlink()
    corpus = tmp_path / "docs.txt"
    corpus.write_text("the cat sat on the mat. " * 50)
    argv = ["collect", "--model", folder, "--dataset", corpus, "--layers", 0, "--context-size", 16, "--tokens", 64,
            "--out", tmp_path / "store"]
    status, err = cli(*argv)
    assert status == 2 and "pickled weights" in err and "--trust-pickled-weights" in err, err
    assert not (tmp_path / "store").exists()
    status, err = cli(*argv, "--trust-pickled-weights")
    assert status == 0, err


def test_garbage_inside_a_shard_is_named_not_analysed(damaged_copy):
    """0xff bytes inside a shard's data (its header intact) read as NaN: eval and analyze say so in one line."""
    def garbage(store: Path):
        shard = store / "shard_00000.safetensors"
        data = bytearray(shard.read_bytes())
        size = int.from_bytes(data[:8], "little")
        begin, end = json.loads(data[8:8 + size])["activations.0"]["data_offsets"]
        for at in range(8 + size + begin, 8 + size + end - 4096, 16384):   # 4 KB of 0xff every 16 KB
            data[at:at + 4096] = b"\xff" * 4096
        shard.write_bytes(bytes(data))
    copy = damaged_copy("store", garbage)
    refused(copy, ["eval", "--run", copy / "run", "--activations", copy / "store", "--no-model"], "NaN or Inf")
    refused(copy, ["analyze", "--run", copy / "run", "--activations", copy / "store", "--no-model", "--force"],
            "NaN or Inf")
    refused(copy, ["train", "--activations", copy / "store", "--variant", "topk", "--out", copy / "new", "--tokens",
                   1024, "--batch-size", 256], "NaN or Inf")


def test_analyze_without_the_model_never_reaches_for_the_network(tmp_path, monkeypatch):
    """A store naming a hub model that is not cached: `analyze --no-model` shows token ids and opens no
    connection (no retries against an unreachable hub)."""
    import socket
    store, run = tmp_path / "store", tmp_path / "run"
    x = synthetic(n=2048, d_in=16)
    from_tensors(store, x, layer=0, model="no-such-org/no-such-model", site="resid_post",
                 token_ids=torch.randint(0, 50, (2048,), dtype=torch.int32))
    status, err = cli("train", "--activations", store, "--variant", "topk", "--k", 4, "--d-sae", 32, "--tokens",
                      1024, "--batch-size", 256, "--out", run, "--device", "cpu")
    assert status == 0, err
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    status, err = cli("analyze", "--run", run, "--activations", store, "--no-model")
    assert status == 0, err
    assert attempts == [] and "Retrying" not in err
