"""Runs: what each run is, its eval figures, its training curves, and the sweep's L0–FVU frontier."""
from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.render import md
from dashboard.runs import DataProblem, read_eval, read_metrics, read_sweep
from sae.errors import UserError

IDENTITY = ("model", "layer", "site", "variant", "d_in", "d_sae", "store")
FIGURES = ("fvu", "explained_variance", "mse", "l0", "dead_fraction", "ce_loss_clean", "ce_loss_spliced",
           "ce_loss_zero_ablated", "ce_loss_recovered", "kl_div_spliced", "kl_div_zero_ablated", "kl_div_score")
CURVES = ("loss", "l0", "fvu", "dead_fraction")
X_AXES = ("tokens", "step")


def show(runs, place) -> None:
    st.title("Runs")
    sweeps = []
    for index, run in enumerate(runs):
        with st.container(border=True):
            st.subheader(f"{index}: {md(run.name)}")
            st.caption(md(run.path))
            if run.problem:
                st.error(run.problem)
                continue
            _identity(run)
            _figures(run)
            _curves(run, index)
        if run.sweep is not None and run.sweep not in sweeps:
            sweeps.append(run.sweep)
    for path in sweeps:
        _frontier(path)


def _identity(run) -> None:
    cfg = run.config or {}
    row = {key: cfg.get(key) for key in IDENTITY if cfg.get(key) is not None}
    row["width"] = cfg.get("d_sae")
    knobs = cfg.get("knobs") or {}
    if knobs:
        row["knobs"] = ", ".join(f"{k}={v}" for k, v in knobs.items())
    st.dataframe(pd.DataFrame([{k: str(v) for k, v in row.items()}]), hide_index=True, width="stretch")


def _figures(run) -> None:
    try:
        figures = read_eval(run)
    except UserError as problem:      # eval.json half-written
        st.warning(str(problem))
        return
    if figures is None:
        st.info(f"Not evaluated yet: run `sae eval --run {run.path} --activations STORE`.")
        return
    shown = [(key, figures[key]) for key in FIGURES if isinstance(figures.get(key), (int, float))]
    columns = st.columns(min(6, max(1, len(shown))))
    for i, (key, value) in enumerate(shown):
        columns[i % len(columns)].metric(key, f"{value:.4g}")
    probing = figures.get("sparse_probing")
    if isinstance(probing, dict) and probing:
        st.caption("Sparse probing (mean balanced accuracy over one-vs-rest label tasks)")
        st.table(pd.DataFrame([probing_row(probing)], index=["accuracy"]))
    for key in ("note", "downstream_note", "why_no_downstream"):
        if isinstance(figures.get(key), str):
            st.caption(figures[key])


def probing_row(probing: dict) -> dict:
    """Only the accuracies: k latents (keys "1", "2", "5", …) and "full"; counts such as n_tasks or
    n_train_docs are not k values and stay out of the row."""
    row = {f"k={k}": v for k, v in sorted(((k, v) for k, v in probing.items() if str(k).isdigit()),
                                           key=lambda kv: int(kv[0])) if isinstance(v, (int, float))}
    if isinstance(probing.get("full"), (int, float)):
        row["full"] = probing["full"]
    return {k: f"{v:.3f}" for k, v in row.items()}


def _curves(run, index: int) -> None:
    metrics = read_metrics(run)
    if metrics.empty:
        st.caption("No training curves (metrics.jsonl is missing or empty).")
        return
    x_axis = next((x for x in X_AXES if x in metrics.columns), None)
    metrics = metrics.sort_values(x_axis) if x_axis else metrics.reset_index().rename(columns={"index": "row"})
    x_axis = x_axis or "row"
    numeric = [c for c in metrics.columns if c not in (x_axis, *X_AXES)]
    default = [c for c in CURVES if c in numeric] or numeric[:4]
    chosen = st.multiselect("Training curves", numeric, default=default, key=f"curves_{index}")
    columns = st.columns(2)
    for i, name in enumerate(chosen):
        data = metrics[[x_axis, name]].dropna()
        chart = alt.Chart(data).mark_line().encode(x=alt.X(f"{x_axis}:Q", title=x_axis),
                                                   y=alt.Y(f"{name}:Q", title=name)).properties(height=200)
        columns[i % 2].altair_chart(chart, width="stretch")


def pareto(frame: pd.DataFrame, x: str = "l0", y: str = "fvu") -> pd.DataFrame:
    """Points no other point beats on both x and y (lower is better for both)."""
    ordered = frame.dropna(subset=[x, y]).sort_values([x, y])
    best, keep = float("inf"), []
    for index, value in zip(ordered.index, ordered[y]):
        if value < best:
            best = value
            keep.append(index)
    return ordered.loc[keep]


def _frontier(path) -> None:
    st.subheader("Sweep: L0–FVU frontier")
    st.caption(md(path))
    try:
        sweep = read_sweep(path)
    except DataProblem as problem:
        st.warning(str(problem))
        return
    if not {"l0", "fvu"} <= set(sweep.columns):
        st.warning(f"{path} has no l0/fvu columns")
        return
    sweep = sweep.copy()
    sweep["variant"] = sweep["variant"].astype(str) if "variant" in sweep else "run"
    tooltip = [c for c in ("name", "variant", "l0", "fvu", "ce_loss_recovered") if c in sweep.columns]
    positive = bool((sweep["l0"].dropna() > 0).all())
    points = alt.Chart(sweep).mark_circle(size=70).encode(
        x=alt.X("l0:Q", scale=alt.Scale(type="log" if positive else "linear"), title="L0"), y=alt.Y("fvu:Q", title="FVU"),
        color="variant:N", tooltip=tooltip)
    line = alt.Chart(pareto(sweep)).mark_line(color="#444", strokeDash=[4, 3]).encode(x="l0:Q", y="fvu:Q")
    st.altair_chart(points + line, width="stretch")
    st.dataframe(sweep, hide_index=True, width="stretch")
