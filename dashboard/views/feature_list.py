"""Feature list: every latent in a sortable, filterable table under the feature-density histogram;
selecting a row (or its link) opens the feature."""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import nav
from dashboard.render import feature_href, md
from dashboard.runs import features, read_meta

COLUMNS = ("feature", "density", "max_activation", "mean_activation", "n_fired", "top_tokens", "auto_label",
           "best_label", "best_label_f1")
SORTS = {"density (high first)": ("density", False), "density (low first)": ("density", True),
         "max activation": ("max_activation", False), "feature": ("feature", True),
         "best label F1": ("best_label_f1", False)}


def density_histogram(meta: dict, frame: pd.DataFrame) -> pd.DataFrame:
    """Bars over log10(density): from meta.json when analysis stored them, else from the table."""
    edges, counts = meta.get("density_hist_edges"), meta.get("density_hist_counts")
    if not edges or not counts or len(edges) != len(counts) + 1:
        density = frame["density"].to_numpy(dtype=float)
        alive = np.log10(density[density > 0])
        counts, edges = np.histogram(alive, bins=40) if len(alive) else (np.zeros(0), np.zeros(1))
    edges = np.asarray(edges, dtype=float)
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "features": np.asarray(counts)})


def filtered(frame: pd.DataFrame, text: str, min_log_density: float | None, hide_dead: bool) -> pd.DataFrame:
    """Rows whose tokens/labels contain `text` (case-insensitive), above the density cut."""
    keep = np.ones(len(frame), dtype=bool)
    if text:
        hay = pd.Series("", index=frame.index)
        for column in ("top_tokens", "auto_label", "best_label"):
            if column in frame.columns:
                hay = hay + " " + frame[column].fillna("").astype(str)
        keep &= hay.str.contains(text, case=False, regex=False).to_numpy()
    density = frame["density"].to_numpy(dtype=float)
    if hide_dead:
        keep &= density > 0
    if min_log_density is not None:
        with np.errstate(divide="ignore"):
            keep &= np.log10(np.maximum(density, 0)) >= min_log_density
    return frame[keep]


def show(runs, place) -> None:
    run = runs[place.run]
    st.title(f"Features · {md(run.name)}")
    frame = features(run)
    meta = read_meta(run)
    dead = int((frame["density"] <= 0).sum())
    st.caption(f"{len(frame)} latents, {dead} never fired on the analysed tokens "
               f"({meta.get('n_tokens', '?')} tokens). Density = share of tokens a latent fires on.")
    for note in meta.get("notes") or []:
        st.caption(f"Note: {md(note)}")
    bars = density_histogram(meta, frame)
    if len(bars):
        chart = alt.Chart(bars).mark_bar().encode(
            x=alt.X("lo:Q", title="log10 feature density", bin="binned"), x2="hi:Q",
            y=alt.Y("features:Q", title="latents"), tooltip=["lo", "hi", "features"]).properties(height=180)
        st.altair_chart(chart, width="stretch")

    left, middle, right, last = st.columns([3, 2, 2, 1])
    text = left.text_input("Filter by token or label", key="list_filter")
    sort = middle.selectbox("Sort by", list(SORTS), key="list_sort")
    cut = right.slider("Minimum log10 density", -8.0, 0.0, -8.0, 0.5, key="list_cut")
    hide_dead = last.checkbox("Hide dead", value=False, key="list_dead")
    shown = filtered(frame, text.strip(), None if cut <= -8.0 else cut, hide_dead)
    column, ascending = SORTS[sort]
    if column in shown.columns:
        shown = shown.sort_values(column, ascending=ascending, kind="stable")
    table = shown[[c for c in COLUMNS if c in shown.columns]].reset_index(drop=True)
    table.insert(1, "open", [feature_href(f, place.run) for f in table["feature"]])
    st.caption(f"{len(table)} shown. Select a row (or click its link) to open the feature.")
    event = st.dataframe(
        table, hide_index=True, width="stretch", height=520,
        key=f"feature_table_{st.session_state.get('feature_table_gen', 0)}",
        on_select="rerun", selection_mode="single-row",
        column_config={"open": st.column_config.LinkColumn("open", display_text="open ↗"),
                       "density": st.column_config.NumberColumn(format="%.2e"),
                       "max_activation": st.column_config.NumberColumn(format="%.3f"),
                       "mean_activation": st.column_config.NumberColumn(format="%.3f"),
                       "best_label_f1": st.column_config.NumberColumn(format="%.2f")})
    rows = getattr(getattr(event, "selection", None), "rows", None) or []
    if rows:  # a fresh table key next time, so that coming back does not reopen the same row
        st.session_state["feature_table_gen"] = st.session_state.get("feature_table_gen", 0) + 1
        nav.go(page="feature", feature=int(table["feature"].iloc[rows[0]]))
        st.rerun()
