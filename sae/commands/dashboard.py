"""`sae dashboard RUN… [--port P] [--host H]`: serve the Streamlit feature browser.

It runs `streamlit run dashboard/app.py -- RUN…` with the project's settings passed as flags
(localhost, headless, no usage statistics), so the behaviour is the same from any working directory.
The app is found through the `dashboard` package, which is installed beside `sae` (or, in a checkout,
sits beside sae/). A screenshot of a served page: scripts/dashboard_snapshot.py (see `make demo`).
"""
from __future__ import annotations

from pathlib import Path

HELP = "serve the Streamlit dashboard on localhost (http://localhost:P/?feature=N opens feature N of the first run)"


def app_path() -> Path:
    """dashboard/app.py: from the installed `dashboard` package, else the one beside sae/ in a checkout."""
    import importlib.util
    folders = []
    try:
        spec = importlib.util.find_spec("dashboard")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        folders.append(Path(spec.origin).resolve().parent)
    folders.append(Path(__file__).resolve().parents[2] / "dashboard")
    for folder in folders:  # ours has app.py and nav.py (an unrelated `dashboard` on sys.path is passed over)
        if (folder / "app.py").is_file() and (folder / "nav.py").is_file():
            return folder / "app.py"
    return folders[-1] / "app.py"


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
                        help="run folders (or folders holding runs, e.g. a sweep's DIR or RUN/layer_L/), or "
                             "RELEASE:SAE_ID, a published SAE (e.g. gemma-scope-2b-pt-res:layer_12/width_16k/"
                             "average_l0_82) analysed with `sae analyze --run RELEASE:SAE_ID`")
    parser.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    parser.add_argument("--host", default="localhost",
                        help="address to listen on (default localhost; e.g. 0.0.0.0 serves every interface)")


def streamlit_command(runs, port: int, host: str, python: str | None = None) -> list[str]:
    """The argv that serves the app (used by the command and by the browser test)."""
    import sys
    argv = [python or sys.executable, "-m", "streamlit", "run", str(app_path()),
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


def analyze_command(run_path, config: dict | None) -> str:
    """The command that analyses a run, with the store its config.json records (else STORE)."""
    store = (config or {}).get("store") or "STORE"
    return f"sae analyze --run {run_path} --activations {store}"


def unanalysed(paths) -> list[str]:
    """One warning per run (a given folder, or the runs inside it) that has no analysis yet."""
    from sae.errors import UserError
    from sae.files import read_json
    warnings = []
    for given in paths:
        folder = Path(given)
        runs = [folder] if (folder / "config.json").exists() else \
            sorted(child for child in folder.iterdir() if (child / "config.json").exists())
        for run_dir in runs:
            if (run_dir / "analysis" / "meta.json").exists():
                continue
            try:
                config = read_json(run_dir / "config.json")
            except UserError:
                continue          # the page says what is wrong with it
            warnings.append(f"warning: {run_dir} has not been analysed: its feature pages stay empty until "
                            f"`{analyze_command(run_dir, config)}`")
    return warnings


def run(args):
    import os
    import subprocess
    import sys
    from sae.errors import UserError

    from sae.runs import resolve_run
    args.runs = [resolve_run(run_path) for run_path in args.runs]   # RELEASE:SAE_ID -> its run folder
    for run_path in args.runs:
        if not Path(run_path).exists():
            raise UserError(f"{run_path} does not exist")
        if not Path(run_path).is_dir():
            raise UserError(f"{run_path} is a file: give run folders (or folders holding runs)")
        if (Path(run_path) / "manifest.json").is_file() and not (Path(run_path) / "config.json").exists():
            raise UserError(f"{run_path} is an activation store, not a run: give the run folder trained on it")
        from sae.interop import detect_format
        if detect_format(run_path) is None and next(Path(run_path).rglob("config.json"), None) is None:
            raise UserError(f"{run_path} holds no run (no config.json in it or below it)")
    app = app_path()
    if not app.is_file():
        raise UserError(f"the dashboard app is missing ({app}); reinstall the sae package")
    check_port(args.host, args.port)
    for warning in unanalysed(args.runs):
        print(warning, file=sys.stderr)
    shown = "localhost" if args.host in ("localhost", "127.0.0.1", "::1") else args.host
    print(f"sae dashboard: http://{shown}:{args.port}/   (feature N: http://{shown}:{args.port}/?feature=N; "
          "Ctrl-C stops)", file=sys.stderr, flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the dashboard never downloads
    argv = streamlit_command(args.runs, args.port, args.host)
    if os.name == "posix":  # become the server, so that signals (Ctrl-C, kill) reach it directly
        sys.stderr.flush()
        os.execv(argv[0], argv)
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return 0

