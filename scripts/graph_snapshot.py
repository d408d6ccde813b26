"""A screenshot of the dashboard's attribution-graph page, taken with headless Chromium through Selenium (the
machinery of scripts/dashboard_snapshot.py; needs `make browser`).

    python scripts/graph_snapshot.py RUN --out PNG [--graph NAME] [--port P] [--serve]

serves RUN with `sae dashboard` (its graphs: RUN/graphs/*.json), opens ?page=graph, waits until the chart is
drawn, saves the screenshot and stops the server (--serve: keeps serving until Ctrl-C).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dashboard_snapshot import CHROME_FLAGS, wait_healthy  # noqa: E402


def take_graph(base_url: str, path, graph: str | None = None, timeout: float = 180) -> Path:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="sae-chrome-")
    for flag in CHROME_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    url = f"{base_url}/?page=graph" + (f"&graph={graph}" if graph else "")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    try:
        def painted(d):
            charts = d.find_elements(By.CSS_SELECTOR, "[data-testid='stVegaLiteChart']")
            alerts = d.find_elements(By.CSS_SELECTOR, "[data-testid='stAlert']")
            drawn = charts and all(c.find_elements(By.CSS_SELECTOR, "canvas, svg") for c in charts)
            return (drawn or alerts) and "page built in" in d.find_element(By.TAG_NAME, "body").text
        driver.get(url)
        WebDriverWait(driver, timeout, 0.25).until(painted)
        time.sleep(1.0)
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="serve runs with `sae dashboard` and screenshot the graph page")
    parser.add_argument("run", help="run folder with graphs/ (or a live-training RUN holding layer_L/ runs)")
    parser.add_argument("--out", required=True, metavar="PNG")
    parser.add_argument("--graph", default=None, help="the graph's name (file stem in graphs/; default: the first)")
    parser.add_argument("--port", type=int, default=8502)
    parser.add_argument("--serve", action="store_true", help="keep serving after the screenshot (Ctrl-C stops)")
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-m", "sae", "dashboard", str(args.run), "--port", str(args.port)])
    base = f"http://localhost:{args.port}"
    try:
        wait_healthy(base, alive=lambda: server.poll() is None)
        shot = take_graph(base, args.out, args.graph)
        print(f"graph page {base}/?page=graph  ·  screenshot: {shot}", file=sys.stderr, flush=True)
        if args.serve:
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
