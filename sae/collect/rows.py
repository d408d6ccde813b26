"""The rows one batch of windows contributes to a store, and a shard's tensors from several batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.data import PAD_DOC


@dataclass
class BatchRows:
    """The rows one batch contributes. n = kept rows, w = windows."""
    window_tokens: torch.Tensor   # [w, context] int32
    window_ids: torch.Tensor      # [w] int64, global window numbers
    window_in_batch: torch.Tensor  # [n] int64
    position: torch.Tensor        # [n] int32
    token_ids: torch.Tensor       # [n] int32
    doc_id: torch.Tensor          # [n] int64
    label: torch.Tensor           # [n] int64
    acts: dict                    # layer -> [n, d] stored dtype
    norms: torch.Tensor           # [n, L] float32
    next_window: int              # the rank's next window number after this batch
    targets: dict = None          # layer -> [n, d] stored dtype: the --target-site rows (None: no target site)

    def __len__(self) -> int:
        return len(self.doc_id)

    def select(self, keep: torch.Tensor) -> "BatchRows":
        return BatchRows(self.window_tokens, self.window_ids, self.window_in_batch[keep], self.position[keep],
                         self.token_ids[keep], self.doc_id[keep], self.label[keep],
                         {k: v[keep] for k, v in self.acts.items()}, self.norms[keep], self.next_window,
                         None if self.targets is None else {k: v[keep] for k, v in self.targets.items()})

    def head(self, n: int) -> "BatchRows":
        """The first n rows, and only the windows they come from."""
        rows = self.select(torch.arange(n))
        n_windows = int(rows.window_in_batch.max()) + 1 if n else 0
        rows.window_tokens, rows.window_ids = self.window_tokens[:n_windows], self.window_ids[:n_windows]
        return rows


def batch_rows(windows, captured: dict, layers, special: torch.Tensor, keep_special: bool,
               stored_dtype: torch.dtype, next_window: int, captured_targets: dict | None = None) -> BatchRows:
    ids = torch.stack([w.input_ids for w in windows])      # [B, T]
    docs = torch.stack([w.doc_ids for w in windows])       # [B, T]
    labels = torch.stack([w.labels for w in windows])      # [B, T]
    keep = docs != PAD_DOC                                  # [B, T]
    if not keep_special:
        keep &= ~torch.isin(ids, special)
    batch_index, position = keep.nonzero(as_tuple=True)    # [n] each, row-major order
    acts, norms = {}, []
    for layer in layers:
        site_acts = captured[layer]                         # [B, T, d] on the model's device
        rows = site_acts[keep.to(site_acts.device)]         # [n, d]
        norms.append(rows.float().norm(dim=-1).cpu())
        acts[layer] = rows.to(stored_dtype).cpu()
    targets = None if captured_targets is None else {                 # layer -> [n, d]: same rows, target site
        layer: captured_targets[layer][keep.to(captured_targets[layer].device)].to(stored_dtype).cpu()
        for layer in layers}
    return BatchRows(
        window_tokens=ids.to(torch.int32), window_ids=torch.tensor([w.index for w in windows], dtype=torch.int64),
        window_in_batch=batch_index, position=position.to(torch.int32), token_ids=ids[keep].to(torch.int32),
        doc_id=docs[keep], label=labels[keep], acts=acts,
        norms=torch.stack(norms, dim=1) if norms else torch.empty(0, 0), next_window=next_window, targets=targets)


def shard_tensors(parts: list[BatchRows], layers, labelled: bool) -> dict:
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += len(part.window_tokens)
    tensors = {f"activations.{layer}": torch.cat([p.acts[layer] for p in parts]) for layer in layers}
    if parts and parts[0].targets is not None:
        tensors.update({f"targets.{layer}": torch.cat([p.targets[layer] for p in parts]) for layer in layers})
    tensors.update(
        token_ids=torch.cat([p.token_ids for p in parts]),
        window_tokens=torch.cat([p.window_tokens for p in parts]),
        window_ids=torch.cat([p.window_ids for p in parts]),
        window_index=torch.cat([p.window_in_batch + o for p, o in zip(parts, offsets)]),
        position=torch.cat([p.position for p in parts]),
        doc_id=torch.cat([p.doc_id for p in parts]),
    )
    if labelled:
        tensors["label"] = torch.cat([p.label for p in parts])
    return tensors


