"""Screenshots of the Search, Feature map, Poorly reconstructed, Similar contexts and feature (with its
explanation) pages of a served run, with Debian's headless Chromium through Selenium (as
scripts/dashboard_snapshot.py, whose helpers it uses).

    python scripts/latent_snapshots.py demo/topk --out docs/img [--port 8531] [--feature N] [--query WORDS]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> None:
    from dashboard_snapshot import CHROME_FLAGS, example_feature, wait_healthy
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--port", type=int, default=8531)
    parser.add_argument("--feature", type=int, default=None, help="feature page shown (default: first that fired)")
    parser.add_argument("--query", default="sport", help="text typed into the explanation search")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "sae", "dashboard", args.run, "--port", str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://localhost:{args.port}"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="sae-chrome-")
    for flag in CHROME_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    driver = None
    try:
        wait_healthy(base, alive=lambda: server.poll() is None)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                                  options=options)
        feature = args.feature if args.feature is not None else example_feature(args.run)

        def shot(url: str, name: str, typed: str | None = None, label: str | None = None) -> None:
            driver.get(base + url)
            deadline = time.time() + 180
            while time.time() < deadline and "page built in" not in driver.find_element(By.TAG_NAME, "body").text:
                time.sleep(0.5)
            if typed is not None:
                box = driver.find_element(By.CSS_SELECTOR, f"input[aria-label='{label}']")
                box.send_keys(typed + Keys.ENTER)
                time.sleep(4)
            time.sleep(2)
            driver.save_screenshot(str(out / name))
            print(f"wrote {out / name}")

        shot(f"/?page=feature&feature={feature}", "explain_feature.png")
        shot("/?page=search", "search_text.png", args.query, "Words the explanation should contain")
        shot("/?page=map", "feature_map.png")
        shot("/?page=anomalies", "poorly_reconstructed.png")
        shot("/?page=similar", "similar_contexts.png")
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
