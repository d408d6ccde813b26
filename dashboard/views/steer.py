"""Steer: generate from the run's model with a feature's decoder direction added at the hooked site
(x + s·W_dec[j]) or the feature clamped to c (x + (c − f_j(x))·W_dec[j]), beside the unsteered text
from the same prompt and seed."""
from __future__ import annotations

import streamlit as st

from dashboard import nav
from dashboard.render import md
from dashboard.runs import DataProblem, features

STRENGTH_MULTIPLE = 2.0    # the default strength / clamp value: this many times the feature's max activation
FALLBACK_STRENGTH = 8.0    # without an analysis


def scale_of(run, feature: int) -> tuple[float | None, float | None]:
    """(typical, max) activation of the feature from the analysis (mean when firing, max), or (None, None)."""
    try:
        frame = features(run)
    except DataProblem:
        return None, None
    if feature not in frame.index:
        return None, None
    record = frame.loc[feature]
    typical, top = float(record.get("mean_activation", 0) or 0), float(record.get("max_activation", 0) or 0)
    return (typical if typical > 0 else None), (top if top > 0 else None)


def default_strength(top: float | None) -> float:
    return float(f"{STRENGTH_MULTIPLE * top:.3g}") if top else FALLBACK_STRENGTH

PROMPT = "I think that"


@st.cache_data(show_spinner=False, max_entries=64)
def _cached_generation(run_path: str, model: str, site: str, layer, prompt: str, seed: int, max_new_tokens: int,
                       temperature: float, feature: int | None, mode: str, value: float) -> str:
    from dashboard import live
    loaded = live.cached_model(model)
    steer = None
    if feature is not None:
        steer = live.steer_fn(live.cached_sae(run_path), feature, mode, value)
    return live.generate(loaded, prompt, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                         steer=steer, site=site, layer=layer)


def show(runs, place) -> None:
    run = runs[place.run]
    cfg = run.config or {}
    st.title("Steer")
    if not cfg.get("model") or cfg.get("site") is None or cfg.get("layer") is None:
        raise DataProblem(f"{run.name}'s config.json does not name its model, site and layer, "
                          "so it cannot steer")
    d_sae = int(cfg.get("d_sae") or 1)
    feature = min(max(place.feature or 0, 0), d_sae - 1)
    typical, max_act = scale_of(run, feature)
    if st.session_state.get("steer_synced") != feature:  # the URL changed: it wins over the box
        st.session_state["steer_feature"] = feature
        st.session_state["steer_synced"] = feature
        st.session_state["steer_value"] = default_strength(max_act)   # a new feature: a strength on its scale
    st.caption(f"{md(run.describe())} · generation at {md(cfg['site'])}, layer {md(cfg['layer'])}")
    if max_act:
        st.info(f"Feature {feature}: typical activation {typical or 0:.3g} (mean when firing), "
                f"max {max_act:.3g}. The default strength is {STRENGTH_MULTIPLE:g} × max.")
    else:
        st.caption(f"Feature {feature} has no analysed activations (run `sae analyze`, or it never fired): "
                   "no scale to suggest a strength from.")
    with st.form("steer_form"):
        top = st.columns([1, 1, 1])
        top[0].number_input("Feature", 0, d_sae - 1, step=1, key="steer_feature")
        mode = top[1].radio("Mode", ["add", "clamp"], horizontal=True, key="steer_mode",
                            help="add: x + s·W_dec[j] at every position; clamp: x + (c − f_j(x))·W_dec[j]")
        value = top[2].number_input("Strength s / clamp value c", step=1.0, key="steer_value",
                                    help="In activation units: the feature's max activation is shown above")
        prompt = st.text_area("Prompt", PROMPT, key="steer_prompt", height=80)
        row = st.columns(3)
        seed = row[0].number_input("Seed", 0, 2**31 - 1, 0, step=1, key="steer_seed")
        max_new = row[1].number_input("New tokens", 1, 200, 30, step=1, key="steer_tokens")
        temperature = row[2].number_input("Temperature (0 = greedy)", 0.0, 5.0, 0.7, step=0.1, key="steer_temp")
        submitted = st.form_submit_button("Generate")
    chosen = int(st.session_state["steer_feature"])
    if chosen != feature:  # the box changed: put it in the URL
        st.session_state["steer_synced"] = chosen
        nav.go(feature=chosen)
    if not submitted and not st.session_state.get("steer_done"):
        st.info("Pick a mode and strength and press **Generate**.")
        return
    st.session_state["steer_done"] = True
    site = str(cfg["site"])
    if cfg.get("transcoder"):   # a transcoder's feature directions live in its target site (the MLP output)
        if mode == "clamp":
            raise DataProblem("clamping a transcoder feature needs its code from the MLP input while editing "
                              "the MLP output: use add (s × the feature's output direction at the MLP output)")
        site = str(cfg.get("target_site") or "mlp_out")
    args = (str(run.path), str(cfg["model"]), site, cfg["layer"], prompt, int(seed), int(max_new),
            float(temperature))
    try:
        with st.spinner("Generating…"):
            plain = _cached_generation(*args, None, "add", 0.0)
            steered = _cached_generation(*args, chosen, mode, float(value))
    except Exception as error:  # noqa: BLE001 - the model may be unavailable: say why
        raise DataProblem(f"could not generate with {cfg['model']!r}: {error}") from None
    left, right = st.columns(2)
    left.markdown("**Unsteered**")
    left.text(prompt + plain)
    right.markdown(f"**Steered: feature {chosen}, {mode} {'s' if mode == 'add' else 'c'} = {value:g}**")
    right.text(prompt + steered)
