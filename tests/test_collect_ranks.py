"""sae collect under torchrun (2 CPU processes, gloo): each rank tokenizes only its share of the documents,
and the two ranks' store holds every document once, whole and in order, as one process collects it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sae.collect import CollectOptions, collect
from sae.collect.ranks import DEALING, DocumentShare, batches, check_resumable, deal, numbered, rank_budget
from sae.data import Document, pack_windows
from sae.distributed import DistInfo
from sae.errors import UserError
from sae.store import ActivationStore

ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 41            # odd: the shares are 21 and 20 documents
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home", "quickly"]
COMMON = dict(layers=[1], site="resid_post", context_size=24, batch_size=2, shard_tokens=60, device="cpu",
              progress=False)
BUDGET = 151

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

# run by torchrun: the whole dataset with a recording tokenizer; an interrupted run and its --resume; a --tokens run
SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from sae import distributed
    from sae.collect import CollectOptions, collect
    from sae.lm import load_model
    from test_collect_ranks import COMMON, BUDGET, Recording

    model_dir, corpus, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    rank = int(os.environ["RANK"])
    loaded = load_model(model_dir)
    plain, loaded.tokenizer = loaded.tokenizer, Recording(loaded.tokenizer)
    collect(CollectOptions(model=model_dir, dataset=corpus, out=root / "two", **COMMON), loaded=loaded)
    texts, loaded.tokenizer = loaded.tokenizer.texts, plain

    forwards = [0]
    def interrupt(module, args):
        forwards[0] += 1
        if forwards[0] == 7:
            raise KeyboardInterrupt
    hook = loaded.model.model.layers[0].register_forward_pre_hook(interrupt)
    try:
        collect(CollectOptions(model=model_dir, dataset=corpus, out=root / "resumed", **COMMON), loaded=loaded)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    hook.remove()
    left = sorted(p.name for p in (root / "resumed").glob(f"shard_r{{rank:03d}}_*"))
    distributed.barrier()
    collect(CollectOptions(model=model_dir, dataset=corpus, out=root / "resumed", resume=True, **COMMON), loaded=loaded)
    budget = collect(CollectOptions(model=model_dir, dataset=corpus, out=root / "budget", tokens=BUDGET, **COMMON),
                     loaded=loaded)
    with open(root / f"rank{{rank}}.json", "w") as handle:
        json.dump({{"texts": texts, "interrupted": interrupted, "left": left, "budget_rows": budget.n_tokens}}, handle)
    distributed.teardown()
""")


class Recording:
    """A tokenizer that notes every text it is asked to tokenize (and otherwise is the tokenizer it wraps)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.texts += list(texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """N_DOCS documents, each text unique (it starts with its number), in a .jsonl file."""
    gen = torch.Generator().manual_seed(4)
    texts = []
    for i in range(N_DOCS):
        n = int(torch.randint(3, 12, (1,), generator=gen))
        texts.append(f"doc {i}: " + " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=gen)))
    path = tmp_path_factory.mktemp("ranks") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, texts


def rank_rows(path: Path) -> dict:
    """{rank: {column: tensor}}: each rank's rows in store order (shard names say the rank: shard_rNNN_)."""
    store = ActivationStore(path)
    parts: dict = {}
    for i, name in enumerate(store.manifest["shards"]):
        rank = int(name.split("_")[1][1:]) if name.startswith("shard_r") else 0
        for column in ("doc_id", "token_ids", "window_ids", "window_index", "position", "activations.1"):
            parts.setdefault(rank, {}).setdefault(column, []).append(store.read_shard(i, column))
        windows = store.read_shard(i, "window_ids")[store.read_shard(i, "window_index")]   # each row's window number
        parts[rank].setdefault("row_window", []).append(windows)
    return {rank: {k: torch.cat(v) for k, v in columns.items()} for rank, columns in parts.items()}


def documents_in_order(rows: dict) -> dict:
    """{doc_id: its token ids in store order}."""
    tokens: dict = {}
    for doc, token in zip(rows["doc_id"].tolist(), rows["token_ids"].tolist()):
        tokens.setdefault(doc, []).append(token)
    return tokens


def test_documents_are_dealt_by_number_and_windows_numbered_store_wide(tiny_tokenizer):
    documents = [Document(doc_id, f"text {doc_id} " * (1 + doc_id % 4)) for doc_id in range(23)]
    world, shares, windows = 3, [], []
    for rank in range(world):
        d, share = DistInfo(rank, world), DocumentShare()
        mine = list(deal(iter(documents), d, share))
        assert [doc.doc_id for doc in mine] == list(range(rank, 23, world))   # ids come from the reader
        assert (share.read, share.with_text, share.mine) == (23, 23, len(mine))
        shares.append({doc.doc_id for doc in mine})
        packed = list(numbered(pack_windows(iter(mine), tiny_tokenizer, 16, 1, 2, 3), d))
        assert [w.index for w in packed] == [k * world + rank for k in range(len(packed))]
        docs_in_windows = {int(x) for w in packed for x in w.doc_ids if x >= 0}
        assert docs_in_windows == shares[-1]                                 # a rank's windows: its documents
        windows += [w.index for w in packed]
    assert set().union(*shares) == set(range(23)) and sum(map(len, shares)) == 23
    assert len(windows) == len(set(windows))
    # resume: a start window skips exactly the windows numbered before it, in whole batches after it
    packed = list(numbered(pack_windows(iter(documents[1::2]), tiny_tokenizer, 16, 1, 2, 3), DistInfo(1, 2)))
    seen = [0]
    groups = list(batches(iter(packed), 3, packed[2].index + 1, seen))
    assert seen[0] == len(packed) and [w.index for g in groups for w in g] == [w.index for w in packed[3:]]
    assert all(len(g) == 3 for g in groups[:-1])
    assert [rank_budget(10, DistInfo(r, 3)) for r in range(3)] == [4, 3, 3]
    assert rank_budget(None, DistInfo(0, 2)) is None


def test_a_store_of_dealt_windows_is_not_resumed():
    with pytest.raises(UserError, match="shared windows"):
        check_resumable({"world_size": 2})
    check_resumable({"world_size": 2, "rank_share": DEALING})
    check_resumable({"world_size": 1})


def test_two_ranks_tokenize_their_own_documents_and_store_each_once(tiny_llama_dir, corpus, tmp_path):
    from sae.lm import load_model
    path, texts = corpus
    loaded = load_model(str(tiny_llama_dir))
    plain, loaded.tokenizer = loaded.tokenizer, Recording(loaded.tokenizer)
    collect(CollectOptions(model=str(tiny_llama_dir), dataset=str(path), out=tmp_path / "one", **COMMON), loaded=loaded)
    assert sorted(loaded.tokenizer.texts) == sorted(texts)       # one process: every document, once
    loaded.tokenizer = plain

    script = tmp_path / "collect_ranks.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tiny_llama_dir), str(path), str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    # each rank tokenized exactly the documents numbered rank, rank + 2, ... and nothing else, each once
    number = {text: i for i, text in enumerate(texts)}
    tokenized = [sorted(number[t] for t in report["texts"]) for report in reports]
    assert tokenized == [list(range(0, N_DOCS, 2)), list(range(1, N_DOCS, 2))]

    one, two = rank_rows(tmp_path / "one")[0], rank_rows(tmp_path / "two")
    assert sorted(two) == [0, 1]
    for rank, rows in two.items():
        assert set(rows["doc_id"].tolist()) <= set(tokenized[rank])        # a rank stores only its documents
        windows = rows["window_ids"].tolist()
        assert all(w % 2 == rank for w in windows) and windows == sorted(set(windows))
    # every document once, whole and in order: the same token sequence per doc_id as in one process
    merged = {**documents_in_order(two[0]), **documents_in_order(two[1])}
    assert len(merged) == len(documents_in_order(two[0])) + len(documents_in_order(two[1]))
    assert merged == documents_in_order(one) and len(merged) == N_DOCS
    assert ActivationStore(tmp_path / "two").manifest["rank_share"] == DEALING

    # the rows are the model's activations on the windows the ranks stored (an independent forward pass)
    store = ActivationStore(tmp_path / "two")
    for i in range(len(store.shards)):
        window_tokens = store.read_shard(i, "window_tokens").long()
        w, p = store.read_shard(i, "window_index"), store.read_shard(i, "position").long()
        with torch.no_grad():
            hidden = loaded.model(input_ids=window_tokens, output_hidden_states=True).hidden_states[2]   # [W, T, d]
        torch.testing.assert_close(store.read_shard(i, "activations.1"), hidden[w, p], atol=1e-5, rtol=1e-5)

    # interrupted on both ranks, then --resume: the store of the run that was never interrupted
    assert all(report["interrupted"] and report["left"] for report in reports)
    resumed = rank_rows(tmp_path / "resumed")
    for rank in (0, 1):
        assert len(reports[rank]["left"]) < sum(n.startswith(f"shard_r{rank:03d}")
                                                for n in ActivationStore(tmp_path / "two").manifest["shards"])
        for column, values in two[rank].items():
            assert torch.equal(resumed[rank][column], values), (rank, column)
    assert ActivationStore(tmp_path / "resumed").manifest["complete"]

    # --tokens: each rank's share of the budget, the first rows of its own stream
    budget = rank_rows(tmp_path / "budget")
    assert all(report["budget_rows"] == BUDGET for report in reports)
    for rank, wanted in ((0, BUDGET // 2 + 1), (1, BUDGET // 2)):
        assert len(budget[rank]["doc_id"]) == wanted
        for column, values in budget[rank].items():     # per row, but window_ids: one per stored window
            assert torch.equal(values, two[rank][column][:len(values)]), (rank, column)
