"""Direct effects in the replacement model: one backward pass per target (a batch of targets at once, one per
copy of the prompt) through the frozen model, contracted with every source's vector.

A target is the target token's logit at the last position, or an active transcoder feature's (linearised)
pre-activation. Its row holds, for every source s, the direct effect A[t, s] = activation_s · (d target /
d residual where s writes) · (the vector s writes): embeddings at the embedding output, features and error
nodes at their MLP's output. The frozen model is affine in its sources, so a row sums, with the target's bias
terms (its value with every source removed), to the target's value exactly.

Which features get rows (`max_feature_nodes`): the logit's row first, then, batch by batch, the features not
yet visited with the most influence on the logit through the rows so far (circuit-tracer's order).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.attribute.prune import influence_on_target


@dataclass
class Rows:
    logit: torch.Tensor          # [n_sources] direct effects on the target logit
    visited: torch.Tensor        # [n_visited] source indices (features) whose rows were computed
    features: torch.Tensor       # [n_visited, n_sources] their direct-effect rows


class _Sources:
    """Every source's vector, laid out for batched contraction with gradients (built once per prompt)."""

    def __init__(self, rm):
        self.rm = rm
        self.layers = {}
        offsets = rm.feature_offsets()
        for layer, part in rm.parts.items():
            n_act = len(part.features)
            if not n_act:
                continue
            counts = torch.bincount(part.positions, minlength=rm.n_pos)              # [n_pos]
            width = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(n_act, device=counts.device) - starts[part.positions]
            written = part.decoder * part.activations[:, None]                          # [n_act, d_model]
            padded = torch.zeros(rm.n_pos, width, written.shape[1], dtype=written.dtype, device=written.device)
            padded[part.positions, rank] = written                                       # [n_pos, width, d_model]
            self.layers[layer] = (padded, part.positions, rank, offsets[layer])

    def contract(self, grads: dict, out: torch.Tensor) -> None:
        """out [c, n_sources] += each source's direct effect, from grads {"embed"/layer: [c, n_pos, d_model]}."""
        rm, c = self.rm, out.shape[0]
        for layer, (padded, positions, rank, offset) in self.layers.items():
            grad = grads.get(layer)
            if grad is None:
                continue
            per_pos = torch.bmm(grad[:c].transpose(0, 1), padded.transpose(1, 2))     # [n_pos, c, width]
            out[:, offset:offset + len(positions)] = per_pos[positions, :, rank].t()
        for layer, part in rm.parts.items():
            grad = grads.get(layer)
            if grad is not None:
                start = rm.error_index(layer, 0)
                out[:, start:start + rm.n_pos] = (grad[:c] * part.error[None]).sum(-1)
        grad = grads.get("embed")
        if grad is not None:
            start = rm.embed_index(0)
            out[:, start:start + rm.n_pos] = (grad[:c] * rm.embed[None]).sum(-1)


def direct_effect_rows(rm, token: int, max_feature_nodes: int | None = None, batch_size: int = 32,
                       progress: bool = True) -> Rows:
    """The logit's row and the rows of up to max_feature_nodes features (None: all), most influential first."""
    from tqdm import tqdm
    n_features = rm.n_features
    # only transcoder features have inputs to compute (an mlp_out SAE's features are outputs of the whole MLP)
    seen = torch.cat([torch.full((len(p.features),), p.kind != "transcoder", dtype=torch.bool)
                      for p in rm.parts.values()]) if n_features else torch.zeros(0, dtype=torch.bool)
    n_candidates = int((~seen).sum())
    budget = n_candidates if max_feature_nodes is None else min(int(max_feature_nodes), n_candidates)
    batch = max(1, min(batch_size, budget)) if budget else 1
    sources = _Sources(rm)
    logit = _rows(rm, rm.forward(batch=1, probes=True), sources, [("logit", token)])[0]   # one copy for one row
    frozen = rm.forward(batch=batch, probes=True) if budget else None
    feature_layer = torch.cat([torch.full((len(p.features),), layer, dtype=torch.long)
                               for layer, p in rm.parts.items()]) if n_features else torch.zeros(0, dtype=torch.long)
    offsets = rm.feature_offsets()
    visited = torch.zeros(0, dtype=torch.long)
    rows = torch.zeros(0, rm.n_sources, dtype=logit.dtype, device=logit.device)
    bar = tqdm(total=budget, desc="attribution rows", unit="feature", disable=not progress or budget == 0)
    while len(visited) < budget:
        influence = influence_on_target(logit, rows, visited)[:n_features].cpu()  # [n_features]
        influence[seen] = -1.0
        take = min(batch, budget - len(visited))
        chosen = torch.topk(influence, take).indices
        seen[chosen] = True
        targets = [("feature", int(feature_layer[i]), int(i) - offsets[int(feature_layer[i])]) for i in chosen]
        rows = torch.cat([rows, _rows(rm, frozen, sources, targets)])
        visited = torch.cat([visited, chosen])
        bar.update(take)
    bar.close()
    return Rows(logit=logit, visited=visited, features=rows)


def _rows(rm, frozen, sources: _Sources, targets: list) -> torch.Tensor:
    """[len(targets), n_sources]: one backward through the frozen pass (batch >= len(targets)) for all."""
    values = []
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for b, target in enumerate(targets):
        if target[0] == "logit":
            values.append(rm.logits(frozen, [target[1]])[b, 0])
        else:
            by_layer.setdefault(target[1], []).append((b, target[2]))
    for layer, pairs in by_layer.items():
        part = rm.parts[layer]
        rows_b = torch.tensor([b for b, _ in pairs], device=part.positions.device)
        index = torch.tensor([i for _, i in pairs], device=part.positions.device)
        x = frozen.mlp_in[layer][rows_b, part.positions[index]]                        # [k, d_model]
        values.append((x * part.encoder[index]).sum())
    keys = list(frozen.probes)
    grads = torch.autograd.grad(torch.stack(values).sum(), [frozen.probes[k] for k in keys],
                                retain_graph=True, allow_unused=True)
    out = torch.zeros(len(targets), rm.n_sources, dtype=frozen.final.dtype, device=frozen.final.device)
    sources.contract({k: g for k, g in zip(keys, grads) if g is not None}, out)
    return out.detach()
