"""Influence on the target and pruning, after circuit-tracer's method (Ameisen et al. 2025), our own code.

Normalised adjacency: Â = |A| with each row scaled to sum 1 (a target's inputs as shares). A node's influence
on the target is the target's weight carried back along every path: w Â + w Â² + ... (the graph is acyclic, so
the series ends after at most n_layers + 2 terms). Pruning keeps the nodes holding `node_threshold` of the total
influence (embeddings and the logit always), then the edges holding `edge_threshold` of the influence that flows
through edges (edge score = Â[t, s] · (influence of t + its target weight)), then drops, until nothing changes,
features and error nodes left without outgoing edges and features left without incoming edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def normalise_rows(matrix: torch.Tensor) -> torch.Tensor:
    absolute = matrix.abs()
    return absolute / absolute.sum(dim=-1, keepdim=True).clamp(min=1e-10)


def propagate(adjacency_norm: torch.Tensor, weights: torch.Tensor, max_steps: int = 10_000) -> torch.Tensor:
    """weights Â + weights Â² + ...: [n] influence of every node on the weighted targets."""
    current = weights @ adjacency_norm
    total = current.clone()
    for _ in range(max_steps):
        if not bool(current.any()):
            return total
        current = current @ adjacency_norm
        total += current
    raise RuntimeError("influence did not converge: the graph has a cycle")


def influence_on_target(logit_row: torch.Tensor, rows: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
    """[n_sources] influence of every source on the logit through the rows computed so far (logit_row
    [n_sources]; rows [n_visited, n_sources], the rows of the sources `visited`)."""
    step = normalise_rows(logit_row[None])[0]                       # [n_sources]
    total = step.clone()
    rows_norm = normalise_rows(rows) if len(rows) else rows
    for _ in range(10_000):
        if not len(visited):
            break
        step = step[visited] @ rows_norm
        if not bool(step.any()):
            break
        total += step
    return total


def threshold_of(scores: torch.Tensor, share: float) -> float:
    """The smallest score among the top scores that together hold `share` of the total."""
    ordered = torch.sort(scores.flatten(), descending=True).values
    total = ordered.sum()
    if not ordered.numel() or not total > 0:
        return float("inf")
    cumulative = torch.cumsum(ordered, 0) / total
    index = min(int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype))), len(ordered) - 1)
    return float(ordered[index])


@dataclass
class Pruned:
    node_mask: torch.Tensor      # [n] bool
    edge_mask: torch.Tensor      # [n, n] bool, [target, source]
    influence: torch.Tensor      # [n] each node's influence on the target (before pruning)


def prune(adjacency: torch.Tensor, target_weights: torch.Tensor, keep: torch.Tensor, is_feature: torch.Tensor,
          node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """adjacency [n, n] ([target, source]); target_weights [n] (1 on the logit); keep [n] bool: nodes kept
    whatever their influence (embeddings, the logit); is_feature [n] bool."""
    influence = propagate(normalise_rows(adjacency), target_weights)                # [n]
    node_mask = (influence >= threshold_of(influence, node_threshold)) & (influence > 0) | keep
    pruned = adjacency * node_mask[:, None] * node_mask[None, :]
    pruned_norm = normalise_rows(pruned)
    carried = propagate(pruned_norm, target_weights) + target_weights                # [n]
    scores = pruned_norm * carried[:, None]                                           # [n, n]
    edge_mask = (scores >= threshold_of(scores, edge_threshold)) & (scores > 0)
    writes = ~keep                                    # features and error nodes need an outgoing edge
    while True:
        before = node_mask.clone()
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        node_mask &= ~writes | edge_mask.any(0)
        node_mask &= ~is_feature | edge_mask.any(1)
        if torch.equal(before, node_mask):
            break
    return Pruned(node_mask=node_mask, edge_mask=edge_mask, influence=influence)
