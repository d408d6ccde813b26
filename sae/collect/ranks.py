"""Under torchrun each rank collects from its own share of the documents.

Documents are dealt before tokenization: the n-th document read (0-based, in the dataset's fixed
reading order) goes to rank n % world_size, and a rank tokenizes and packs only its own documents.
A document's doc_id comes from the reader, not the rank, so it is the same whatever the world size
(the held-out split by doc_id does not move). Windows never straddle documents, so a rank's windows
hold only its documents; each rank numbers its k-th window k * world_size + rank, so window numbers
are unique across the store and grow along a rank's packing order (what `--resume` counts from).
In one process every document is the rank's and the numbering is the packing order: the store is
the one a single process always wrote.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from sae import distributed
from sae.data import Document, Window
from sae.errors import UserError

DEALING = "document number % world_size"   # recorded in the manifest: how this store's ranks shared the data


@dataclass
class DocumentShare:
    """What the dealing saw (filled from the tokenizing thread; read once its stream is done)."""
    read: int = 0          # documents read, every rank's
    with_text: int = 0     # of those, documents with non-empty text
    mine: int = 0          # documents this rank kept (and so tokenizes)


def deal(documents: Iterable[Document], d: distributed.DistInfo, share: DocumentShare) -> Iterator[Document]:
    """This rank's documents (reading number % world_size == rank); the others are skipped untokenized."""
    for number, document in enumerate(documents):
        share.read += 1
        share.with_text += bool(document.text)
        if number % d.world_size == d.rank:
            share.mine += 1
            yield document


def numbered(windows: Iterable[Window], d: distributed.DistInfo) -> Iterator[Window]:
    """This rank's windows renumbered store-wide: the k-th becomes k * world_size + rank."""
    for window in windows:
        window.index = window.index * d.world_size + d.rank
        yield window


def batches(windows: Iterable[Window], batch_size: int, start_window: int, seen: list):
    """This rank's windows numbered >= start_window (resume) in fixed groups; seen[0] counts windows packed."""
    group = []
    for window in windows:
        seen[0] += 1
        if window.index < start_window:
            continue
        group.append(window)
        if len(group) == batch_size:
            yield group
            group = []
    if group:
        yield group


def rank_budget(tokens: int | None, d: distributed.DistInfo) -> int | None:
    """This rank's share of --tokens (all ranks together): the remainder goes to the first ranks."""
    if tokens is None:
        return None
    return tokens // d.world_size + (1 if d.rank < tokens % d.world_size else 0)


def check_resumable(old_manifest: dict) -> None:
    """A store from several ranks that dealt windows (before documents were dealt) cannot be continued."""
    if old_manifest.get("world_size", 1) > 1 and old_manifest.get("rank_share") != DEALING:
        raise UserError("--resume: this store was collected under torchrun by an older sae that shared windows, "
                        "not documents, among the ranks: finish it with that version, or start over with --force")
