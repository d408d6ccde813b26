"""RUN/analysis/explanations.parquet: one row per explained feature, rewritten whole (temporary file, then
rename) after every batch, so a killed `sae explain` keeps every feature finished before the kill and a
rerun goes on with the rest."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sae.errors import UserError
from sae.files import replace_durably

FILE = "explanations.parquet"
SCORES = ("detection", "fuzzing", "embedding")
SCHEMA = pa.schema([
    ("feature", pa.int64()), ("explanation", pa.string()), ("explainer", pa.string()),
    *[(name, pa.float64()) for name in SCORES],
    *[(f"{name}_control", pa.float64()) for name in SCORES],
    ("control_feature", pa.int64()),                  # whose scoring contexts the controls used
    ("explain_contexts", pa.list_(pa.string())),      # "shard:window_index:position" of each context shown
    ("score_contexts", pa.list_(pa.string())),        # the held-out contexts the scores come from
    ("score_activating", pa.list_(pa.bool_())),       # which of them activate the feature
    ("control_contexts", pa.list_(pa.string())),
])


def read_explanations(path) -> pa.Table | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"{path} cannot be read ({error}): remove it or pass --force") from None


class ExplanationWriter:
    """Holds the rows written so far; add() appends a batch and rewrites the file atomically."""

    def __init__(self, path, explainer: str, force: bool = False):
        self.path = Path(path)
        self.explainer = explainer
        existing = None if force else read_explanations(self.path)
        self.rows: list[dict] = []
        if existing is not None:
            missing = [name for name in SCHEMA.names if name not in existing.column_names]
            if missing:
                raise UserError(f"{self.path} lacks {', '.join(missing)}: pass --force to write it anew")
            others = set(existing.column("explainer").to_pylist()) - {explainer}
            if others:
                raise UserError(f"{self.path} holds explanations by {sorted(others)[0]!r}, not {explainer!r}: "
                                "pass --force to replace them")
            self.rows = existing.select(SCHEMA.names).cast(SCHEMA).to_pylist()
        self.done = {int(row["feature"]) for row in self.rows}
        if force and self.path.exists():
            self._write()

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows.append({name: row.get(name) for name in SCHEMA.names})
            self.done.add(int(row["feature"]))
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ordered = sorted(self.rows, key=lambda row: int(row["feature"]))
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        pq.write_table(pa.Table.from_pylist(ordered, schema=SCHEMA), tmp)
        replace_durably(tmp, self.path)
