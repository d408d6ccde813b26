"""Compare: two runs side by side; for a feature of one, its closest features in the other by decoder
cosine (the runs must share d_in)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard.render import feature_href, md, number
from dashboard.runs import DataProblem, decoder, features

TOP = 10


def closest(directions_a: np.ndarray, directions_b: np.ndarray, feature: int, top: int = TOP):
    """(indices, cosines) of the `top` rows of B closest to row `feature` of A (rows unit-norm)."""
    cosines = directions_b @ directions_a[feature]                  # [d_sae_b]
    top = min(top, len(cosines))
    order = np.argpartition(-cosines, top - 1)[:top]
    order = order[np.argsort(-cosines[order])]
    return order, cosines[order]


def _summary(run) -> dict:
    cfg = run.config or {}
    row = {"run": run.name, **{k: cfg.get(k) for k in ("model", "layer", "site", "variant", "d_in", "d_sae")}}
    try:
        import json
        figures = json.loads((run.path / "eval.json").read_text())
        row.update({k: figures.get(k) for k in ("fvu", "l0", "dead_fraction", "ce_loss_recovered")})
    except (OSError, ValueError):
        pass
    return {k: number(v) for k, v in row.items()}


def _label(run, feature: int) -> str:
    try:
        frame = features(run)
    except DataProblem:
        return ""
    if feature in frame.index and "auto_label" in frame.columns:
        value = frame.at[feature, "auto_label"]
        return value if isinstance(value, str) else ""
    return ""


def show(runs, place) -> None:
    st.title("Compare runs")
    usable = [i for i, run in enumerate(runs) if not run.problem]
    if len(usable) < 2:
        st.info("Compare needs two runs: start the dashboard with two run folders, "
                "e.g. `sae dashboard RUN_A RUN_B`.")
        return
    names = {i: f"{i}: {runs[i].describe()}" for i in usable}
    left, right = st.columns(2)
    a = left.selectbox("Run A", usable, index=usable.index(place.run) if place.run in usable else 0,
                       format_func=names.get, key="compare_a")
    b = right.selectbox("Run B", usable, index=1 if usable[0] == a else 0, format_func=names.get, key="compare_b")
    st.table(pd.DataFrame([_summary(runs[a]), _summary(runs[b])]).set_index("run"))   # numbers formatted (number)
    dec_a, dec_b = decoder(runs[a]), decoder(runs[b])
    if dec_a.directions.shape[1] != dec_b.directions.shape[1]:
        raise DataProblem(f"the runs have different input widths (d_in {dec_a.directions.shape[1]} vs "
                          f"{dec_b.directions.shape[1]}): their decoders cannot be compared")
    n_a = dec_a.directions.shape[0]
    feature = st.number_input(f"Feature of run A (0–{n_a - 1})", 0, n_a - 1,
                              min(max(place.feature or 0, 0), n_a - 1), step=1, key="compare_feature")
    order, cosines = closest(dec_a.directions, dec_b.directions, int(feature))
    st.markdown(f"Closest features in **{md(runs[b].name)}** to feature {feature} of **{md(runs[a].name)}**")
    table = pd.DataFrame({
        "feature": order.astype(int),
        "open": [feature_href(int(f), b) for f in order],
        "cosine": cosines.astype(float),
        "label": [_label(runs[b], int(f)) for f in order],
    })
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"open": st.column_config.LinkColumn("open", display_text="open ↗"),
                                "cosine": st.column_config.NumberColumn(format="%.3f")})
    st.html(f'<a href="{feature_href(int(feature), a)}" target="_self">Open feature {int(feature)} of run A</a>')
    _side_by_side(runs[a], int(feature), runs[b], int(order[0]), float(cosines[0]))


def _side_by_side(run_a, feature_a: int, run_b, feature_b: int, cosine: float, n: int = 4) -> None:
    """The top examples of A's feature beside those of its closest feature in B."""
    from dashboard.render import STYLE
    from dashboard.runs import feature_rows
    from dashboard.views.feature import _example_html
    left, right = st.columns(2)
    for column, run, feature, title in ((left, run_a, feature_a, f"A · feature {feature_a}"),
                                        (right, run_b, feature_b, f"B · feature {feature_b} (cos {cosine:.2f})")):
        column.markdown(f"**{md(title)}**")
        try:
            table = feature_rows(run, "top_examples", required=False)
        except DataProblem as problem:
            column.caption(md(str(problem)))
            continue
        rows = table.rows(feature)[:n] if table is not None else []
        if rows:
            column.html(STYLE + _example_html(rows, None))
        else:
            column.caption("no analysed examples")
