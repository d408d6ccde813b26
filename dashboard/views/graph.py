"""Attribution graph: a GRAPH.json from `sae attribute`, drawn with layers bottom to top (embeddings at the
bottom, the target logit at the top) and the prompt's positions left to right, its tokens along the bottom.
Edge width follows |weight| (blue: positive, red: negative); hovering a node shows its top input and output
edges; clicking a feature opens its feature page (`?page=feature&run=I&feature=N` of that layer's run).

Graphs are found in `graphs/` beside the runs shown: RUN/graphs/*.json, and for a live-training run's
RUN/layer_L/ runs in RUN/graphs/ (`sae attribute ... --out RUN/graphs/NAME.json`). `?graph=NAME` picks one.
"""
from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.render import feature_href, md
from dashboard.runs import DataProblem
from sae.errors import UserError
from sae.files import read_json

KIND_COLOURS = {"feature": "#e67e22", "error": "#95a5a6", "embedding": "#2e86c1", "logit": "#27ae60"}
TOP_EDGES = 3


def find_graphs(runs) -> list[Path]:
    """GRAPH.json files in graphs/ of each run and of its parent folder (a live run's RUN/graphs/)."""
    found, seen = [], set()
    for run in runs:
        for folder in (run.path / "graphs", run.path.parent / "graphs"):
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.json")):
                key = path.resolve()
                if key not in seen:
                    seen.add(key)
                    found.append(path)
    return found


def read_graph(path: Path) -> dict:
    try:
        graph = read_json(path, "the attribution graph")
    except UserError as problem:
        raise DataProblem(str(problem)) from None
    if not isinstance(graph.get("nodes"), list) or not isinstance(graph.get("edges"), list):
        raise DataProblem(f"{path} is not an attribution graph (no nodes and edges lists): write one with "
                          "`sae attribute`")
    return graph


def run_index_of_layers(graph: dict, runs) -> dict[int, int]:
    """layer -> index of the dashboard run that is that layer's transcoder (for feature links)."""
    by_path = {}
    for i, run in enumerate(runs):
        try:
            by_path[str(run.path.resolve())] = i
        except OSError:
            continue
    links = {}
    for layer, path in (graph.get("runs") or {}).items():
        try:
            index = by_path.get(str(Path(path).resolve()))
        except (OSError, TypeError):
            index = None
        if index is not None and str(layer).lstrip("-").isdigit():
            links[int(layer)] = index
    return links


def _label(node: dict, tokens: list) -> str:
    kind, position = node.get("kind"), node.get("position")
    token = tokens[position] if isinstance(position, int) and 0 <= position < len(tokens) else ""
    if kind == "feature":
        return f"L{node.get('layer')} #{node.get('feature')} @{token!r}"
    if kind == "error":
        return f"error L{node.get('layer')} @{token!r}" + (" (whole MLP)" if node.get("missing") else "")
    if kind == "embedding":
        return f"embedding {token!r}"
    return f"logit {node.get('token', '')!r}"


def _edge_summary(edges: list, labels: dict, key: str) -> dict:
    """node id -> 'label (+w); …' of its TOP_EDGES strongest edges whose `key` end is that node."""
    other = "target" if key == "source" else "source"
    grouped: dict = {}
    for edge in edges:
        grouped.setdefault(edge[key], []).append(edge)
    return {node: "; ".join(f"{labels.get(e[other], e[other])} ({e['weight']:+.3g})"
                            for e in sorted(group, key=lambda e: -abs(e["weight"]))[:TOP_EDGES])
            for node, group in grouped.items()}


def layout(graph: dict, links: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(nodes, edges, tokens) tables with plot coordinates: x = position (several nodes of one layer and
    position side by side), y = layer (embeddings -1, the logit n_layers)."""
    tokens = [str(t) for t in graph.get("prompt_tokens") or []]
    nodes = [n for n in graph["nodes"] if isinstance(n, dict) and "id" in n]
    labels = {n["id"]: _label(n, tokens) for n in nodes}
    edges = [e for e in graph["edges"] if e.get("source") in labels and e.get("target") in labels]
    inputs, outputs = _edge_summary(edges, labels, "target"), _edge_summary(edges, labels, "source")
    cells: dict = {}
    for node in sorted(nodes, key=lambda n: -abs(float(n.get("influence") or 0))):
        cells.setdefault((node.get("layer"), node.get("position")), []).append(node)
    rows = []
    for (layer, position), group in cells.items():
        spacing = min(0.8 / len(group), 0.18)
        for i, node in enumerate(group):
            feature_run = (links or {}).get(layer)
            href = (feature_href(node["feature"], feature_run, page="feature")
                    if node.get("kind") == "feature" and feature_run is not None else "")
            rows.append({"id": node["id"], "label": labels[node["id"]], "kind": node.get("kind"),
                         "layer": layer, "position": position, "feature": node.get("feature"),
                         "x": float(position) + (i - (len(group) - 1) / 2) * spacing, "y": float(layer),
                         "activation": node.get("activation"), "influence": node.get("influence"),
                         "direct effect": node.get("direct_effect"),
                         "top inputs": inputs.get(node["id"], "—"), "top outputs": outputs.get(node["id"], "—"),
                         "href": href})
    frame = pd.DataFrame(rows)
    where = {row["id"]: (row["x"], row["y"]) for row in rows}
    top = max((abs(e["weight"]) for e in edges), default=1.0) or 1.0
    edge_rows = [{"x": where[e["source"]][0], "y": where[e["source"]][1], "x2": where[e["target"]][0],
                  "y2": where[e["target"]][1], "weight": e["weight"], "width": 0.4 + 6.0 * abs(e["weight"]) / top,
                  "sign": "positive" if e["weight"] >= 0 else "negative",
                  "edge": f"{labels[e['source']]} → {labels[e['target']]}"} for e in edges]
    token_rows = [{"x": float(i), "y": -1.55, "token": token if len(token) <= 12 else token[:11] + "…"}
                  for i, token in enumerate(tokens)]
    return frame, pd.DataFrame(edge_rows), pd.DataFrame(token_rows)


def chart(nodes: pd.DataFrame, edges: pd.DataFrame, tokens: pd.DataFrame, n_layers: int) -> alt.LayerChart:
    x_scale = alt.Scale(domain=[-0.6, max(len(tokens), 1) - 0.4], nice=False)
    y_scale = alt.Scale(domain=[-2.0, n_layers + 0.6], nice=False)
    y_axis = alt.Axis(values=list(range(-1, n_layers + 1)), title="layer", labelOverlap=True,
                      labelExpr=f"datum.value == -1 ? 'embed' : datum.value == {n_layers} ? 'logit' : datum.label")
    layers = []
    if len(edges):
        layers.append(alt.Chart(edges).mark_rule(opacity=0.55).encode(
            x=alt.X("x:Q", scale=x_scale, axis=None), y=alt.Y("y:Q", scale=y_scale, axis=y_axis),
            x2="x2:Q", y2="y2:Q", strokeWidth=alt.StrokeWidth("width:Q", legend=None),
            color=alt.Color("sign:N", scale=alt.Scale(domain=["positive", "negative"], range=["#2e6fdb", "#d62728"]),
                            legend=alt.Legend(title="edge")),
            tooltip=["edge:N", alt.Tooltip("weight:Q", format="+.4g")]))
    layers.append(alt.Chart(nodes).mark_circle(opacity=0.95, stroke="#333", strokeWidth=0.5).encode(
        x=alt.X("x:Q", scale=x_scale, axis=None),
        y=alt.Y("y:Q", scale=y_scale, axis=y_axis),
        size=alt.Size("influence:Q", scale=alt.Scale(range=[40, 400]), legend=None),
        fill=alt.Fill("kind:N", scale=alt.Scale(domain=list(KIND_COLOURS), range=list(KIND_COLOURS.values())),
                      legend=alt.Legend(title="node")),
        href="href:N",
        tooltip=["label:N", "kind:N", "layer:Q", "position:Q", "feature:Q",
                 alt.Tooltip("activation:Q", format=".4g"), alt.Tooltip("influence:Q", format=".3f"),
                 alt.Tooltip("direct effect:Q", format="+.4g"), "top inputs:N", "top outputs:N"]))
    layers.append(alt.Chart(tokens).mark_text(align="center", baseline="top", fontSize=12, font="monospace").encode(
        x=alt.X("x:Q", scale=x_scale, axis=None), y=alt.Y("y:Q", scale=y_scale, axis=y_axis), text="token:N"))
    height = max(420, 26 * (n_layers + 3))
    return alt.layer(*layers).properties(height=height).interactive(bind_y=False)


def show(runs, place) -> None:
    st.title("Attribution graph")
    graphs = find_graphs(runs)
    if not graphs:
        st.info("No attribution graph next to these runs. Write one with `sae attribute --run RUN --prompt TEXT "
                "--out RUN/graphs/NAME.json`, then open this page again.")
        return
    names = [path.stem for path in graphs]
    wanted = st.query_params.get("graph")
    index = names.index(wanted) if wanted in names else 0
    if len(graphs) > 1:
        index = st.selectbox("Graph", range(len(graphs)), index=index, format_func=lambda i: names[i],
                             key="graph_choice")
    graph = read_graph(graphs[index])
    target = graph.get("target") or {}
    st.caption(f"Prompt: {md(graph.get('prompt', ''))} → target {md(repr(target.get('token', '')))} "
               f"(logit {target.get('logit', float('nan')):.4g}, p {target.get('probability', float('nan')):.3g}); "
               f"model {md(graph.get('model', '?'))}")
    counts, done = graph.get("counts") or {}, graph.get("completeness") or {}
    st.caption(f"{counts.get('nodes', len(graph['nodes']))} nodes and {counts.get('edges', len(graph['edges']))} "
               f"edges kept of {counts.get('nodes_before_pruning', '?')} nodes "
               f"({counts.get('features_active', '?')} active features); direct effects + bias reproduce the "
               f"logit to {done.get('relative_error', float('nan')):.1e} (relative). Hover a node for its strongest "
               "edges; click a feature to open it.")
    if graph.get("missing_layers"):
        st.caption(f"Layers without a transcoder (their MLPs are single error nodes): {graph['missing_layers']}")
    n_layers = int(graph.get("n_layers") or 1 + max((n.get("layer", 0) for n in graph["nodes"]), default=0))
    nodes, edges, tokens = layout(graph, run_index_of_layers(graph, runs))
    if not len(nodes):
        st.info("The graph has no nodes.")
        return
    st.altair_chart(chart(nodes, edges, tokens, n_layers), width="stretch")
    with st.expander("Nodes (strongest influence first)"):
        table = nodes.sort_values("influence", ascending=False)[
            ["label", "kind", "layer", "position", "feature", "activation", "influence", "direct effect", "href"]]
        st.dataframe(table, hide_index=True, width="stretch",
                     column_config={"href": st.column_config.LinkColumn("feature page", display_text="open")})
