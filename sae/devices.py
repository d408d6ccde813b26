"""Device choice shared by every command."""
from __future__ import annotations

import time

import torch

from sae.errors import UserError


def resolve(name: str | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is refused."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def square_matmul_gflops(n: int = 2048, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """This machine's roofline as the benchmarks print it: the throughput of an n×n by n×n matmul
    (fp32 on the CPU, the faster of torch.mm and oneDNN, as sae.matmul picks; bf16 on CUDA), measured now."""
    device = torch.device(device)
    if device.type != "cuda":
        from sae.kernels.matmul import best_cpu_gflops
        return max(best_cpu_gflops(n, n, n, repeats).values())
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


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
