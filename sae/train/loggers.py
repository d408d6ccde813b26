"""Experiment logging, one interface for every training path: `--log wandb|tensorboard|none`.

A command opens one logging `session` around its work; every Trainer (store, live, sweep) and the sharded
trainer report their metrics.jsonl lines through `log_metrics(run_dir, metrics)`, a no-op without a session.
Each run folder is its own logged run (a sweep's SAEs and a multi-layer live run's layers each one run,
grouped under the command's --out). When the session closes, each run's final figures (train_summary.json's
held-out scores, eval.json) are logged as its summary and the run is closed: on success, on an error and on
Ctrl-C alike (sae.cli.entry also closes whatever is still open before its os._exit).

A backend is one class registered by name (`@register("name")`) with log(metrics, step), summary(values)
and close(exit_code); `sae train --log NAME` then works.
"""
from __future__ import annotations

import contextlib
import importlib
import math
from pathlib import Path

from sae.errors import UserError

BACKENDS: dict[str, type] = {}


def register(name: str):
    def decorate(cls):
        BACKENDS[name] = cls
        return cls
    return decorate


def names() -> list[str]:
    return ["none", *BACKENDS]


def _numbers(values: dict, prefix: str = "") -> dict:
    """The finite numbers of a (nested) dict, flattened as prefix/key."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = value
    return out


@register("wandb")
class WandbBackend:
    """Weights & Biases (offline with WANDB_MODE=offline); each run folder one wandb run, grouped."""
    INSTALL = "pip install wandb"

    @staticmethod
    def check() -> None:
        importlib.import_module("wandb")

    def __init__(self, run_dir: Path, name: str, group: str, project: str | None, config: dict):
        import wandb
        self.run = wandb.init(project=project or "sae", name=name, group=group, config=config,
                              reinit="create_new")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


@register("tensorboard")
class TensorBoardBackend:
    """TensorBoard event files in RUN/tensorboard/ (`tensorboard --logdir OUT` shows every run of a command)."""
    INSTALL = "pip install tensorboard"

    @staticmethod
    def check() -> None:
        importlib.import_module("tensorboard")         # torch.utils.tensorboard needs it

    def __init__(self, run_dir: Path, name: str, group: str, project: str | None, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.step = 0
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())), 0)

    def log(self, metrics: dict, step: int) -> None:
        self.step = step
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, self.step)

    def close(self, exit_code: int) -> None:
        if exit_code:
            self.writer.add_text("status", "failed" if exit_code != 130 else "interrupted", self.step)
        self.writer.close()


def check_backend(name: str | None) -> None:
    """Refuse an unknown backend, or one whose library is missing, in one line, before any work."""
    if name in (None, "none"):
        return
    if name not in BACKENDS:
        raise UserError(f"--log {name}: unknown logger; use one of: {', '.join(names())}")
    try:
        BACKENDS[name].check()
    except ImportError:
        raise UserError(f"--log {name} needs the {name} package: {BACKENDS[name].INSTALL}") from None


class Session:
    """One command's logging: a backend run per run folder, opened at its first metrics."""

    def __init__(self, backend: str, project: str | None, group: str, config: dict):
        self.backend, self.project, self.group, self.config = BACKENDS[backend], project, group, config
        self.runs: dict[Path, object] = {}
        self.exit_code = 0     # a command that ends early without an exception (Ctrl-C caught: 130) sets it

    def run_for(self, run_dir) -> object:
        run_dir = Path(run_dir)
        if run_dir not in self.runs:
            group = Path(self.group)   # the command's --out: a run itself, or the folder of a sweep's / live runs
            name = f"{group.name}/{run_dir.relative_to(group)}" if group in run_dir.parents else run_dir.name
            config = {**self.config, **_run_config(run_dir)}
            self.runs[run_dir] = self.backend(run_dir, name, str(group), self.project, config)
        return self.runs[run_dir]

    def log(self, run_dir, metrics: dict) -> None:
        numbers = _numbers(metrics)
        self.run_for(run_dir).log(numbers, int(metrics.get("step", 0)))

    def close(self, exit_code: int) -> None:
        runs, self.runs = self.runs, {}
        for run_dir, run in runs.items():
            try:
                final = _final_figures(run_dir)
                if final:
                    run.summary(final)
            finally:
                run.close(exit_code)


def _run_config(run_dir: Path) -> dict:
    from sae.files import read_json
    try:
        data = read_json(run_dir / "config.json", missing_ok=True) or {}
    except UserError:
        return {}
    return {k: v for k, v in _numbers(data).items()} | {k: v for k, v in data.items() if isinstance(v, str)}


def _final_figures(run_dir: Path) -> dict:
    """The run's final evaluation: held-out scores of train_summary.json and eval.json, as eval/<name>."""
    from sae.files import read_json
    figures = {}
    for file, key in (("train_summary.json", "held_out"), ("eval.json", None)):
        try:
            data = read_json(run_dir / file, missing_ok=True)
        except UserError:
            continue
        if data:
            figures.update(_numbers(data.get(key) or {} if key else data, "eval/"))
    return figures


_ACTIVE: list[Session] = []


@contextlib.contextmanager
def session(backend: str | None, *, group, project: str | None = None, config: dict | None = None,
            enabled: bool = True):
    """Log every training run under this block (backend None or "none", or enabled False: nothing)."""
    check_backend(backend)              # on every rank, so that a missing library stops them all
    if backend in (None, "none") or not enabled:
        yield None
        return
    current = Session(backend, project, str(group), config or {})
    _ACTIVE.append(current)
    code = 1
    try:
        yield current
        code = 0
    except KeyboardInterrupt:
        code = 130
        raise
    finally:
        _ACTIVE.remove(current)
        current.close(code or current.exit_code)


def from_args(args, enabled: bool = True):
    """The session that a training command's --log / --log-project (or the old --wandb PROJECT) ask for."""
    import sys
    backend, project = getattr(args, "log", "none"), getattr(args, "log_project", None)
    if getattr(args, "wandb", None):
        print(f"notice: --wandb {args.wandb} is now spelt --log wandb --log-project {args.wandb}", file=sys.stderr)
        backend, project = "wandb", project or args.wandb
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and isinstance(v, (str, int, float, bool))}
    return session(backend, group=args.out, project=project, config=config, enabled=enabled)


def log_metrics(run_dir, metrics: dict) -> None:
    """Called with every metrics.jsonl line of every trainer; logs it to the open session, if any."""
    if _ACTIVE and run_dir is not None:
        _ACTIVE[-1].log(run_dir, metrics)


def close_all(exit_code: int = 1) -> None:
    """Close every run still open (sae.cli.entry calls it before os._exit)."""
    while _ACTIVE:
        _ACTIVE.pop().close(exit_code)
