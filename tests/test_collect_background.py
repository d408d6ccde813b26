"""sae collect's background shard writer and --batch-tokens: the same store as synchronous writes, the
model running while a shard is written, a failed write as one line (then --resume completes the store),
Ctrl-C while a shard is written, and batches sized in tokens."""
import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import sae.store as store_lib
from sae.collect import CollectOptions, collect
from sae.collect.shard_writer import ShardWriter
from sae.errors import UserError
from sae.store import ActivationStore
from test_collect import columns  # every column of a store, in store order

N_DOCS = 48
CONTEXT = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import write_labelled_corpus
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home", "quickly"]
    return write_labelled_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", words, N_DOCS, (4, 16), seed=1)


@pytest.fixture(scope="module")
def llama():
    from conftest import build_tiny_lm
    return build_tiny_lm("llama")


def run(loaded, out, corpus, **kw):
    kw.setdefault("layers", [0, 2])
    kw.setdefault("site", "resid_post")
    kw.setdefault("context_size", CONTEXT)
    kw.setdefault("shard_tokens", 60)
    if "batch_tokens" not in kw:
        kw.setdefault("batch_size", 3)
    options = CollectOptions(model=loaded.name, dataset=str(corpus), out=Path(out), progress=False, **kw)
    return collect(options, loaded=loaded)


def shard_contents(path) -> dict:
    """name -> (metadata, {tensor name: tensor}) for every shard, in the manifest's order (the store's order).
    (Not the files' bytes: safetensors writes its header's metadata keys in no fixed order.)"""
    from safetensors import safe_open
    contents = {}
    for name in ActivationStore(path).manifest["shards"]:
        with safe_open(str(Path(path) / name), framework="pt") as handle:
            contents[name] = (handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()})
    return contents


def assert_same_store(a, b):
    """Same shards (names and order, metadata, every tensor's dtype and values), same index lines, same columns."""
    shards_a, shards_b = shard_contents(a), shard_contents(b)
    assert list(shards_a) == list(shards_b)
    for name, (metadata, tensors) in shards_a.items():
        assert metadata == shards_b[name][0] and tensors.keys() == shards_b[name][1].keys(), name
        for key, tensor in tensors.items():
            other = shards_b[name][1][key]
            assert tensor.dtype == other.dtype and torch.equal(tensor, other), (name, key)
    assert (Path(a) / "index.jsonl").read_text() == (Path(b) / "index.jsonl").read_text()
    ca, cb = columns(a), columns(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        assert torch.equal(ca[name], cb[name]), name


def leftovers(path) -> list:
    return sorted(p.name for p in Path(path).iterdir() if ".tmp" in p.name)


def count_submits(monkeypatch) -> list:
    """The shards handed to the writer so far (counted in the model's thread, as they are submitted)."""
    submitted, real_submit = [], ShardWriter.submit

    def submit(self, job):
        real_submit(self, job)
        submitted.append(job[1])
    monkeypatch.setattr(ShardWriter, "submit", submit)
    return submitted


def test_background_writes_equal_synchronous_writes_and_overlap_the_model(llama, corpus, tmp_path, monkeypatch):
    real_write = store_lib.write_shard
    writers = []                             # the thread each shard was written in
    submitted = count_submits(monkeypatch)
    forward_after_a_submit = threading.Event()

    def forward_started(module, args):
        if submitted:                        # a shard has been handed over: this forward runs beside its write
            forward_after_a_submit.set()

    def write_shard(path, tensors, metadata=None):
        writers.append(threading.current_thread().name)
        if len(writers) == 1 and ShardWriter.THREADED:
            # the first shard is held until the model has run again: only a background write allows that
            assert forward_after_a_submit.wait(timeout=30), "the model did not run while a shard was written"
        real_write(path, tensors, metadata)

    monkeypatch.setattr(store_lib, "write_shard", write_shard)
    hook = llama.model.model.layers[0].register_forward_pre_hook(forward_started)
    try:
        monkeypatch.setattr(ShardWriter, "THREADED", False)
        sync = run(llama, tmp_path / "sync", corpus)
        sync_writers, writers[:] = list(writers), []
        monkeypatch.setattr(ShardWriter, "THREADED", True)
        threaded = run(llama, tmp_path / "threaded", corpus)
    finally:
        hook.remove()
    assert set(sync_writers) == {threading.main_thread().name}
    assert set(writers) == {"sae-shard-writer"} and len(writers) == threaded.n_shards >= 4
    assert forward_after_a_submit.is_set()
    assert_same_store(tmp_path / "sync", tmp_path / "threaded")
    assert sync.n_tokens == threaded.n_tokens == len(ActivationStore(tmp_path / "threaded"))
    assert ActivationStore(tmp_path / "threaded").manifest["complete"] is True
    assert not leftovers(tmp_path / "threaded")
    assert not any(t.name == "sae-shard-writer" and t.is_alive() for t in threading.enumerate())


def test_a_failed_shard_write_is_one_line_and_resume_completes_the_store(tiny_llama_dir, corpus, tmp_path,
                                                                        monkeypatch, capsys):
    from sae.cli import main
    args = ["collect", "--model", str(tiny_llama_dir), "--dataset", str(corpus), "--context-size", str(CONTEXT),
            "--layers", "0,2", "--batch-windows", "3", "--shard-tokens", "60", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--out", str(tmp_path / "straight")])
    assert exit_info.value.code == 0
    real_write = store_lib.write_shard
    calls = []

    def failing_write(path, tensors, metadata=None):
        calls.append(Path(path).name)
        if len(calls) == 2:              # half a file under the temporary name, then the disk is full
            (Path(path).parent / f".{Path(path).name}.tmp{os.getpid()}").write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, tensors, metadata)

    monkeypatch.setattr(store_lib, "write_shard", failing_write)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--out", str(tmp_path / "failed")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2
    assert lines == [f"error: cannot write shard_00001.safetensors to {tmp_path / 'failed'}: "
                     f"No space left on device"]
    assert calls == ["shard_00000.safetensors", "shard_00001.safetensors"]   # nothing written after the error
    # the first shard is recorded and intact; the second left nothing behind
    failed, straight = tmp_path / "failed", tmp_path / "straight"
    index_lines = (failed / "index.jsonl").read_text().splitlines()
    assert index_lines == (straight / "index.jsonl").read_text().splitlines()[:1]
    assert sorted(p.name for p in failed.iterdir() if p.name.startswith("shard")) == ["shard_00000.safetensors"]
    first = shard_contents(straight)["shard_00000.safetensors"]
    from safetensors.torch import load_file
    kept = load_file(str(failed / "shard_00000.safetensors"))
    assert kept.keys() == first[1].keys() and all(torch.equal(kept[k], first[1][k]) for k in kept)
    assert not leftovers(failed)
    assert ActivationStore(failed).manifest["complete"] is False
    monkeypatch.setattr(store_lib, "write_shard", real_write)
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--out", str(failed), "--resume"])
    assert exit_info.value.code == 0
    assert_same_store(straight, failed)
    assert ActivationStore(failed).manifest["complete"] is True


def test_ctrl_c_while_a_shard_is_written_keeps_it_recorded(llama, corpus, tmp_path, monkeypatch):
    straight = run(llama, tmp_path / "straight", corpus)
    real_write = store_lib.write_shard
    submitted = count_submits(monkeypatch)
    second_started = threading.Event()
    times = {}

    def slow_write(path, tensors, metadata=None):
        if Path(path).name == "shard_00001.safetensors":
            second_started.set()
            time.sleep(0.5)              # Ctrl-C comes while this shard is being written
        real_write(path, tensors, metadata)
        times.setdefault(Path(path).name, time.perf_counter())

    def interrupt_after_the_second_shard(module, args):
        if len(submitted) == 2:          # the second shard was handed over: Ctrl-C once its write has begun
            assert second_started.wait(timeout=30)
            times["interrupt"] = time.perf_counter()
            raise KeyboardInterrupt

    monkeypatch.setattr(store_lib, "write_shard", slow_write)
    hook = llama.model.model.layers[0].register_forward_pre_hook(interrupt_after_the_second_shard)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(llama, tmp_path / "resumed", corpus)
    finally:
        hook.remove()
    resumed = tmp_path / "resumed"
    partial = ActivationStore(resumed)
    # the shard being written when Ctrl-C came was finished and recorded: manifest, index and disk agree
    on_disk = sorted(p.name for p in resumed.iterdir() if p.name.startswith(("shard", ".")))
    assert partial.manifest["complete"] is False
    assert partial.manifest["shards"] == on_disk == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert len((resumed / "index.jsonl").read_text().splitlines()) == 2
    assert times["interrupt"] < times["shard_00001.safetensors"]     # it was still being written at Ctrl-C
    assert "shard_00002.safetensors" not in times
    monkeypatch.setattr(store_lib, "write_shard", real_write)
    again = run(llama, resumed, corpus, resume=True)
    assert again.n_tokens == straight.n_tokens
    assert_same_store(tmp_path / "straight", resumed)


def test_batch_tokens_sizes_batches_in_windows_and_writes_the_same_store(llama, corpus, tmp_path):
    batch_sizes = []          # windows per forward pass over the data (not the 2-token probe of the site's width)
    hook = llama.model.model.layers[0].register_forward_pre_hook(
        lambda module, args: batch_sizes.append(args[0].shape[0]) if args[0].shape[1] == CONTEXT else None)
    try:
        by_windows = run(llama, tmp_path / "windows", corpus, batch_size=3)
        windows_batches, batch_sizes[:] = list(batch_sizes), []
        by_tokens = run(llama, tmp_path / "tokens", corpus, batch_tokens=3 * CONTEXT + CONTEXT - 1)   # 3 windows
        tokens_batches, batch_sizes[:] = list(batch_sizes), []
        run(llama, tmp_path / "small", corpus, batch_tokens=CONTEXT - 1)      # less than a window: one window
        small_batches = list(batch_sizes)
    finally:
        hook.remove()
    assert tokens_batches == windows_batches and set(tokens_batches[:-1]) == {3} and len(tokens_batches) > 3
    assert set(small_batches) == {1} and len(small_batches) == sum(windows_batches)
    assert by_tokens.manifest["batch_size"] == by_windows.manifest["batch_size"] == 3
    assert ActivationStore(tmp_path / "small").manifest["batch_size"] == 1
    assert_same_store(tmp_path / "windows", tmp_path / "tokens")
    assert torch.equal(columns(tmp_path / "small")["activations.2"], columns(tmp_path / "windows")["activations.2"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_tokens=0), "--batch-tokens must be positive, got 0"),
    (dict(batch_tokens=-5), "--batch-tokens must be positive, got -5"),
    (dict(batch_size=0), "--batch-windows must be positive, got 0"),
    (dict(batch_size=4, batch_tokens=512), "--batch-windows and --batch-tokens both size a batch"),
])
def test_bad_batch_options_are_refused(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        CollectOptions(model="m", layers="1", site="resid_post", dataset="bbc", out=tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()


def test_bad_batch_tokens_on_the_command_line_is_one_line(tiny_llama_dir, corpus, tmp_path, capsys):
    from sae.cli import main
    common = ["collect", "--model", str(tiny_llama_dir), "--dataset", str(corpus), "--layers", "0"]
    for extra, message in [(["--batch-tokens", "0"], "error: --batch-tokens must be positive, got 0"),
                           (["--batch-tokens", "96", "--batch-windows", "2"], "error: --batch-windows and "
                                                                              "--batch-tokens both size a batch")]:
        with pytest.raises(SystemExit) as exit_info:
            main(common + extra + ["--out", str(tmp_path / "o")])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "o").exists()


def test_the_shard_writer_keeps_order_bounds_what_is_in_flight_and_raises_in_the_caller():
    written, started, gate = [], threading.Event(), threading.Event()

    def write(job):
        if job == "wait":
            started.set()
            assert gate.wait(timeout=30)
        if job == "fail":
            raise OSError(errno.EIO, "Input/output error")
        written.append(job)

    ordered = ShardWriter(write, in_flight=2)
    for job in range(20):
        ordered.submit(job)
    ordered.close()
    assert written == list(range(20)) and not ordered.thread.is_alive()

    written.clear()
    bounded = ShardWriter(write, in_flight=1)
    bounded.submit("wait")
    second = threading.Thread(target=bounded.submit, args=("after",))
    second.start()
    second.join(timeout=0.3)
    assert second.is_alive() and written == []        # one shard in flight: the next submit waits for it
    gate.set()
    second.join(timeout=30)
    bounded.close()
    assert written == ["wait", "after"]

    written.clear()
    failing = ShardWriter(write, in_flight=1)
    failing.submit(0)
    failing.submit("fail")
    with pytest.raises(OSError, match="Input/output error"):
        failing.submit(2)                              # the error of the job before, in the caller's thread
    failing.stop()
    assert written == [0] and not failing.thread.is_alive()

    written.clear()
    started.clear()
    gate.clear()
    stopped = ShardWriter(write, in_flight=3)
    for job in ("wait", 1, 2):
        stopped.submit(job)
    assert started.wait(timeout=30)
    threading.Timer(0.2, gate.set).start()
    stopped.stop()                                      # the write under way ends; those not started are dropped
    assert written == ["wait"] and not stopped.thread.is_alive()
