"""Feature list: every latent in a sortable, filterable table under the feature-density histogram;
selecting a row (or its link) opens the feature."""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import nav
from dashboard.render import feature_href, md, token_list
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


FILTERED_ON = ("top_tokens", "auto_label")   # what a feature fires on; never best_label, which every
                                             # feature has however weak its F1 (it would match most rows)


def filtered(frame: pd.DataFrame, text: str, min_log_density: float | None, hide_dead: bool) -> pd.DataFrame:
    """Rows whose top tokens / auto label contain `text` (case-insensitive), above the density cut."""
    keep = np.ones(len(frame), dtype=bool)
    if text:
        hay = pd.Series("", index=frame.index)
        for column in FILTERED_ON:
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


def density_floor(frame: pd.DataFrame) -> float:
    """The density slider's lower end: just below the rarest live feature (log10, in quarter steps)."""
    density = frame["density"].to_numpy(dtype=float)
    alive = density[density > 0]
    if not len(alive):
        return -8.0
    return float(np.floor(np.log10(alive.min()) * 4) / 4)


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
    text = left.text_input("Filter by top token", key="list_filter",
                           help="Matches the feature's top tokens and auto label (not its best label)")
    sort = middle.selectbox("Sort by", list(SORTS), key="list_sort")
    floor = density_floor(frame)
    cut = right.slider("Minimum log10 density", floor, 0.0, floor, 0.25, key="list_cut")
    hide_dead = last.checkbox("Hide dead", value=False, key="list_dead")
    shown = filtered(frame, text.strip(), None if cut <= floor else cut, hide_dead)
    column, ascending = SORTS[sort]
    if column in shown.columns:
        shown = shown.sort_values(column, ascending=ascending, kind="stable")
    table = shown[[c for c in COLUMNS if c in shown.columns]].reset_index(drop=True)
    if "top_tokens" in table.columns:
        table["top_tokens"] = [token_list(v) for v in table["top_tokens"]]
    table.insert(1, "open", [feature_href(f, place.run) for f in table["feature"]])
    st.caption(f"{len(table)} shown. Select a row (or click its link) to open the feature.")
    event = st.dataframe(
        table, hide_index=True, width="stretch", height=520,
        key=f"feature_table_{st.session_state.get('feature_table_gen', 0)}",
        on_select="rerun", selection_mode="single-row",
        column_config={"feature": st.column_config.NumberColumn("feature", width=70),
                       "open": st.column_config.LinkColumn("open", display_text="open ↗", width=60),
                       "density": st.column_config.NumberColumn("density", format="%.2e", width=80),
                       "max_activation": st.column_config.NumberColumn("max act", format="%.3f", width=70),
                       "mean_activation": st.column_config.NumberColumn("mean act", format="%.3f", width=70),
                       "n_fired": st.column_config.NumberColumn("fired", width=70),
                       "top_tokens": st.column_config.TextColumn("top tokens", width=260),
                       "auto_label": st.column_config.TextColumn("auto label", width=160),
                       "best_label": st.column_config.TextColumn("best label", width=90),
                       "best_label_f1": st.column_config.NumberColumn("F1", format="%.2f", width=50)})
    rows = getattr(getattr(event, "selection", None), "rows", None) or []
    if rows:  # a fresh table key next time, so that coming back does not reopen the same row
        st.session_state["feature_table_gen"] = st.session_state.get("feature_table_gen", 0) + 1
        nav.go(page="feature", feature=int(table["feature"].iloc[rows[0]]))
        st.rerun()
