"""The dashboard in a real browser: Debian's Chromium driven by Selenium against `sae dashboard` on a free
port. Opens a feature page (highlighted example and histogram visible), types into the live probe and
sees features, saves screenshots, and checks that injection strings in the corpus run nothing.

Needs /usr/bin/chromium and /usr/bin/chromedriver (`make browser` installs them as root); skipped
otherwise. Screenshots go to the test's tmp folder and are copied to tests/artifacts/.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"       # dashboard_snapshot.py: the screenshot helper

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="Debian chromium/chromium-driver not installed (run `make browser` as root)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def snapshot_helper():
    """scripts/dashboard_snapshot.py (`make demo`'s screenshot), imported from the scripts folder."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import dashboard_snapshot
    return dashboard_snapshot


def wait_healthy(port: int, process, log: Path, timeout: float = 120) -> None:
    snapshot = snapshot_helper()
    try:
        snapshot.wait_healthy(f"http://localhost:{port}", timeout, alive=lambda: process.poll() is None)
    except RuntimeError:
        how = "exited early" if process.poll() is not None else f"did not come up in {timeout}s"
        raise AssertionError(f"the dashboard {how}:\n{log.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A run with injection strings in its analysed corpus, served by `sae dashboard` on a free port."""
    import torch
    import sae.runs
    from sae import variants
    from dashboard_sample import tiny_model_dir, write_analysis

    root = tmp_path_factory.mktemp("browser")
    model_dir = tiny_model_dir(root / "model")
    run = root / "run"
    torch.manual_seed(0)
    sae_model = variants.create("relu", d_in=32, d_sae=64)
    with torch.no_grad():
        sae_model.b_enc.fill_(0.05)
    sae.runs.save_run(sae_model, run, {"model": str(model_dir), "layer": 1, "site": "resid_post"})
    (run / "eval.json").write_text(json.dumps({"fvu": 0.3, "explained_variance": 0.7, "mse": 0.1, "l0": 10.0,
                                              "dead_fraction": 0.0}))
    write_analysis(run, 64, n_top=8, radius=5)
    port = free_port()
    log = root / "dashboard.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "sae", "dashboard", str(run), "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                   start_new_session=True)
    try:
        wait_healthy(port, process, log)
        yield {"url": f"http://localhost:{port}", "root": root, "log": log}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)   # the group this fixture started
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float = 60, what: str = "element"):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; page text:\n{driver.find_element('tag name', 'body').text[:2000]}") from None


def visible(css: str):
    from selenium.webdriver.common.by import By

    def find(driver):
        found = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        return found or False
    return find


def no_alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def nothing_ran(driver) -> None:
    assert no_alert(driver), "an alert opened"
    assert driver.execute_script("return window.__sae_pwned === undefined"), "an injected payload ran"


def save(driver, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    return shot


def test_feature_page_in_chromium(server, browser, tmp_path):
    from dashboard_sample import INJECTIONS
    browser.get(f"{server['url']}/?feature=0")
    centers = wait_for(browser, visible("span.tok.center"), what="a highlighted top example")
    background = centers[0].value_of_css_property("background-color")
    assert background not in ("rgba(0, 0, 0, 0)", "transparent"), background   # it is shaded
    assert centers[0].get_attribute("title")                                      # hover shows the value
    wait_for(browser, visible('[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg'),
             what="the activation histogram")
    assert "Feature 0" in browser.find_element("tag name", "h1").text
    time.sleep(1.0)  # let every block paint before the screenshot
    shot = save(browser, tmp_path, "dashboard_feature.png")
    print(f"screenshot: {shot}")
    # the payloads sit in feature 0's top examples and promoted tokens: shown as text, never run
    text = browser.find_element("tag name", "body").text
    for payload in INJECTIONS:
        assert payload in text, f"{payload!r} is not shown as text"
    nothing_ran(browser)
    assert not browser.find_elements("css selector", "img[src='x'], svg[onload]")


def test_live_probe_in_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    browser.get(f"{server['url']}/?page=probe")
    area = wait_for(browser, visible('[data-testid="stTextArea"] textarea'), what="the probe's text box")[0]
    area.send_keys(Keys.CONTROL, "a")
    area.send_keys(Keys.DELETE)
    area.send_keys('the market shares rose <img src=x onerror="window.__sae_pwned=9"> and the film won')
    button = wait_for(browser, visible('[data-testid="stFormSubmitButton"] button'), what="the probe button")[0]
    button.click()
    wait_for(browser, lambda d: "Top features over the text" in d.find_element(By.TAG_NAME, "body").text,
             timeout=120, what="the probe's feature table")
    spans = wait_for(browser, visible("span.tok"), what="shaded probe tokens")
    assert any("#" in (s.get_attribute("title") or "") for s in spans)           # hover names the features
    links = [a.get_attribute("href") for a in wait_for(browser, visible(".sae-links a"), what="feature links")]
    assert links and all("?feature=" in href for href in links)
    assert wait_for(browser, visible('[data-testid="stDataFrame"]'), what="the feature table")
    save(browser, tmp_path, "dashboard_probe.png")
    nothing_ran(browser)
    # a feature link from the probe opens that feature's page
    browser.get(links[0])
    wait_for(browser, visible("span.tok.center"), what="the linked feature page")
    nothing_ran(browser)


def test_served_on_localhost_only(server):
    """Nothing answers on the machine's other addresses (the default --host is localhost)."""
    port = int(server["url"].rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))        # no packet is sent: this only picks an interface
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback address to check")
    with socket.socket() as other:
        other.settimeout(3)
        assert other.connect_ex((address, port)) != 0, f"the dashboard answers on {address}"


def test_screenshot_helper_reports_build_time(server, tmp_path):
    """What scripts/dashboard_snapshot.py prints at the end of `make demo`: a screenshot and the build time."""
    snapshot = snapshot_helper()
    shot = snapshot.take(server["url"], 3, tmp_path / "shot.png")
    assert shot.path.stat().st_size > 10_000 and shot.url.endswith("?feature=3")
    assert shot.build_ms is not None and 0 < shot.build_ms < 60_000
