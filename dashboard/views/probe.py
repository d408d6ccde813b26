"""Live probe: the run's model and SAE on text the user types; each token shaded by its strongest
feature (hover lists the top ones), and a table of the features that fire most over the text."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.render import STYLE, escape, md, feature_href, shade_tokens
from dashboard.runs import DataProblem, features

EXAMPLE = "The Prime Minister told Parliament that the economy grew faster than expected."


@st.cache_data(show_spinner=False, max_entries=64)
def _cached_probe(run_path: str, model: str, site: str, layer, text: str):
    from dashboard import live
    loaded = live.cached_model(model)
    sae_model = live.cached_sae(run_path)
    return live.probe(loaded, sae_model, site, layer, text)


def run_probe(run, text: str):
    """The Probe for this run and text (cached); model problems become DataProblem messages."""
    cfg = run.config or {}
    missing = [k for k in ("model", "site", "layer") if cfg.get(k) is None]
    if missing:
        raise DataProblem(f"{run.name}'s config.json does not name its {', '.join(missing)}, "
                          "so the live views cannot run the model")
    try:
        return _cached_probe(str(run.path), str(cfg["model"]), str(cfg["site"]), cfg["layer"], text)
    except DataProblem:
        raise
    except Exception as error:  # noqa: BLE001 - show why the model or SAE did not load
        raise DataProblem(f"could not run {cfg['model']!r} with this SAE: {error}") from None


def show(runs, place) -> None:
    run = runs[place.run]
    st.title("Live probe")
    st.caption(f"{md(run.describe())} · the model and SAE run on your text (loaded once, then cached).")
    with st.form("probe_form"):
        text = st.text_area("Text", value=st.session_state.get("probe_text", EXAMPLE), height=120,
                            key="probe_input")
        submitted = st.form_submit_button("Find features")
    if submitted:
        st.session_state["probe_text"] = text
    text = st.session_state.get("probe_text")
    if not text or not text.strip():
        st.info("Type or paste some text and press **Find features**.")
        return
    with st.spinner("Running the model…"):
        result = run_probe(run, text)
    if not result.feature_max:
        st.warning("No feature fired on this text.")
        return
    try:
        frame = features(run)
    except DataProblem:
        frame = None

    ranked = sorted(result.feature_max, key=lambda f: -abs(result.feature_max[f]))
    options = ["strongest feature per token"] + [f"feature {f}" for f in ranked]
    choice = st.selectbox("Shade tokens by", options, key="probe_shade")
    if choice == options[0]:
        values = result.top_values[:, 0]
        titles = [" · ".join(f"#{int(f)} {float(v):.3g}" for f, v in zip(fs, vs) if float(v) != 0) or "none"
                  for fs, vs in zip(result.top_features, result.top_values)]
    else:
        chosen = int(choice.split()[-1])
        values = result.codes_of[chosen]
        titles = [f"#{chosen} {float(v):.3g}" for v in values]
    titles = [t if not special else "special token (left out)" for t, special in zip(titles, result.special)]
    st.html(STYLE + shade_tokens(result.tokens, values, None, titles=titles))

    st.subheader("Top features over the text")
    table = pd.DataFrame({
        "feature": ranked,
        "open": [feature_href(f, place.run) for f in ranked],
        "max": [result.feature_max[f] for f in ranked],
        "mean": [result.feature_mean[f] for f in ranked],
        "tokens fired": [result.feature_count[f] for f in ranked],
    })
    if frame is not None and "auto_label" in frame.columns:
        table["label"] = [str(frame.at[f, "auto_label"]) if f in frame.index else "" for f in ranked]
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"open": st.column_config.LinkColumn("open", display_text="open ↗"),
                                "max": st.column_config.NumberColumn(format="%.3f"),
                                "mean": st.column_config.NumberColumn(format="%.3f")})
    st.html(STYLE + '<div class="sae-links">' + "".join(
        f'<a href="{feature_href(f, place.run)}" target="_self">#{f}</a>' for f in ranked[:10])
        + f'<span style="color:#666"> ({escape(len(result.tokens))} tokens)</span></div>')
