"""The feature page: top examples shaded token by token (hover for the value), interval samples by
quantile band, activation histogram, promoted/suppressed tokens, nearest features, per-label bars,
and the loss effect on demand. `?feature=N` in the URL selects the feature."""
from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import nav
from dashboard.render import STYLE, chips, md, feature_href, feature_links, shade_tokens
from sae.analyze.render import LOSS_PALETTE
from dashboard.runs import as_list, feature_record, feature_rows, features, read_meta

MAX_EXAMPLES = 20          # top examples shown
MAX_PER_BAND = 5           # interval samples shown per band
LOSS_EXAMPLES = 8          # top examples the loss effect is computed on


def show(runs, place) -> None:
    run = runs[place.run]
    frame = features(run)
    meta = read_meta(run)
    n_features = int(frame.index.max()) + 1 if len(frame) else 0
    feature = _choose(place, n_features)
    record = feature_record(frame, feature)

    st.title(f"Feature {feature}")
    label = record.get("auto_label") or record.get("top_tokens") or ""
    st.caption(md(run.describe()) + (f" · {md(label)}" if label else ""))
    from dashboard.views.explanation_box import show_for as show_explanation   # sae explain's output, if any
    show_explanation(run, feature)
    _figures(record, meta)

    left, right = st.columns([3, 2], gap="large")
    with left:
        top = feature_rows(run, "top_examples").rows(feature)[:MAX_EXAMPLES]
        _top_examples(run, place, feature, top, record, meta)
        _interval_examples(run, feature, record)
    with right:
        _histogram(run, feature, meta)
        _logit_effects(run, feature)
        _nearest(record, frame, place.run)
        _labels(record, meta)
        st.html(f'<a href="{feature_href(feature, place.run, "steer")}" target="_self">Steer with this feature →</a>')


def _choose(place, n_features: int) -> int:
    """The feature in the URL (default 0), with a number box and previous/next buttons that update it."""
    feature = place.feature if place.feature is not None else 0
    feature = min(max(feature, 0), max(n_features - 1, 0))
    st.session_state["feature_input"] = feature
    columns = st.sidebar.columns([3, 1, 1], vertical_alignment="bottom")
    columns[0].number_input("Feature", 0, max(n_features - 1, 0), step=1, key="feature_input",
                            on_change=lambda: nav.go(page="feature", feature=st.session_state["feature_input"]))
    columns[1].button("◀", key="feature_prev", disabled=feature <= 0,
                      on_click=lambda: nav.go(page="feature", feature=feature - 1))
    columns[2].button("▶", key="feature_next", disabled=feature >= n_features - 1,
                      on_click=lambda: nav.go(page="feature", feature=feature + 1))
    return feature


def _figures(record: dict, meta: dict) -> None:
    columns = st.columns(5)
    density = float(record.get("density") or 0.0)
    columns[0].metric("density", f"{density:.3e}" if density else "dead")
    columns[1].metric("max activation", f"{float(record.get('max_activation') or 0):.4g}")
    columns[2].metric("mean activation (when firing)", f"{float(record.get('mean_activation') or 0):.4g}")
    columns[3].metric("tokens fired", f"{int(record.get('n_fired') or 0):,}")
    best = record.get("best_label")
    if isinstance(best, str) and best:       # an unlabelled store's tables hold NaN here, not a label
        # the F1 is part of the value, not a delta: a delta is drawn as a change arrow
        columns[4].metric("best label (F1)", f"{best} ({float(record.get('best_label_f1') or 0):.2f})")


def _example_html(rows: list[dict], scale: float, effects: list | None = None) -> str:
    """Examples as shaded text; with effects, tokens are shaded by the loss change instead."""
    parts = [STYLE]
    for index, row in enumerate(rows):
        tokens = ["" if t is None else t for t in as_list(row.get("tokens"))]
        acts = [0.0 if a is None else float(a) for a in as_list(row.get("acts"))]
        center = row.get("center")
        if effects is not None and index < len(effects) and effects[index] is not None:
            effect = effects[index]
            titles = [f"loss change {e:+.4f} (activation {a:.3g})" if np.isfinite(e) else f"activation {a:.3g}"
                      for e, a in zip(effect, acts)]
            top = float(np.nanmax(np.abs(effect))) if np.isfinite(effect).any() else 0.0
            parts.append(shade_tokens(tokens, np.nan_to_num(effect), top or None, center=center, titles=titles,
                                      prefix=f"{float(row.get('activation', 0)):.3g}", palette=LOSS_PALETTE))
        else:
            parts.append(shade_tokens(tokens, acts, scale, center=center,
                                      prefix=f"{float(row.get('activation', 0)):.3g}"))
    return "".join(parts)


def _top_examples(run, place, feature: int, rows: list[dict], record: dict, meta: dict) -> None:
    st.subheader("Top activations")
    if not rows:
        st.info("This feature never fired on the analysed tokens (no examples).")
        return
    if not meta.get("has_contexts", True) or not as_list(rows[0].get("tokens")):
        st.info("The store had no token windows, so examples have no text.")
        return
    scale = float(record.get("max_activation") or 0) or None
    key = f"loss_effect_{place.run}_{feature}"
    effects = None
    if st.session_state.get(key):
        effects = _loss_effects(run, feature, rows[:LOSS_EXAMPLES])
    html = _example_html(rows, scale, effects)
    st.html(html)
    st.caption("Orange = activation (hover a token for its value); the outlined token is the one ranked. "
               + ("Green/purple now show the next-token loss change when this feature is removed "
                  "(green: the feature helped predict that token; purple: it hurt)." if effects else ""))
    if effects is None:
        if st.button("Compute loss effect", key=f"loss_button_{feature}",
                     help="Runs the model on the top examples with this feature's contribution removed "
                          "at the hooked site, and shades each token by how much its loss changes."):
            st.session_state[key] = True
            st.rerun()
    else:
        st.button("Show activations again", key=f"loss_hide_{feature}",
                  on_click=lambda: st.session_state.pop(key, None))


def _loss_effects(run, feature: int, rows: list[dict]) -> list | None:
    contexts = tuple(tuple(int(t) for t in as_list(row.get("token_ids"))) for row in rows)
    try:
        with st.spinner("Computing the loss effect…"):
            return _cached_loss_effects(str(run.path), feature, contexts)
    except Exception as error:  # noqa: BLE001 - the model may be unavailable: say so, keep the page
        st.warning(f"Loss effect unavailable: {error}")
        return None


@st.cache_data(show_spinner=False, max_entries=256)
def _cached_loss_effects(run_path: str, feature: int, contexts: tuple) -> list:
    """Per shown example, the loss change at each context token (cached per run and feature)."""
    from dashboard import live
    from pathlib import Path
    from sae.files import read_json
    config = read_json(Path(run_path) / "config.json")
    loaded = live.cached_model(config["model"])
    sae_model = live.cached_sae(run_path)
    bos = loaded.bos_id
    prefixed = [list(c) if (bos is None or not loaded.is_causal or (c and c[0] == bos)) else [bos, *c]
                for c in contexts]
    effects = live.loss_effect(loaded, sae_model, config["site"], config["layer"], feature, prefixed)
    return [e[len(p) - len(c):] for e, p, c in zip(effects, prefixed, contexts)]


def _interval_examples(run, feature: int, record: dict) -> None:
    table = feature_rows(run, "interval_examples", required=False)
    rows = table.rows(feature) if table is not None else []
    if not rows:
        return
    st.subheader("Interval samples")
    bands = {}
    for row in rows:
        bands.setdefault((float(row.get("band_lo", 0)), float(row.get("band_hi", 0)), row.get("band")), []).append(row)
    scale = float(record.get("max_activation") or 0) or None
    ordered = sorted(bands, key=lambda b: -b[0])
    tabs = st.tabs([f"{lo:.3g} – {hi:.3g}" for lo, hi, _ in ordered])
    for tab, band in zip(tabs, ordered):
        with tab:
            examples = sorted(bands[band], key=lambda r: -float(r.get("activation", 0)))[:MAX_PER_BAND]
            st.html(_example_html(examples, scale))


def _histogram(run, feature: int, meta: dict) -> None:
    st.subheader("Activation histogram")
    table = feature_rows(run, "histograms", required=False)
    rows = table.rows(feature) if table is not None else []
    edges = np.asarray(meta.get("hist_bin_edges") or [], dtype=float)
    if not rows or len(edges) < 2:
        st.caption("No histogram for this feature.")
        return
    bars = histogram_bars(as_list(rows[0].get("counts")), edges)
    if bars is None:
        st.caption("This feature never fired on the analysed tokens: no histogram.")
        return
    log = bool((bars["lo"] > 0).all())
    chart = alt.Chart(bars).mark_bar(color="#ff8000").encode(
        x=alt.X("lo:Q", bin="binned", scale=alt.Scale(type="log" if log else "linear", domain=[
            float(bars["lo"].iloc[0]), float(bars["hi"].iloc[-1])], nice=False),
                title=str(meta.get("histogram_of") or "activation")),
        x2="hi:Q", y=alt.Y("tokens:Q", title="tokens"), tooltip=["lo", "hi", "tokens"]).properties(height=200)
    st.altair_chart(chart, width="stretch")


def histogram_bars(counts, edges) -> pd.DataFrame | None:
    """The bins from the first to the last non-empty one (the axis fits the data); None when all are empty."""
    counts = np.asarray(counts, dtype=float)
    edges = np.asarray(edges, dtype=float)
    n = min(len(counts), len(edges) - 1)
    nonzero = np.flatnonzero(counts[:n] > 0)
    if not len(nonzero):
        return None
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    return pd.DataFrame({"lo": edges[lo:hi], "hi": edges[lo + 1:hi + 1], "tokens": counts[lo:hi]})


def _logit_effects(run, feature: int) -> None:
    table = feature_rows(run, "logit_effects", required=False)
    rows = table.rows(feature) if table is not None else []
    if not rows:
        return
    row = rows[0]
    st.subheader("Logit effect")
    st.caption("Tokens this feature's decoder direction promotes / suppresses through the unembedding.")
    st.html(STYLE + "<b>promoted</b>" + chips(as_list(row.get("promoted")), as_list(row.get("promoted_values")), True)
            + "<b>suppressed</b>" + chips(as_list(row.get("suppressed")), as_list(row.get("suppressed_values")),
                                          False))


def _nearest(record: dict, frame: pd.DataFrame, run_index: int) -> None:
    nearest = [int(f) for f in as_list(record.get("nearest"))]
    if not nearest:
        return
    cosines = [float(c) for c in as_list(record.get("nearest_cos"))] + [float("nan")] * len(nearest)
    labels = []
    for f, c in zip(nearest, cosines):
        name = frame.at[f, "auto_label"] if "auto_label" in frame.columns and f in frame.index else ""
        labels.append(f"cos {c:.2f}" + (f" · {name}" if isinstance(name, str) and name else ""))
    st.subheader("Nearest features (decoder cosine)")
    st.html(STYLE + feature_links(nearest, labels, run_index))


def _labels(record: dict, meta: dict) -> None:
    means = as_list(record.get("label_means"))
    names = meta.get("label_names") or [str(i) for i in range(len(means))]
    if not means or not any(np.isfinite(m) and m != 0 for m in means):   # a dead feature: no empty chart
        return
    st.subheader("Mean activation by label")
    bars = pd.DataFrame({"label": [str(n) for n in names[:len(means)]], "mean activation": means[:len(names)]})
    chart = alt.Chart(bars).mark_bar().encode(x=alt.X("mean activation:Q"), y=alt.Y("label:N", sort=None, axis=alt.Axis(labelOverlap=False)),
                                              tooltip=["label", "mean activation"]).properties(height=28 * len(bars) + 40)
    st.altair_chart(chart, width="stretch")
