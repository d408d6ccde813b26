"""Search: features by explanation text (ranked), by token (from analyze's per-token statistics), by a
typed prompt (the features that fire on it, and at which tokens) and by contrast between two sets of texts.
Text and token search read files only; prompt and contrast run the model, on request."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import latent_data
from dashboard.render import STYLE, escape, feature_href, md, shade_tokens
from dashboard.runs import DataProblem, features

MODES = ("Explanation text", "Token", "Prompt", "Contrast")


def show(runs, place) -> None:
    run = runs[place.run]
    st.title("Search")
    st.caption(md(run.describe()))
    mode = st.radio("Search by", MODES, horizontal=True, key="search_mode")
    if mode == MODES[0]:
        _by_text(run, place)
    elif mode == MODES[1]:
        _by_token(run, place)
    elif mode == MODES[2]:
        _by_prompt(run, place)
    else:
        _by_contrast(run, place)


def _labels(run, feature_ids) -> list[str]:
    frame = features(run)
    notes = latent_data.explanations(run)
    out = []
    for f in feature_ids:
        if notes is not None and f in notes.index:
            out.append(str(notes.at[f, "explanation"]))
        elif f in frame.index and isinstance(frame.at[f, "auto_label"], str):
            out.append(frame.at[f, "auto_label"])
        else:
            out.append("")
    return out


def _results(run, place, frame: pd.DataFrame, columns: list[str]) -> None:
    """A table of features with a link each (opens the feature page)."""
    if frame.empty:
        st.info("Nothing found.")
        return
    ids = [int(f) for f in frame["feature"]]
    labels = _labels(run, ids)
    rows = []
    for f, label, record in zip(ids, labels, frame.to_dict("records")):
        values = " · ".join(f"{c} {record[c]:.3g}" for c in columns if c in record)
        rows.append(f'<div class="sae-ex"><a href="{feature_href(f, place.run)}" target="_self">feature {f}</a> '
                    f'<span class="sae-val">{escape(values)}</span> {escape(label)}</div>')
    st.html(STYLE + "".join(rows))


def _by_text(run, place) -> None:
    index = latent_data.text_index(run)
    if index is None:
        st.info(f"No explanations yet: run `sae explain --run {run.path} --activations STORE` first.")
        return
    query = st.text_input("Words the explanation should contain", key="search_text")
    if query:
        _results(run, place, latent_data.search_text(index, query), ["similarity"])


def _by_token(run, place) -> None:
    tokens = latent_data.table(run, "token_features")
    if tokens is None:
        raise DataProblem(f"{run.name} has no token statistics (analysis/token_features.parquet): run "
                          "`sae analyze` again with this version")
    text = st.text_input("Token (as it is spelled in the text, e.g. `market`)", key="search_token")
    if text:
        found = latent_data.search_token(tokens, text)
        if not found.empty:
            st.caption(f"{int(found['count'].max()):,} occurrences of {md(text.strip())!s} in the analysed tokens; "
                       "score = mean code on the token / the feature's largest code")
        _results(run, place, found, ["score", "mean_activation", "fire_rate"])


def _model(run):
    from dashboard import live
    cfg = run.config or {}
    if not cfg.get("model") or cfg.get("site") is None or cfg.get("layer") is None:
        raise DataProblem(f"{run.name}'s config.json does not name its model, site and layer")
    return live.cached_model(str(cfg["model"])), live.cached_sae(str(run.path)), cfg["site"], cfg["layer"]


@st.cache_data(show_spinner=False, max_entries=64)
def _codes(run_path: str, model: str, site: str, layer, text: str):
    from dashboard import live
    return latent_data.text_codes(live.cached_model(model), live.cached_sae(run_path), site, layer, text)


def _by_prompt(run, place) -> None:
    with st.form("search_prompt_form"):
        text = st.text_area("Text", "The match ended in a draw after a late goal.", key="search_prompt")
        go = st.form_submit_button("Find features")
    if not go and not st.session_state.get("search_prompt_done"):
        return
    st.session_state["search_prompt_done"] = True
    cfg = run.config or {}
    _model(run)
    with st.spinner("Running the model…"):
        tokens, codes = _codes(str(run.path), str(cfg["model"]), cfg["site"], cfg["layer"], text)
    peak = codes.max(axis=0)
    order = [int(f) for f in peak.argsort()[::-1][:20] if peak[f] > 0]
    rows = []
    for f, label in zip(order, _labels(run, order)):
        rows.append(f'<div><a href="{feature_href(f, place.run)}" target="_self">feature {f}</a> '
                    f'<span class="sae-val">max {peak[f]:.3g}</span> {escape(label)}'
                    + shade_tokens(tokens, codes[:, f].tolist(), float(peak[f])) + "</div>")
    st.html(STYLE + "".join(rows) if rows else "<p>No feature fires on this text.</p>")


def _by_contrast(run, place) -> None:
    with st.form("search_contrast_form"):
        left, right = st.columns(2)
        a = left.text_area("Set A: one text per line (the features should fire here)", key="contrast_a",
                           value="The striker scored a goal.\nThe team won the match.")
        b = right.text_area("Set B: one text per line (… and not here)", key="contrast_b",
                            value="The company reported profits.\nThe minister gave a speech.")
        go = st.form_submit_button("Contrast")
    if not go and not st.session_state.get("contrast_done"):
        return
    st.session_state["contrast_done"] = True
    cfg = run.config or {}
    _model(run)
    texts_a = [t for t in a.splitlines() if t.strip()]
    texts_b = [t for t in b.splitlines() if t.strip()]
    if not texts_a or not texts_b:
        st.warning("Give at least one text in each set.")
        return
    with st.spinner("Running the model…"):
        codes_a = [_codes(str(run.path), str(cfg["model"]), cfg["site"], cfg["layer"], t)[1] for t in texts_a]
        codes_b = [_codes(str(run.path), str(cfg["model"]), cfg["site"], cfg["layer"], t)[1] for t in texts_b]
    _results(run, place, latent_data.contrast(codes_a, codes_b), ["score", "fires_in_A", "fires_in_B"])
