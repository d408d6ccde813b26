"""Every page of a small analysed run in Chromium (issue 20's first contact): what a new user saw go wrong is
gone. A real `sae analyze` of a store with a frequent, long-tailed feature and a dead one; two runs for the
compare page; eval.json as `sae eval` writes it (sparse_probing with its n_tasks/n_*_docs counts).

Needs /usr/bin/chromium and /usr/bin/chromedriver (`make browser`); skipped otherwise.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import test_dashboard_browser as shared
from test_dashboard_browser import free_port, nothing_ran, visible, wait_for, wait_healthy

pytestmark = shared.pytestmark          # slow; skipped without Debian's chromium and chromedriver
browser = shared.browser                # the same headless Chromium fixture

N_BANDS = 5
SERVER = {}          # the served process's pid, for the threading check
FVU = 0.0791522612075985


def make_run(path, store, model_dir, seed: int):
    from test_analyze import D_IN, D_SAE
    from sae import variants
    from sae.runs import save_run
    torch.manual_seed(seed)
    model = variants.create("relu", d_in=D_IN, d_sae=D_SAE)
    with torch.no_grad():
        model.b_enc.fill_(-1.0)
        model.b_enc[0] = 3.0            # feature 0 fires on (nearly) every token, values spread widely
        model.b_enc[1] = -1000.0        # feature 1 never fires
        model.input_scale.fill_(1.3)
    save_run(model, path, {"layer": 0, "site": "resid_post", "store": str(store), "model": str(model_dir)})
    return model


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    from dashboard_sample import tiny_model_dir
    from test_analyze import make_window_store
    from sae.analyze.pipeline import AnalyzeOptions, analyze
    root = tmp_path_factory.mktemp("pages")
    store = make_window_store(root / "store", n_shards=1, windows_per_shard=40)
    model_dir = tiny_model_dir(root / "model")
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        models[name] = make_run(root / name, store.path, model_dir, seed)
        analyze(root / name, store, options=AnalyzeOptions(n_bands=N_BANDS, per_band=3, with_model=False,
                                                           context_radius=3), log=None)
    (root / "a" / "eval.json").write_text(json.dumps({
        "fvu": FVU, "explained_variance": 1 - FVU, "mse": 0.012345678, "l0": 12.3456789, "dead_fraction": 0.025,
        "sparse_probing": {"1": 0.61234, "2": 0.7, "5": 0.8, "full": 0.9, "n_tasks": 3, "n_train_docs": 16,
                           "n_test_docs": 4}}))
    # brute force: feature 0's codes over the whole store, to know which bands hold tokens
    x = store.read_shard(0, "activations.0").float()
    with torch.no_grad():
        codes = models["a"].encode(x)[:, 0]
    return root, codes


@pytest.fixture(scope="module")
def served(analysed):
    root, _ = analysed
    port = free_port()
    log = root / "dashboard.log"
    env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SAE_THREADS")},
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "sae", "dashboard", str(root / "a"), str(root / "b"),
                                    "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                   start_new_session=True)
    try:
        wait_healthy(port, process, log)
        SERVER["pid"] = process.pid                    # `sae dashboard` became the server (exec)
        yield f"http://localhost:{port}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def page_text(driver, needle: str, timeout: float = 90) -> str:
    wait_for(driver, lambda d: needle in d.find_element("tag name", "body").text and
             "page built in" in d.find_element("tag name", "body").text, timeout=timeout, what=repr(needle))
    return driver.find_element("tag name", "body").text


def test_runs_page_lists_only_k_rows(served, browser):
    browser.get(f"{served}/")
    page_text(browser, "Sparse probing")
    text = page_text(browser, "k=1")          # the table may render a moment after its caption
    for key in ("k=1", "k=2", "k=5", "full", "0.612"):
        assert key in text, key
    for counted in ("n_tasks", "n_train_docs", "n_test_docs"):
        assert counted not in text, counted
    nothing_ran(browser)


def test_feature_page_bands_label_and_histogram(served, browser, analysed):
    _, codes = analysed
    top = float(codes.max())
    band_of = ((codes[codes > 0] / top) * N_BANDS).floor().clamp(max=N_BANDS - 1).long()
    assert len(torch.unique(band_of)) == N_BANDS          # every band of feature 0 holds tokens
    browser.get(f"{served}/?feature=0")
    page_text(browser, "Interval samples")
    tabs = [t.text for t in browser.find_elements("css selector", '[role="tab"]') if "–" in t.text]
    assert len(tabs) == N_BANDS, tabs                     # a tab per band: none missing at the top
    assert "best label (F1)" in browser.find_element("tag name", "body").text
    assert not browser.find_elements("css selector", '[data-testid="stMetricDelta"]')   # no change arrow
    wait_for(browser, visible('[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg'),
             what="the histogram")
    nothing_ran(browser)


def test_dead_feature_has_no_empty_chart(served, browser, analysed):
    root, _ = analysed
    features = pd.read_parquet(root / "a" / "analysis" / "features.parquet")
    assert features.density[features.feature == 1].item() == 0
    browser.get(f"{served}/?feature=1")
    text = page_text(browser, "never fired")
    assert "no histogram" in text
    time.sleep(1.0)
    assert not browser.find_elements("css selector", '[data-testid="stVegaLiteChart"]')


def test_steer_page_shows_the_features_scale(served, browser, analysed):
    root, _ = analysed
    record = pd.read_parquet(root / "a" / "analysis" / "features.parquet").set_index("feature").loc[0]
    browser.get(f"{served}/?page=steer&feature=0")
    text = page_text(browser, "typical activation")
    assert f"max {record.max_activation:.3g}" in text and f"typical activation {record.mean_activation:.3g}" in text
    strength = [e.get_attribute("value") for e in browser.find_elements("css selector", '[data-testid="stNumberInput"] input')]
    assert any(np.isclose(float(v), float(f"{2 * record.max_activation:.3g}")) for v in strength if v), strength


def test_compare_page_formats_numbers(served, browser):
    browser.get(f"{served}/?page=compare")
    text = page_text(browser, "Compare runs")
    wait_for(browser, lambda d: "0.07915" in d.find_element("tag name", "body").text, what="the formatted FVU")
    text = browser.find_element("tag name", "body").text
    assert str(FVU) not in text and "12.35" in text and "12.3456789" not in text


def test_every_other_page_opens_without_error(served, browser):
    for page, needle in (("features", "latents"), ("probe", "Live probe")):
        browser.get(f"{served}/?page={page}")
        page_text(browser, needle)
        assert not browser.find_elements("css selector", '[data-testid="stException"]')
        nothing_ran(browser)


def test_the_served_dashboard_never_spins(served):
    """sae.threads: the server process runs with OMP_WAIT_POLICY=PASSIVE, though the test's environment had none."""
    environ = open(f"/proc/{SERVER['pid']}/environ", "rb").read().split(b"\0")
    assert b"OMP_WAIT_POLICY=PASSIVE" in environ
