"""GRAPH.json: the pruned attribution graph as nodes and edges (schema in docs/files.md, close to
circuit-tracer's). Node ids: `feature:L:P:F`, `error:L:P`, `embedding:P`, `logit:TOKEN_ID`; layers: embeddings
-1, features and error nodes their block, the logit n_layers; positions index `prompt_tokens`."""
from __future__ import annotations

import torch

from sae.attribute.prune import prune

SCHEMA = "sae-attribution-graph/1"


def graph_nodes(rm, rows) -> tuple[list[dict], torch.Tensor]:
    """Every node the graph may hold (visited features, error nodes, embeddings; the logit last) and their
    source indices (the logit: -1)."""
    nodes, index = [], []
    layer_of, feature_of, act_of, pos_of = [], [], [], []
    for layer, part in rm.parts.items():
        layer_of += [layer] * len(part.features)
        feature_of += part.features.tolist()
        act_of += part.activations.float().tolist()
        pos_of += part.positions.tolist()
    for i in rows.visited.tolist():
        nodes.append({"id": f"feature:{layer_of[i]}:{pos_of[i]}:{feature_of[i]}", "kind": "feature",
                      "layer": layer_of[i], "position": pos_of[i], "feature": feature_of[i],
                      "activation": act_of[i]})
        index.append(i)
    for layer, part in rm.parts.items():
        norms = part.error.float().norm(dim=-1).tolist()
        for position in range(rm.n_pos):
            node = {"id": f"error:{layer}:{position}", "kind": "error", "layer": layer, "position": position,
                    "activation": norms[position]}
            if part.kind == "missing":
                node["missing"] = True       # the whole MLP: no transcoder for this layer
            nodes.append(node)
            index.append(rm.error_index(layer, position))
    norms = rm.embed.float().norm(dim=-1).tolist()
    for position in range(rm.n_pos):
        nodes.append({"id": f"embedding:{position}", "kind": "embedding", "layer": -1, "position": position,
                      "activation": norms[position]})
        index.append(rm.embed_index(position))
    return nodes, torch.tensor(index, dtype=torch.long)


def build_graph(rm, rows, token: int, token_text: str, node_threshold: float, edge_threshold: float) -> dict:
    """{"nodes": [...], "edges": [...], "counts": {...}}: the pruned graph."""
    nodes, index = graph_nodes(rm, rows)
    n_visited, n = len(rows.visited), len(nodes) + 1
    logit_value = float(rm.clean_logits[-1, token])
    probability = float(torch.softmax(rm.clean_logits[-1], -1)[token])
    nodes.append({"id": f"logit:{token}", "kind": "logit", "layer": rm.loaded.n_layers, "position": rm.n_pos - 1,
                  "token": token_text, "token_id": token, "activation": logit_value, "probability": probability})
    adjacency = torch.zeros(n, n, dtype=torch.float64)                              # [target, source]
    adjacency[:n_visited, :n - 1] = rows.features[:, index].double().cpu()
    adjacency[n - 1, :n - 1] = rows.logit[index].double().cpu()
    weights = torch.zeros(n, dtype=torch.float64)
    weights[-1] = 1.0
    keep = torch.tensor([node["kind"] in ("embedding", "logit") for node in nodes])
    is_feature = torch.tensor([node["kind"] == "feature" for node in nodes])
    pruned = prune(adjacency, weights, keep, is_feature, node_threshold, edge_threshold)
    direct = rows.logit[index].double().cpu().tolist() + [0.0]
    for i, node in enumerate(nodes):
        node["influence"] = 1.0 if node["kind"] == "logit" else float(pruned.influence[i])
        node["direct_effect"] = direct[i]
    kept = pruned.node_mask.nonzero().flatten().tolist()
    edges = [{"source": nodes[s]["id"], "target": nodes[t]["id"], "weight": float(adjacency[t, s])}
             for t, s in pruned.edge_mask.nonzero().tolist()]
    edges.sort(key=lambda edge: -abs(edge["weight"]))
    counts = {"features_active": rm.n_features, "features_visited": n_visited, "nodes_before_pruning": n,
              "nodes": len(kept), "edges": len(edges),
              "edges_before_pruning": int((adjacency != 0).sum())}
    return {"nodes": [nodes[i] for i in kept], "edges": edges, "counts": counts}
