"""Real scale (issue 19): per-shard metadata, a split and shuffled epochs in memory proportional to the shards,
--max-tokens, bytes written by a collection, and refusals of bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sae.errors import UserError
from sae.store import ActivationStore, is_held_out
from sae.store import index as store_index


def _store(tmp_path, n=3000, shard_rows=700, name="s"):
    torch.manual_seed(0)
    acts = torch.randn(n, 8)
    acts[:, 0] = torch.arange(n, dtype=torch.float32)      # row id in column 0 to trace rows
    doc_id = torch.arange(n) // 37                          # documents cross shard boundaries
    return ActivationStore.from_tensors(tmp_path / name, acts, layer=3, shard_rows=shard_rows, doc_id=doc_id), acts, doc_id


def test_per_shard_metadata_matches_a_brute_force_count(tmp_path):
    store, acts, doc_id = _store(tmp_path)
    metas = store_index.read(store.path)
    assert [m.name for m in metas] == store.manifest["shards"]
    for i, meta in enumerate(metas):
        lo, hi = i * 700, min((i + 1) * 700, 3000)
        held = is_held_out(doc_id[lo:hi])
        assert meta.rows == hi - lo and meta.held_out == int(held.sum())
        mask = torch.zeros(hi - lo, dtype=torch.bool)
        for a, b in meta.held_out_runs:
            mask[a:b] = True
        assert torch.equal(mask, held)
        norms = acts[lo:hi].norm(dim=-1).double()
        assert meta.norm_sum["3"] == pytest.approx(float(norms.sum()), rel=1e-9)
        assert meta.norm_sq_sum["3"] == pytest.approx(float(norms.square().sum()), rel=1e-9)
        assert meta.bytes == (store.path / meta.name).stat().st_size
    assert store.split_size("held_out") == int(is_held_out(doc_id).sum())
    assert store.split_size("train") == int((~is_held_out(doc_id)).sum())


def test_open_split_and_epochs_never_build_a_per_row_column(tmp_path, monkeypatch):
    store, acts, doc_id = _store(tmp_path)

    def per_row(*args, **kwargs):
        raise AssertionError("a whole-store per-row column was built")
    monkeypatch.setattr(ActivationStore, "column", per_row)
    monkeypatch.setattr(ActivationStore, "held_out_mask", per_row)
    monkeypatch.setattr(ActivationStore, "split_indices", per_row)
    monkeypatch.setattr(ActivationStore, "read_shard", per_row)       # no doc_id is read: the metadata has the split
    store = ActivationStore(store.path)
    train_rows = (~is_held_out(doc_id)).nonzero().squeeze(1)
    # every training row exactly once per epoch, none held out, across shards and buffers
    stream = store.train_batches(batch_size=100, seed=3, chunk_rows=64, buffer_chunks=3)
    per_epoch = len(train_rows) // 100
    ids = torch.cat([next(stream)[:, 0] for _ in range(per_epoch)]).long()
    assert len(set(ids.tolist())) == len(ids) == per_epoch * 100
    assert set(ids.tolist()) <= set(train_rows.tolist())
    assert not torch.equal(ids[:100].sort().values, ids[:100])          # shuffled
    # a pure function of (seed, step): a resumed stream, started mid-epoch and across the epoch boundary
    stream = store.train_batches(batch_size=100, seed=3, chunk_rows=64, buffer_chunks=3)
    straight = [next(stream) for _ in range(per_epoch + 4)]
    resumed = store.train_batches(batch_size=100, seed=3, chunk_rows=64, buffer_chunks=3, start_step=per_epoch - 2)
    for step in range(per_epoch - 2, per_epoch + 4):
        assert torch.equal(next(resumed), straight[step])
    # the held-out split in store order, read straight from the memory map
    held = torch.cat(list(store.activations(split="held_out", batch_size=128)))
    assert torch.equal(held, acts[is_held_out(doc_id)])
    # ranks split the same global batch
    halves = [next(store.train_batches(batch_size=100, seed=3, rank=r, world_size=2, chunk_rows=64, buffer_chunks=3))
              for r in (0, 1)]
    assert torch.equal(torch.cat(halves), straight[0])


def test_an_old_store_without_metadata_opens_and_gives_the_same_batches(tmp_path):
    store, _, _ = _store(tmp_path)
    new = [b for b, _ in zip(store.train_batches(batch_size=64, seed=1), range(5))]
    held = torch.cat(list(store.activations(split="held_out")))
    (store.path / store_index.INDEX).unlink()
    old = ActivationStore(store.path)
    assert old.metas is None
    assert all(torch.equal(a, b) for a, b in zip(new, old.train_batches(batch_size=64, seed=1)))
    assert torch.equal(held, torch.cat(list(old.activations(split="held_out"))))


def _rewrite_line(path, index, **changes):
    lines = (path / store_index.INDEX).read_text().splitlines()
    body = json.loads(lines[index])
    body.update(changes)
    lines[index] = json.dumps(body)
    (path / store_index.INDEX).write_text("\n".join(lines) + "\n")


def test_metadata_that_disagrees_with_the_shards_is_refused(tmp_path):
    store, _, _ = _store(tmp_path)
    before = {p.name: p.read_bytes() for p in store.path.iterdir() if p.suffix == ".safetensors"}
    _rewrite_line(store.path, 1, rows=699)
    with pytest.raises(UserError, match="says 699 rows, the shard holds 700"):
        ActivationStore(store.path)
    _rewrite_line(store.path, 1, rows=700, bytes=12)
    with pytest.raises(UserError, match="says 12 bytes"):
        ActivationStore(store.path)
    size = (store.path / store.manifest["shards"][1]).stat().st_size
    runs = json.loads((store.path / store_index.INDEX).read_text().splitlines()[1])["held_out_runs"]
    moved = [[lo + 1, hi + 1] for lo, hi in runs]
    _rewrite_line(store.path, 1, bytes=size, held_out_runs=moved)
    damaged = ActivationStore(store.path)                      # opens (the runs are in range) ...
    with pytest.raises(UserError, match="held-out rows that its doc_id column does not match"):
        damaged.read_shard(1, "doc_id")                        # ... and is refused once its doc_ids are read
    _rewrite_line(store.path, 1, held_out=3)
    with pytest.raises(UserError, match="counts 3 held-out rows"):
        ActivationStore(store.path)
    # nothing already written was touched
    assert before == {p.name: p.read_bytes() for p in store.path.iterdir() if p.suffix == ".safetensors"}
    (store.path / store_index.INDEX).write_text("")
    with pytest.raises(UserError, match="lacks shard"):
        ActivationStore(store.path)


def test_head_views_bound_eval_and_analyze(tmp_path):
    store, acts, doc_id = _store(tmp_path)
    view = store.head(rows=1000)
    assert len(view) == 1000 and [s.n_rows for s in view.shards] == [700, 300]
    assert torch.equal(torch.cat(list(view.activations())), acts[:1000])
    assert torch.equal(view.column("doc_id"), doc_id[:1000])
    held = view.split_size("held_out")
    assert held == int(is_held_out(doc_id[:1000]).sum())
    cut = store.head(held_out=50)                                # up to the 50th held-out row
    held_rows = is_held_out(doc_id).nonzero().squeeze(1)
    assert len(cut) == int(held_rows[50]) and cut.split_size("held_out") == 50
    assert torch.equal(torch.cat(list(cut.activations(split="held_out"))), acts[held_rows[:50]])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sae", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_max_tokens_zero_is_refused(command, tmp_path):
    result = _cli(command, "--run", str(tmp_path), "--activations", str(tmp_path), "--max-tokens", "0")
    assert result.returncode == 2
    assert "--max-tokens" in result.stderr and "at least 1" in result.stderr
    assert "Traceback" not in result.stderr


def _written_by_this_process() -> int:
    """Bytes this process has handed to write() so far (/proc/self/io wchar: Rust's writes included)."""
    with open("/proc/self/io") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("wchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_collection_writes_at_most_105_percent_of_the_store(tiny_lm, tmp_path):
    from conftest import write_labelled_corpus

    from sae.collect import CollectOptions, collect
    corpus = write_labelled_corpus(tmp_path / "docs.jsonl", ["the", "cat", "sat", "on", "a", "mat", "dog"], 60,
                                   (4, 16), seed=2)
    loaded = tiny_lm("llama")
    out = tmp_path / "store"
    before = _written_by_this_process()
    result = collect(CollectOptions(model=loaded.name, dataset=str(corpus), out=out, layers=[0, 2], site="resid_post",
                                    context_size=24, batch_size=3, shard_tokens=60, progress=False), loaded=loaded)
    written = _written_by_this_process() - before
    size = sum(p.stat().st_size for p in out.iterdir())
    assert result.n_shards >= 10                                   # the manifest's old per-shard rewrite would show
    assert written <= 1.05 * size and result.bytes_written <= 1.05 * size
    assert result.bytes_written <= written                         # what it counted, the kernel saw
    store = ActivationStore(out)
    assert [m.name for m in store_index.read(out)] == store.manifest["shards"]
    stats = store.manifest["norm_stats"]["2"]                       # computed while collecting, exact here
    norms = torch.cat([store.read_shard(i, "activations.2").norm(dim=-1) for i in range(len(store.shards))])
    assert stats["p99"] == pytest.approx(float(norms.double().quantile(0.99)), rel=1e-5)


def test_gpu_check_parses_and_refuses_cleanly_without_cuda(tmp_path):
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would run its check")
    done = subprocess.run(["bash", str(script), str(tmp_path / "work")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): this check needs one"]
    assert not (tmp_path / "work").exists()                     # nothing written before the refusal
