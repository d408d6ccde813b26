"""Device choice shared by every command."""
from __future__ import annotations

import torch

from sae.errors import UserError


def resolve(name: str | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is refused."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or e.g. cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":              # mps, xpu, ...: refused here when this machine has none
        backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is not None and not available():
            raise UserError(f"--device {name} was asked for, but no {device.type} device is available")
    return device


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve every block from its heap (no mmap) and not to trim it below 1 GiB.

    By default each block over a few MB is a fresh mmap, handed back to the kernel when freed, so every
    batch's big temporaries page-fault in anew: a TopK training step's [batch, d_sae] pre-activations
    (19 MB at 1,024 × 4,608) cost about 3 ms of a 45 ms step on this 2-core machine, and `sae analyze`'s
    268 MB code batches (4,096 × 16,384) 13% of its pass. The cost: freed memory is kept for reuse and
    memory freed in the middle of the heap is never returned to the kernel, so a process's resident size
    stays near its peak (the analysis benchmark's peak rose 7%). Process-wide: the `sae` command applies it
    (sae.cli.entry); library callers choose. SAE_MALLOC_DEFAULTS=1 turns it off; a no-op off glibc."""
    import ctypes
    import ctypes.util
    import os
    import sys
    if not sys.platform.startswith("linux") or os.environ.get("SAE_MALLOC_DEFAULTS") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
