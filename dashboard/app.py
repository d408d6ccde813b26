"""The sae feature browser.

    sae dashboard RUN… [--port P] [--host H]
    streamlit run dashboard/app.py -- RUN…            (SAE_DASHBOARD_RUNS=RUN1:RUN2 also works)

Runs, Feature list, Feature (?feature=N), Live probe, Steer, Compare. It reads what `sae eval` and
`sae analyze` wrote; the model is loaded only by the probe, loss-effect and steering views.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by streamlit: make `dashboard` and `sae` importable from the
    # folder above (the checkout, or site-packages when installed), ahead of any `dashboard/` in the working directory
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # interactive and mostly idle: never spin (sae.threads);
                                                     # before torch loads (the live views import it later)
import streamlit as st  # noqa: E402

from dashboard import nav  # noqa: E402
from dashboard.runs import DataProblem, runs_from  # noqa: E402
from sae.errors import UserError  # noqa: E402

VIEWS = {key: importlib.import_module(f"dashboard.views.{module}").show for key, _, module in nav.PAGE_TABLE}


def run_paths() -> list[str]:
    """The runs to show: SAE_DASHBOARD_RUNS (os.pathsep-separated) or the arguments after `--`."""
    listed = os.environ.get("SAE_DASHBOARD_RUNS")
    if listed:
        return [p for p in listed.split(os.pathsep) if p]
    return [a for a in sys.argv[1:] if not a.startswith("-")]


def main() -> None:
    started = time.perf_counter()
    st.set_page_config(page_title="sae dashboard", layout="wide")
    paths = run_paths()
    if not paths:
        st.title("sae dashboard")
        st.error("No run given. Start it with `sae dashboard RUN…` "
                 "(or `streamlit run dashboard/app.py -- RUN…`).")
        return
    runs = runs_from(paths)
    place = nav.current(len(runs))
    nav.sidebar(runs, place)
    run = runs[place.run]
    if run.problem and place.page not in ("runs", "compare"):
        st.title(nav.PAGES[place.page])
        st.error(run.problem)
        return
    try:
        VIEWS[place.page](runs, place)
    except DataProblem as problem:
        st.error(str(problem))
    except UserError as error:
        st.error(str(error))
    except Exception as error:  # noqa: BLE001 - a bad file must give a message, not a traceback
        if os.environ.get("SAE_DEBUG") == "1":
            raise
        st.error(f"This page could not be shown: {type(error).__name__}: {error}")
    elapsed = time.perf_counter() - started
    st.session_state["render_seconds"] = elapsed      # read by scripts/bench_dashboard.py
    st.sidebar.caption(f"page built in {elapsed * 1000:.0f} ms")


main()
