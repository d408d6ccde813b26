"""Progress bars for long work: tqdm's bar in a terminal; outside one (a log file, a pipe, nohup, a batch
job) one plain line every LOG_EVERY_S seconds instead of nothing, so that a long collect is seen to move.

    from sae.progress import progress_bar
    with progress_bar(total=n, desc="collect", unit="tok", unit_scale=True) as bar: ...

Imports nothing of the project.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

LOG_EVERY_S = float(os.environ.get("SAE_PROGRESS_EVERY", "30"))   # seconds between lines without a terminal


class LineBar(tqdm):
    """tqdm that writes each update as its own line (no carriage returns) at most every `mininterval` s."""

    @staticmethod
    def status_printer(file):
        def print_status(text):
            text = text.strip()
            if text:
                file.write(text + "\n")
                file.flush()
        return print_status


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(*, disable: bool | None = None, file=None, **kwargs) -> tqdm:
    """A tqdm bar; disable=True hides it (another rank, --quiet). Without a terminal on `file` (stderr by
    default) the bar becomes a line logged every LOG_EVERY_S seconds."""
    file = sys.stderr if file is None else file
    if disable:
        return tqdm(disable=True, **kwargs)
    if is_terminal(file):
        return tqdm(file=file, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), LOG_EVERY_S)
    kwargs["maxinterval"] = max(float(kwargs.get("maxinterval", 10.0)), kwargs["mininterval"])
    kwargs.setdefault("delay", LOG_EVERY_S)   # work shorter than that logs nothing (a refusal stays one line)
    return LineBar(file=file, ncols=100, **kwargs)
