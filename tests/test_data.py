"""sae.data: the embedded BBC corpus, local files, and packing documents into windows."""
import json

import pytest
import torch

from sae.data import PAD_DOC, Document, load_documents, pack_windows
from sae.errors import UserError
from sae.store import is_held_out


def test_bbc_has_2225_documents_with_five_stable_labels():
    documents, names = load_documents("bbc")
    documents = list(documents)
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(documents) == 2225
    assert sorted(d.doc_id for d in documents) == list(range(2225))
    # read in a fixed interleaving of the topics: the first 200 documents already hold every label
    assert len({d.label for d in documents[:200]}) == 5
    counts = torch.bincount(torch.tensor([d.label for d in documents]))
    assert counts.tolist() == [510, 386, 417, 511, 401]
    again, _ = load_documents("bbc")
    first = next(again)
    assert first.text == documents[0].text and first.text.strip()


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    docs, names = load_documents(str(tmp_path / "a.txt"))
    assert [d.text for d in docs] == ["first doc\nstill first", "second doc"] and names is None

    rows = [{"body": "hello", "label": "pos"}, {"body": "world", "label": "neg"}, {"body": "again", "label": "pos"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    docs, names = load_documents(str(tmp_path / "b.jsonl"), text_column="body")
    docs = list(docs)
    assert [(d.doc_id, d.text, d.label) for d in docs] == [(0, "hello", 0), (1, "world", 1), (2, "again", 0)]
    assert names == ["pos", "neg"]
    with pytest.raises(UserError, match="text column 'nope'.*body, label"):
        load_documents(str(tmp_path / "b.jsonl"), text_column="nope")
    with pytest.raises(UserError, match="no 'text' column"):
        load_documents(str(tmp_path / "b.jsonl"))

    import pandas as pd
    pd.DataFrame({"text": ["p1", "p2"], "label": [3, 1]}).to_parquet(tmp_path / "c.parquet")
    docs, names = load_documents(str(tmp_path / "c.parquet"))
    assert [(d.text, d.label) for d in docs] == [("p1", 3), ("p2", 1)] and names == ["0", "1", "2", "3"]

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in [("b.txt", "bee"), ("a.txt", "ay\n\nstill ay")]:
        (folder / name).write_text(text)
    assert [(d.doc_id, d.text) for d in load_documents(str(folder))[0]] == [(0, "ay\n\nstill ay"), (1, "bee")]


def test_bad_datasets(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_documents(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="no documents"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        load_documents(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="unknown dataset"):
        load_documents("no-such-owner/no-such-dataset-xyz")


def _documents(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    docs = []
    for doc_id in range(n):
        length = int(torch.randint(1, 30, (1,), generator=gen))
        text = " ".join(words[int(i)] for i in torch.randint(0, 5, (length,), generator=gen))
        docs.append(Document(doc_id, text, doc_id % 3))
    return docs


@pytest.mark.parametrize("context_size", [8, 33])
def test_packing_bookkeeping(tiny_tokenizer, context_size):
    docs = _documents(60)
    bos, eos, pad = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    windows = list(pack_windows(docs, tiny_tokenizer, context_size, bos, eos, pad))
    assert [w.index for w in windows] == list(range(len(windows)))
    for held_out in (False, True):
        split_docs = [d for d in docs if bool(is_held_out(torch.tensor([d.doc_id]))[0]) == held_out]
        assert split_docs, "both splits must be exercised"
        split = [w for w in windows if w.held_out == held_out]
        # every window: BOS first, fixed size; padding only at the very end of the split
        for w in split:
            assert w.input_ids.shape == (context_size,) and int(w.input_ids[0]) == bos
            assert w.positions.tolist() == list(range(context_size))
        body = torch.cat([w.input_ids[1:] for w in split])
        body_docs = torch.cat([w.doc_ids[1:] for w in split])
        body_labels = torch.cat([w.labels[1:] for w in split])
        real = body_docs != PAD_DOC
        assert not real[real.nonzero().max() + 1:].any()  # padding is a tail
        expected_ids, expected_docs = [], []
        for d in split_docs:
            ids = tiny_tokenizer(d.text, add_special_tokens=False).input_ids + [eos]
            expected_ids += ids
            expected_docs += [d.doc_id] * len(ids)
        assert body[real].tolist() == expected_ids  # EOS between documents, nothing lost or repeated
        assert body_docs[real].tolist() == expected_docs
        assert body_labels[real].tolist() == [i % 3 for i in expected_docs]
        assert (body[~real] == pad).all()
        # BOS belongs to the window's first document; held-out windows hold only held-out documents
        for w in split:
            assert int(w.doc_ids[0]) == int(w.doc_ids[1])
            held = is_held_out(w.doc_ids[w.doc_ids != PAD_DOC])
            assert bool(held.all()) if held_out else not bool(held.any())


def test_packing_is_deterministic_and_without_bos(tiny_tokenizer):
    docs = _documents(20)
    a = [w.input_ids for w in pack_windows(docs, tiny_tokenizer, 16, 1, 2, 3)]
    b = [w.input_ids for w in pack_windows(docs, tiny_tokenizer, 16, 1, 2, 3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    no_bos = list(pack_windows(docs, tiny_tokenizer, 16, None, 2, 3))
    assert int(no_bos[0].input_ids[0]) != 1
    with pytest.raises(UserError, match="context-size"):
        list(pack_windows(docs, tiny_tokenizer, 1, 1, 2, 3))
