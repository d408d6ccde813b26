"""Where the user is: the page, run and feature live in the URL's query string, so every view can be
shared and reloaded (`/?feature=N` opens feature N of the first run)."""
from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

# The one list of pages, in sidebar order: (key in ?page=, title, module of dashboard/views/ whose
# show(runs, place) draws it). Named, not imported: the views import this module (app.py imports them).
PAGE_TABLE = (
    ("runs", "Runs", "runs_page"),
    ("features", "Feature list", "feature_list"),
    ("feature", "Feature", "feature"),
    ("search", "Search", "search"),
    ("map", "Feature map", "feature_map"),
    ("probe", "Live probe", "probe"),
    ("steer", "Steer", "steer"),
    ("compare", "Compare", "compare"),
    ("graph", "Attribution graph", "graph"),
    ("anomalies", "Poorly reconstructed", "anomalies"),
    ("similar", "Similar contexts", "similar"),
    ("interpolate", "Interpolate", "interpolate"),
)
PAGES = {key: title for key, title, _ in PAGE_TABLE}          # key -> title


@dataclass
class Place:
    page: str
    run: int
    feature: int | None


def _int(value, default=None):
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return default


def current(n_runs: int) -> Place:
    """The place the query string names (bad or missing values fall back to the defaults)."""
    params = st.query_params
    feature = _int(params.get("feature"))
    page = params.get("page")
    if page not in PAGES:
        page = "feature" if feature is not None else "runs"
    run = _int(params.get("run"), 0)
    run = run if 0 <= run < max(n_runs, 1) else 0
    return Place(page=page, run=run, feature=feature)


def go(page: str | None = None, run: int | None = None, feature: int | None = None) -> None:
    """Update the query string (call from a callback, or follow with st.rerun())."""
    if page is not None:
        st.query_params["page"] = page
    if run is not None:
        if run:
            st.query_params["run"] = str(run)
        elif "run" in st.query_params:
            del st.query_params["run"]
    if feature is not None:
        st.query_params["feature"] = str(int(feature))


def sidebar(runs, place: Place) -> None:
    """Run chooser and page chooser, kept in step with the query string."""
    labels = list(PAGES.values())
    keys = list(PAGES)
    st.session_state["nav_page"] = PAGES[place.page]
    st.sidebar.radio("Page", labels, key="nav_page",
                     on_change=lambda: go(page=keys[labels.index(st.session_state["nav_page"])]))
    if len(runs) > 1:
        names = [f"{i}: {run.describe()}" for i, run in enumerate(runs)]
        st.session_state["nav_run"] = names[place.run]
        st.sidebar.selectbox("Run", names, key="nav_run",
                             on_change=lambda: go(run=names.index(st.session_state["nav_run"])))
    elif runs:
        st.sidebar.caption(runs[0].describe())
