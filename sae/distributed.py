"""torch.distributed for training under `torchrun`: set-up, and the reduce hooks every module may call.

The hooks are no-ops in a single process, so a variant can call them unconditionally:

    from sae.distributed import reduce_sum, all_gather_cat
    counts = reduce_sum(fire_counts)          # [d_sae] summed over every rank's slice of the batch
    values = all_gather_cat(local_values)     # [sum of n_r, ...] every rank's rows, in rank order

Rule: with the same global batch a run on N ranks matches a run in one process, so anything a step
computes from the batch (not only gradients) is reduced across ranks. Rank r holds the contiguous slice
r of the global batch, so all_gather_cat over ranks rebuilds the global batch in its original order.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass

import torch

from sae.errors import UserError

if torch.distributed.is_available():
    # Imported before any process group exists: torch.distributed.nn's functions take group=group.WORLD as a
    # default argument, evaluated on import, so imported while a group exists (the first torch.optim optimiser
    # or DDP import it, through torch._dynamo) they would hold that group for good: destroy_process_group
    # could then never free it nor stop gloo's worker threads (see teardown).
    import torch.distributed.nn.functional  # noqa: F401


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a single process (read from the environment: no group needed yet)."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


_LOCAL_DEPTH = 0


class local:
    """`with distributed.local():` ignores the process group inside the block (is_active() is False), so
    each rank trains on its own: `sae sweep` under torchrun spreads whole SAEs across ranks."""

    def __enter__(self):
        global _LOCAL_DEPTH
        _LOCAL_DEPTH += 1
        return self

    def __exit__(self, *exc):
        global _LOCAL_DEPTH
        _LOCAL_DEPTH -= 1
        return False


def group_active() -> bool:
    """A process group of several ranks exists (whatever each rank trains)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_active() -> bool:
    """Data-parallel training: the ranks share one model and the reduce hooks reduce (not in local())."""
    return not _LOCAL_DEPTH and group_active()


def info() -> DistInfo:
    if not is_active():
        return DistInfo()
    dist = torch.distributed
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                    dist.get_backend())


def choose_backend(device_type: str, requested: str = "auto") -> tuple[str, str | None]:
    """(backend, message): nccl for CUDA when it is available; gloo otherwise, saying why."""
    dist = torch.distributed
    nccl_ok = dist.is_nccl_available() and torch.cuda.is_available()
    if requested == "gloo":
        return "gloo", None
    if requested == "nccl" or (requested == "auto" and device_type == "cuda"):
        if nccl_ok:
            return "nccl", None
        return "gloo", "NCCL is not available on this machine: falling back to the gloo backend"
    return "gloo", None


def setup(device_type: str, requested_backend: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (no-op otherwise)."""
    if not launched_by_torchrun():
        return DistInfo()
    dist = torch.distributed
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed: run without torchrun")
    if not dist.is_initialized():
        backend, message = choose_backend(device_type, requested_backend)
        if message and int(os.environ.get("RANK", 0)) == 0:
            print(f"distributed: {message}", file=sys.stderr)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return info()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each rank uses its own GPU (LOCAL_RANK) when no index was given."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def barrier() -> None:
    """Wait for every rank of the group (no-op in one process)."""
    if group_active():
        torch.distributed.barrier()


_LEFT_CLEANLY = False


def teardown(clean: bool = True) -> bool:
    """Leave the process group. On a clean exit, after a barrier: gloo aborts a process whose peer closes
    its connections while it still has work in flight, so no rank leaves before every rank is done. After
    an error (clean=False) no barrier: the peers may be inside another collective, and leaving at once
    makes them fail fast instead of waiting for the group's timeout.

    Then the group is destroyed, its last reference gone (callers drop their DistributedDataParallel wrappers
    first; see the import of torch.distributed.nn above), so that its destructor joins gloo's worker threads
    while the interpreter is alive: a worker may still be freeing finished work (a barrier keeps earlier collectives'
    work, with their Python-made tensors, until it is freed), which needs the GIL; in a finalizing interpreter
    that ends the thread and aborts the process. Returns True when this rank left cleanly: the barrier was
    passed and the group destroyed (left_cleanly() says so afterwards; the `sae` command then ends with
    os._exit, see sae.cli.entry)."""
    global _LEFT_CLEANLY
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    passed = False
    if clean:
        try:
            dist.barrier()
            passed = True
        except RuntimeError:   # a peer already failed: nothing left to wait for
            pass
    import gc
    gc.collect()   # wrappers left in reference cycles (DDP) go now, while the group's own handle holds it
    dist.destroy_process_group()   # drops that handle: its destructor releases the GIL and joins the workers
    _LEFT_CLEANLY = passed
    return passed


def left_cleanly() -> bool:
    """The last teardown() passed its barrier and destroyed the group: no peer is waiting on this rank."""
    return _LEFT_CLEANLY


# ---- reduce hooks (no-ops in one process) --------------------------------------------------
def world_size() -> int:
    """Ranks taking part in the current group (1 outside torch.distributed or inside local())."""
    return torch.distributed.get_world_size() if is_active() else 1


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) \
        if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def _reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not is_active():
        return tensor
    device = tensor.device
    buffer = tensor.detach().to(_comm_device()).clone()
    torch.distributed.all_reduce(buffer, op=op)
    return buffer.to(device)


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; no gradient flows through it)."""
    return _reduce(tensor, torch.distributed.ReduceOp.SUM) if is_active() else tensor


def reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _reduce(tensor, torch.distributed.ReduceOp.MAX) if is_active() else tensor


def reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    return _reduce(tensor, torch.distributed.ReduceOp.MIN) if is_active() else tensor


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of equal-sized slices (= the mean over the global batch of per-slice means)."""
    if not is_active():
        return tensor
    return reduce_sum(tensor) / torch.distributed.get_world_size()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order (rows may differ per rank). No grad."""
    if not is_active():
        return tensor
    dist = torch.distributed
    device = tensor.device
    local = tensor.detach().to(_comm_device()).contiguous()
    sizes = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(all_sizes, sizes)
    all_sizes = [int(s) for s in all_sizes]
    longest = max(all_sizes)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    pieces = [torch.zeros_like(padded) for _ in all_sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, all_sizes)]).to(device)


def broadcast_bytes(payload: bytes | None) -> bytes:
    """Rank 0's bytes on every rank (no pickle); also inside local() blocks."""
    if not group_active():
        return payload or b""
    dist = torch.distributed
    device = _comm_device()
    length = torch.tensor([len(payload or b"")], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    buffer = torch.zeros(int(length), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0 and payload:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device))
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist())


def check_same_config(config: dict) -> None:
    """Every rank must train the same thing: compare against rank 0's config, name what differs."""
    if not is_active():
        return
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    digest = int.from_bytes(hashlib.sha256(blob).digest()[:7], "big")
    flag = torch.tensor([digest], dtype=torch.int64)
    low, high = reduce_min(flag.clone()), reduce_max(flag.clone())
    if int(low) == int(high):
        return
    reference = json.loads(broadcast_bytes(blob if torch.distributed.get_rank() == 0 else None))
    differing = sorted(k for k in set(reference) | set(config) if reference.get(k) != config.get(k))
    detail = ", ".join(f"{k}: rank 0 has {reference.get(k)!r}, this rank {config.get(k)!r}" for k in differing[:3])
    raise UserError(f"ranks disagree on the training config ({detail or 'see the other ranks'})")


def check_batch(batch_size: int, world_size: int) -> None:
    if world_size > 1 and batch_size % world_size:
        raise UserError(f"--batch-size {batch_size} is not divisible by the world size {world_size}: "
                        f"each rank must get an equal slice of the global batch")


class StopFlag:
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current step; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def should_stop(self, dist_enabled: bool) -> bool:
        if not dist_enabled:
            return self.requested
        return bool(reduce_max(torch.tensor([int(self.requested)])))
