"""ActivationStore: lazy reading, held-out rule, deterministic seekable shuffling, from_tensors."""
import json

import pytest
import torch

import sae
from sae.errors import UserError
from sae.store import ActivationStore, is_held_out


@pytest.fixture()
def store(tmp_path):
    torch.manual_seed(0)
    acts = torch.randn(3000, 8)
    acts[:, 0] = torch.arange(3000, dtype=torch.float32)  # row id in column 0 to trace rows
    doc_id = torch.arange(3000) // 50
    return ActivationStore.from_tensors(tmp_path / "s", acts, layer=3, shard_rows=700, doc_id=doc_id,
                                        label=doc_id % 5), acts


def test_from_tensors_round_trip_and_manifest(store):
    s, acts = store
    assert len(s) == 3000 and s.d_model == 8 and s.layers == [3]
    assert len(s.manifest["shards"]) == 5  # 700-row shards
    got = torch.cat(list(s.activations(batch_size=256)))
    assert torch.equal(got, acts)
    assert torch.equal(s.column("label"), (torch.arange(3000) // 50) % 5)
    assert json.loads((s.path / "manifest.json").read_text())["n_tokens"] == 3000


def test_held_out_split_is_by_document_and_partitions_rows(store):
    s, acts = store
    held = torch.cat(list(s.activations(split="held_out")))
    train = torch.cat(list(s.activations(split="train")))
    assert len(held) + len(train) == len(s)
    held_docs = set((held[:, 0].long() // 50).tolist())
    train_docs = set((train[:, 0].long() // 50).tolist())
    assert held_docs and not held_docs & train_docs
    assert all(bool(is_held_out(torch.tensor([d]))) for d in held_docs)


def test_train_batches_pure_function_of_seed_and_step(store):
    s, _ = store
    first = s.train_batches(batch_size=128, seed=7, chunk_rows=64, buffer_chunks=3)
    batches = [next(first) for _ in range(30)]  # crosses an epoch boundary
    resumed = s.train_batches(batch_size=128, seed=7, start_step=25, chunk_rows=64, buffer_chunks=3)
    for step in range(25, 30):
        assert torch.equal(next(resumed), batches[step])
    other_seed = next(s.train_batches(batch_size=128, seed=8, chunk_rows=64, buffer_chunks=3))
    assert not torch.equal(other_seed, batches[0])


def test_train_batches_cover_each_training_row_once_per_epoch_and_mix_shards(store):
    s, _ = store
    n_train = len(s.split_indices("train"))
    per_epoch = n_train // 100
    stream = s.train_batches(batch_size=100, seed=1, chunk_rows=50, buffer_chunks=4)
    ids = torch.cat([next(stream)[:, 0] for _ in range(per_epoch)]).long()
    assert len(set(ids.tolist())) == len(ids) == per_epoch * 100
    assert not bool(is_held_out(ids // 50).any())
    shards_in_first_batch = set((ids[:100] // 700).tolist())
    assert len(shards_in_first_batch) > 1


def test_gather_returns_rows_in_the_order_asked_across_shards(store):
    s, acts = store
    order = torch.randperm(3000, generator=torch.Generator().manual_seed(3))[:500]   # every shard, any order
    assert torch.equal(s.gather(3, order), acts[order])
    within_one = torch.tensor([1405, 1400, 1399 + 2])                                 # one shard, unsorted
    assert torch.equal(s.gather(3, within_one), acts[within_one])
    assert torch.equal(s.gather(3, torch.tensor([2999, 0])), acts[[2999, 0]])          # first and last shard


def test_ranks_split_the_global_batch(store):
    s, _ = store
    whole = next(s.train_batches(batch_size=128, seed=3))
    parts = [next(s.train_batches(batch_size=128, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(UserError):
        next(s.train_batches(batch_size=127, seed=3, world_size=2))


def test_bad_stores_are_refused(tmp_path):
    with pytest.raises(UserError):
        ActivationStore(tmp_path)
    with pytest.raises(UserError):
        sae.ActivationStore.from_tensors(tmp_path / "e", torch.empty(0, 4))
    sae.ActivationStore.from_tensors(tmp_path / "x", torch.randn(10, 4))
    with pytest.raises(UserError):
        sae.ActivationStore.from_tensors(tmp_path / "x", torch.randn(10, 4))
