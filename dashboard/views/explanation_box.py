"""The explanation of one feature (analysis/explanations.parquet, written by `sae explain`) with its scores
beside their random-pairing controls; shown at the top of the feature page."""
from __future__ import annotations

import math

import streamlit as st

from dashboard import latent_data
from dashboard.render import md

SCORES = (("detection", "detection (balanced acc.)"), ("fuzzing", "fuzzing (balanced acc.)"),
          ("embedding", "embedding (AUROC)"))


def _fmt(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.2f}"


def show_for(run, feature: int) -> None:
    notes = latent_data.explanations(run)
    if notes is None or feature not in notes.index:
        return
    row = notes.loc[feature]
    st.markdown(f"**Explanation** ({md(row['explainer'])}): {md(row['explanation'])}")
    columns = st.columns(len(SCORES))
    for column, (key, title) in zip(columns, SCORES):
        column.metric(title, _fmt(row.get(key)), help=f"random-pairing control: {_fmt(row.get(key + '_control'))} "
                      "(the same explanation scored on another feature's contexts); chance is 0.5")
        column.caption(f"control {_fmt(row.get(key + '_control'))}")
