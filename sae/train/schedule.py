"""When a training run writes a checkpoint: `--checkpoint-every` in steps (`500`) or in wall time (`10m`,
`90s`, `1h`); the default is every 10 minutes, so a big dictionary (17 GB of weights and moments at
131k × 4,096) is not written every few hundred steps, and a small one still is at least every 10 minutes.

Under torchrun the time-based decision is rank 0's clock, shared at logging steps (which synchronise
anyway), so every rank saves at the same step; between them no step reads the clock of another rank.
"""
from __future__ import annotations

import re
import time

from sae.errors import UserError

DEFAULT = "10m"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse(spec, allow_zero: bool = False):
    """`500` -> 500 (steps); `10m` -> ("time", 600.0). 0 is refused (allow_zero: the Python API's "only at
    the end", kept for callers that set it)."""
    if isinstance(spec, bool):
        spec = str(spec)
    if isinstance(spec, int):
        value, unit = float(spec), ""
    else:
        match = _SPEC.match(str(spec))
        if match is None:
            raise UserError(f"--checkpoint-every {spec!r} is not a number of steps (500) or a time (10m, 90s, 1h)")
        value, unit = float(match.group(1)), match.group(2)
    if value <= 0 and not (allow_zero and value == 0):
        raise UserError(f"--checkpoint-every must be positive (steps such as 500, or a time such as 10m), got {spec}")
    if unit:
        return ("time", value * _UNITS[unit])
    if value != int(value):
        raise UserError(f"--checkpoint-every {spec!r}: a number of steps is a whole number (or add s, m or h)")
    return int(value)


class CheckpointClock:
    """due(step, logging) says whether to checkpoint after `step`."""

    def __init__(self, spec, distributed_enabled: bool = False):
        self.every = parse(spec if spec is not None else DEFAULT, allow_zero=True)
        self.distributed = distributed_enabled
        self.last = time.monotonic()

    def due(self, step: int, logging: bool) -> bool:
        if isinstance(self.every, int):
            return bool(self.every) and step % self.every == 0
        if self.distributed and not logging:
            return False
        late = time.monotonic() - self.last >= self.every[1]
        if self.distributed:
            from sae import distributed
            late = bool(distributed.broadcast_bytes(b"1" if late else b"0") == b"1")
        return late

    def saved(self) -> None:
        self.last = time.monotonic()
