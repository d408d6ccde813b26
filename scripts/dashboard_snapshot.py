"""A screenshot of a served feature page, taken with Debian's headless Chromium through Selenium, and
the page's own build time (the "page built in N ms" line in the sidebar) on a warm reload.

    python scripts/dashboard_snapshot.py RUN --out PNG [--port P] [--host H]

serves RUN with `sae dashboard`, saves a screenshot of a feature page once it answers, prints its path
and the page's build time, and keeps serving until Ctrl-C (the last step of `make demo`). Needs Debian's
chromium and chromium-driver (`make browser`) and selenium (the `test` extra). tests/test_dashboard_browser.py
imports wait_healthy and take from here.
"""
from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1800")


@dataclass
class Snapshot:
    path: Path
    url: str
    build_ms: float | None        # the warm page's own build time, from its sidebar caption
    load_s: float                 # browser navigation until the highlighted example is visible (warm)


def wait_healthy(base_url: str, timeout: float = 120, alive=lambda: True) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        try:
            with urllib.request.urlopen(f"{base_url}/_stcore/health", timeout=2) as reply:
                if reply.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the dashboard did not answer at {base_url}")


def example_feature(run_dir) -> int:
    """A feature worth showing: the first one that fired (0 when the table cannot be read)."""
    try:
        import pyarrow.parquet as pq
        table = pq.read_table(Path(run_dir) / "analysis" / "features.parquet", columns=["feature", "density"])
        alive = [f for f, d in zip(table["feature"].to_pylist(), table["density"].to_pylist()) if d and d > 0]
        return int(alive[0]) if alive else 0
    except Exception:  # noqa: BLE001 - any problem: the page itself will explain it
        return 0


def take(base_url: str, feature: int, path, timeout: float = 180) -> Snapshot:
    """Open ?feature=N twice (cold, then warm), screenshot the warm page."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="sae-chrome-")
    for flag in CHROME_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    url = f"{base_url}/?feature={feature}"
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        def shown(d):  # the page finished building: a shaded example (or a message) and the timing line
            return (any(e.is_displayed() for e in d.find_elements(By.CSS_SELECTOR, "span.tok.center, [data-testid='stAlert']"))
                    and "page built in" in d.find_element(By.TAG_NAME, "body").text)

        def painted(d):  # charts drawn
            return all(c.find_elements(By.CSS_SELECTOR, "canvas, svg")
                       for c in d.find_elements(By.CSS_SELECTOR, "[data-testid='stVegaLiteChart']"))
        driver.get(url)
        WebDriverWait(driver, timeout, 0.25).until(shown)
        start = time.perf_counter()
        driver.get(url)
        WebDriverWait(driver, timeout, 0.25).until(shown)
        load_s = time.perf_counter() - start
        try:
            WebDriverWait(driver, 20, 0.25).until(painted)
        except Exception:  # noqa: BLE001 - screenshot what is there
            pass
        time.sleep(0.5)
        match = re.search(r"page built in (\d+) ms", driver.find_element(By.TAG_NAME, "body").text)
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return Snapshot(path=path, url=url, build_ms=float(match.group(1)) if match else None, load_s=load_s)


def run_problem(run) -> str | None:
    """Why `run` cannot be shown (not a folder; neither a run nor a folder of runs), else None: refused at
    once instead of waiting for a feature page that never comes."""
    folder = Path(run)
    if not folder.is_dir():
        return f"{run} is not a folder" if folder.exists() else f"{run} does not exist"
    if (folder / "config.json").is_file() or any((child / "config.json").is_file()
                                                 for child in folder.iterdir() if child.is_dir()):
        return None
    return f"{run} is not a run folder (no config.json in it or in its subfolders): give a folder `sae train` wrote"


def serve_and_snapshot(run, out, port: int = 8501, host: str = "localhost") -> int:
    """Serve run with `sae dashboard`, take the screenshot once the server answers, print the closing note,
    keep serving (a failed screenshot is reported, and serving goes on). Returns the server's exit status."""
    import signal
    import subprocess
    import sys
    server = subprocess.Popen([sys.executable, "-m", "sae", "dashboard", str(run), "--port", str(port),
                               "--host", host])

    def stop(signum, frame):  # a kill of this process also stops the server it started: a stop, not an error
        server.terminate()    # (no wait here: the main thread may be inside server.wait(), holding its lock)
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)
    try:
        shown = "localhost" if host in ("0.0.0.0", "::") else host
        base = f"http://{shown}:{port}"
        try:
            wait_healthy(base, alive=lambda: server.poll() is None)
            shot = take(base, example_feature(run), out)
            built = f"{shot.build_ms:.0f} ms" if shot.build_ms is not None else "unknown"
            print(f"\nsae dashboard: serving {base}/  ·  feature page {shot.url} built in {built} "
                  f"(warm; {shot.load_s:.2f} s until visible in Chromium)  ·  screenshot: {shot.path}\n",
                  file=sys.stderr, flush=True)
        except Exception as error:  # noqa: BLE001 - the screenshot is a courtesy: keep serving
            if server.poll() is not None:
                return server.returncode
            print(f"sae dashboard: no screenshot ({type(error).__name__}: {error}); still serving",
                  file=sys.stderr, flush=True)
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="serve a run with `sae dashboard` and screenshot a feature page")
    parser.add_argument("run", help="run folder (its first firing feature is shown)")
    parser.add_argument("--out", required=True, metavar="PNG", help="where to save the screenshot")
    parser.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    parser.add_argument("--host", default="localhost", help="address to listen on (default localhost)")
    args = parser.parse_args()
    problem = run_problem(args.run)
    if problem:
        import sys
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(serve_and_snapshot(args.run, args.out, args.port, args.host))


if __name__ == "__main__":
    main()
