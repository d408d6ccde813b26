"""Interpolate: the codes z_a and z_b of the last tokens of two stored contexts are mixed, (1 − t)·z_a +
t·z_b, decoded and spliced into the model at the run's site for context a's last token (every other
position carries the SAE's reconstruction too); the page shows how the next-token predictions move with t."""
from __future__ import annotations

import altair as alt
import numpy as np
import streamlit as st

from dashboard import latent_data
from dashboard.render import STYLE, escape, md
from dashboard.runs import DataProblem, read_meta


@st.cache_data(show_spinner=False, max_entries=32)
def _run(run_path: str, model: str, site: str, layer, ids_a: tuple, ids_b: tuple, steps: int):
    from dashboard import live
    return latent_data.interpolate(live.cached_model(model), live.cached_sae(run_path), site, layer,
                                   list(ids_a), list(ids_b), np.linspace(0, 1, steps))


def show(runs, place) -> None:
    run = runs[place.run]
    cfg = run.config or {}
    st.title("Interpolate")
    if not cfg.get("model") or cfg.get("site") is None or cfg.get("layer") is None:
        raise DataProblem(f"{run.name}'s config.json does not name its model, site and layer")
    meta = read_meta(run)
    st.caption(md(run.describe()) + " · decode (1 − t)·z_a + t·z_b at context a's last token through the "
               "spliced model")
    with st.form("interpolate_form"):
        columns = st.columns(5)
        shard_a = columns[0].text_input("Context a: shard", "shard_00000.safetensors", key="interp_shard_a")
        window_a = columns[1].number_input("window", 0, None, 0, key="interp_window_a")
        end_a = columns[2].number_input("last position", 1, None, 24, key="interp_end_a")
        steps = columns[3].number_input("steps of t", 2, 21, 11, key="interp_steps")
        columns = st.columns(5)
        shard_b = columns[0].text_input("Context b: shard", "shard_00000.safetensors", key="interp_shard_b")
        window_b = columns[1].number_input("window ", 0, None, 1, key="interp_window_b")
        end_b = columns[2].number_input("last position ", 1, None, 24, key="interp_end_b")
        go = st.form_submit_button("Interpolate")
    ids_a, tokens_a = latent_data.window_tokens(run, meta, shard_a, int(window_a))
    ids_b, tokens_b = latent_data.window_tokens(run, meta, shard_b, int(window_b))
    ids_a, ids_b = ids_a[: int(end_a) + 1], ids_b[: int(end_b) + 1]
    st.html(STYLE + f'<div class="sae-ex"><b>a</b> {escape("".join(tokens_a[:len(ids_a)]))}</div>'
            f'<div class="sae-ex"><b>b</b> {escape("".join(tokens_b[:len(ids_b)]))}</div>')
    if not go and not st.session_state.get("interp_done"):
        st.info("Pick two contexts and press **Interpolate**.")
        return
    st.session_state["interp_done"] = True
    with st.spinner("Running the model…"):
        frame = _run(str(run.path), str(cfg["model"]), str(cfg["site"]), cfg["layer"], tuple(ids_a), tuple(ids_b),
                     int(steps))
    shown = frame[frame["rank"] < 3]["token"].unique().tolist()
    lines = frame[frame["token"].isin(shown)].copy()
    lines["token"] = lines["token"].map(repr)
    chart = alt.Chart(lines).mark_line(point=True).encode(
        x=alt.X("t:Q"), y=alt.Y("probability:Q"), color=alt.Color("token:N"),
        tooltip=["t", "token", "probability"]).properties(height=320)
    st.altair_chart(chart, width="stretch")
    top = frame[frame["rank"] == 0][["t", "token", "probability"]].copy()
    top["token"] = top["token"].map(repr)
    st.dataframe(top, hide_index=True)
