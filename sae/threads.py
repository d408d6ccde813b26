"""Threading policy: how the `sae` process's OpenMP worker threads wait, set before torch is imported.

OpenMP's default is to spin (busy-wait) between parallel regions. On a machine of its own that saves a few
microseconds a region; on a shared one (a laptop running other jobs, a busy server) the spinning threads
take the cores the other threads of the same process need, and everything runs several times slower
(issue 20's figures at load 5-7 on 2 cores: the dashboard's loss effect 23.9 s -> 3.9 s with passive waits,
steered generation 19.5 s -> 3.3 s, one live probe 1.6 s -> 0.09 s, `sae train` 3,166 -> 6,942 tokens/s;
scripts/bench_threads.py measures it, docs/benchmarks.md has the table). So:

- `sae dashboard` (interactive, idle most of the time): always OMP_WAIT_POLICY=PASSIVE; it never spins.
- the batch commands (collect, train, eval, analyze, sweep, ...): PASSIVE when the machine is already busy
  when they start (1-minute load average above half the cores), the default otherwise.

A user's own OMP_WAIT_POLICY is never overridden; SAE_THREADS=default turns the policy off (the benchmark
uses it to measure the default), SAE_THREADS=passive forces passive waits for every command.
Imports nothing of the project, and never torch (it must run before torch loads).
"""
from __future__ import annotations

import os

INTERACTIVE = ("dashboard",)
BUSY_FRACTION = 0.5      # load average per core above which a batch command waits passively


def machine_busy(load: float | None = None, cores: int | None = None) -> bool:
    """Whether the 1-minute load average exceeds BUSY_FRACTION of the cores (False where unknown)."""
    try:
        load = os.getloadavg()[0] if load is None else load
    except (AttributeError, OSError):
        return False
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return load > BUSY_FRACTION * max(cores, 1)


def policy(command: str | None, environ=None, load: float | None = None, cores: int | None = None) -> dict:
    """The environment variables to set for `command` (empty: leave OpenMP's defaults)."""
    environ = os.environ if environ is None else environ
    choice = environ.get("SAE_THREADS", "").strip().lower()
    if choice == "default" or "OMP_WAIT_POLICY" in environ:
        return {}
    if choice == "passive" or command in INTERACTIVE or machine_busy(load, cores):
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {}


def apply(argv) -> dict:
    """Set the policy for the command named in argv (the first argument that is not an option), in
    os.environ, before torch is imported; returns what was set. Too late once torch is loaded: then nothing."""
    import sys
    if "torch" in sys.modules:
        return {}
    command = next((a for a in argv if not str(a).startswith("-")), None)
    settings = policy(command)
    os.environ.update(settings)
    return settings
