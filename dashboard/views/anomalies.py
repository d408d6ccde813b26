"""Poorly reconstructed: the stored context windows with the highest reconstruction error (an anomaly
score: the mean of ‖x − x̂‖² over the window's tokens, divided by the store's mean ‖x‖²), each token
shaded by its own error."""
from __future__ import annotations

import numpy as np
import streamlit as st

from dashboard import latent_data
from dashboard.render import STYLE, escape, md, shade_tokens
from dashboard.runs import DataProblem

SHOWN = 25


def show(runs, place) -> None:
    run = runs[place.run]
    st.title("Poorly reconstructed")
    table = latent_data.table(run, "anomalies")
    if table is None:
        raise DataProblem(f"{run.name} has no anomalies.parquet: run `sae analyze` again with this version")
    st.caption(md(run.describe()) + f" · {len(table):,} windows ranked by reconstruction error "
               "(mean ‖x − x̂‖² over the window / the store's mean ‖x‖²); darker = worse reconstructed token")
    errors = table["error"].to_numpy()
    if len(errors):
        st.caption(f"median {np.median(errors):.3g} · 90th percentile {np.quantile(errors, 0.9):.3g} · "
                   f"worst {errors.max():.3g}")
    start = st.number_input("First rank shown", 0, max(len(table) - 1, 0), 0, step=SHOWN, key="anomaly_start")
    parts = [STYLE]
    for rank, row in enumerate(table.iloc[int(start):int(start) + SHOWN].itertuples(), start=int(start)):
        tokens = list(row.tokens) if getattr(row, "tokens", None) is not None else None
        head = (f"#{rank} · error {row.error:.3g} · {escape(row.shard)} window {int(row.window_index)} · "
                f"doc {int(row.doc_id)}")
        if tokens is None:
            parts.append(f'<div class="sae-ex">{head} (tokens kept for the worst windows only)</div>')
            continue
        values = [0.0 if v is None or not np.isfinite(v) else float(v) for v in row.token_errors]
        parts.append(f"<div>{head}</div>" + shade_tokens(tokens, values, float(np.max(values) or 1.0)))
    st.html("".join(parts))
