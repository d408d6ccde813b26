"""Map: the 2-D layout of the decoder directions that `sae analyze` computed (analysis/feature_map.parquet),
coloured by density, label selectivity, explanation score or cluster; a click on a point opens the feature."""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import latent_data, nav
from dashboard.render import md
from dashboard.runs import DataProblem, _stamp, features, read_meta

COLOURS = ("log10 density", "label selectivity (best F1)", "explanation score (detection)", "cluster")


@st.cache_resource(show_spinner=False, max_entries=8)
def _points(run_path: str, stamps: tuple, _layout: pd.DataFrame, _frame: pd.DataFrame, _notes) -> pd.DataFrame:
    """The plotted table, built once per version of the three files (stamps): feature, x, y, every colouring."""
    layout, frame, notes = _layout, _frame, _notes
    points = layout[["feature", "x", "y", "cluster"]].copy()
    density = frame["density"].reindex(points["feature"]).to_numpy(dtype=float)
    points["log10 density"] = np.log10(np.maximum(density, 1e-8))
    f1 = frame["best_label_f1"] if "best_label_f1" in frame.columns else pd.Series(dtype=float)
    points["label selectivity (best F1)"] = f1.reindex(points["feature"]).to_numpy(dtype=float)
    score = notes["detection"] if notes is not None and "detection" in notes.columns else pd.Series(dtype=float)
    points["explanation score (detection)"] = score.reindex(points["feature"]).to_numpy(dtype=float)
    label = frame["auto_label"] if "auto_label" in frame.columns else pd.Series(dtype=str)
    points["label"] = label.reindex(points["feature"]).fillna("").astype(str).to_numpy()
    if notes is not None:
        explained = notes["explanation"].reindex(points["feature"])
        points["label"] = np.where(explained.notna(), explained.fillna("").astype(str), points["label"])
    points["cluster"] = points["cluster"].astype(str)
    return points


def show(runs, place) -> None:
    run = runs[place.run]
    st.title("Feature map")
    layout = latent_data.table(run, "feature_map")
    if layout is None:
        raise DataProblem(f"{run.name} has no feature map (analysis/feature_map.parquet): run `sae analyze` "
                          "again with this version")
    meta = read_meta(run)
    st.caption(md(run.describe()) + " · " + md(meta.get("feature_map") or "2-D layout of the decoder directions")
               + " · click a point to open its feature")
    colour = st.radio("Colour by", COLOURS, horizontal=True, key="map_colour")
    frame, notes = features(run), latent_data.explanations(run)
    stamps = tuple(_stamp(run.analysis / f"{name}.parquet") if (run.analysis / f"{name}.parquet").exists() else None
                   for name in ("feature_map", "features", "explanations"))
    points = _points(str(run.path), stamps, layout, frame, notes)
    if colour == COLOURS[2] and notes is None:
        st.info("No explanations yet (`sae explain`): points are grey.")
    pick = alt.selection_point(fields=["feature"], on="click", name="pick")
    encoding = alt.Color("cluster:N", legend=None) if colour == "cluster" else \
        alt.Color(f"{colour}:Q", scale=alt.Scale(scheme="viridis"))
    chart = alt.Chart(points).mark_circle(size=14, opacity=0.75).encode(
        x=alt.X("x:Q", axis=None), y=alt.Y("y:Q", axis=None), color=encoding,
        tooltip=["feature:Q", "label:N", f"{colour}:{'N' if colour == 'cluster' else 'Q'}"],
    ).add_params(pick).properties(height=640)
    event = st.altair_chart(chart, width="stretch", on_select="rerun", key="feature_map_chart")
    chosen = ((event or {}).get("selection") or {}).get("pick") or []
    if chosen and "feature" in chosen[0]:
        nav.go(page="feature", feature=int(chosen[0]["feature"]))
        st.rerun()
