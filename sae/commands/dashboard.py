"""`sae dashboard RUN… [--port P] [--host H]`: serve the Streamlit feature browser.

It runs `streamlit run dashboard/app.py -- RUN…` with the project's settings passed as flags
(localhost, headless, no usage statistics), so the behaviour is the same from any working directory.
"""
from __future__ import annotations

from pathlib import Path

HELP = "serve the Streamlit dashboard on localhost (http://localhost:P/?feature=N opens feature N of the first run)"

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"

# The settings of .streamlit/config.toml, as command-line flags.
STREAMLIT_FLAGS = {
    "server.headless": "true",
    "server.fileWatcherType": "none",
    "server.runOnSave": "false",
    "browser.gatherUsageStats": "false",
    "global.developmentMode": "false",
    "client.toolbarMode": "minimal",
    "client.showErrorDetails": "none",
    "theme.base": "light",
}


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders (or folders holding runs, e.g. a sweep's DIR or RUN/layer_L/)")
    parser.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    parser.add_argument("--host", default="localhost",
                        help="address to listen on (default localhost; e.g. 0.0.0.0 serves every interface)")
    parser.add_argument("--screenshot", metavar="PNG", default=None,
                        help="once serving, save a headless-Chromium screenshot of a feature page of the first run "
                             "and print its path and the page's build time (needs chromium, chromedriver, selenium)")


def streamlit_command(runs, port: int, host: str, python: str | None = None) -> list[str]:
    """The argv that serves the app (used by the command and by the browser test)."""
    import sys
    argv = [python or sys.executable, "-m", "streamlit", "run", str(APP),
            f"--server.port={port}", f"--server.address={host}", f"--browser.serverAddress={host}"]
    argv += [f"--{key}={value}" for key, value in STREAMLIT_FLAGS.items()]
    return argv + ["--", *[str(Path(run).resolve()) for run in runs]]


def check_port(host: str, port: int) -> None:
    import socket
    from sae.errors import UserError
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None


def run(args):
    import os
    import subprocess
    import sys
    from sae.errors import UserError

    for run_path in args.runs:
        if not Path(run_path).exists():
            raise UserError(f"{run_path} does not exist")
    if not APP.is_file():
        raise UserError(f"the dashboard app is missing ({APP}); reinstall the package from its source tree")
    check_port(args.host, args.port)
    shown = "localhost" if args.host in ("localhost", "127.0.0.1", "::1") else args.host
    print(f"sae dashboard: http://{shown}:{args.port}/   (feature N: http://{shown}:{args.port}/?feature=N; "
          "Ctrl-C stops)", file=sys.stderr, flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the dashboard never downloads
    argv = streamlit_command(args.runs, args.port, args.host)
    if args.screenshot:
        return _serve_with_snapshot(argv, args)
    if os.name == "posix":  # become the server, so that signals (Ctrl-C, kill) reach it directly
        sys.stderr.flush()
        os.execv(argv[0], argv)
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return 0


def _serve_with_snapshot(argv, args) -> int:
    """Serve, take the screenshot once the server answers, print the closing note, keep serving."""
    import subprocess
    import sys
    if str(APP.parents[1]) not in sys.path:  # dashboard/ sits beside sae/ in the source tree
        sys.path.insert(0, str(APP.parents[1]))
    from dashboard import snapshot

    import signal
    server = subprocess.Popen(argv)

    def stop(signum, frame):  # a kill of this process also stops the server it started
        server.terminate()
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    try:
        host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
        base = f"http://{host}:{args.port}"
        try:
            snapshot.wait_healthy(base, alive=lambda: server.poll() is None)
            feature = snapshot.example_feature(args.runs[0])
            shot = snapshot.take(base, feature, args.screenshot)
            built = f"{shot.build_ms:.0f} ms" if shot.build_ms is not None else "unknown"
            print(f"\nsae dashboard: serving {base}/  ·  feature page {shot.url} built in {built} "
                  f"(warm; {shot.load_s:.2f} s until visible in Chromium)  ·  screenshot: {shot.path}\n",
                  file=sys.stderr, flush=True)
        except Exception as error:  # noqa: BLE001 - the screenshot is a courtesy: keep serving
            print(f"sae dashboard: no screenshot ({type(error).__name__}: {error}); still serving",
                  file=sys.stderr, flush=True)
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return 0
