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
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    try:
        return subprocess.call(streamlit_command(args.runs, args.port, args.host), env=env)
    except KeyboardInterrupt:
        return 0
