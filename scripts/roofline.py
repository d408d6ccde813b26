"""This machine's roofline for the benchmark tables: measured matrix-product throughput, now.

Imported by the bench_*.py scripts beside it (`python scripts/bench_train.py` puts scripts/ on sys.path)."""
from __future__ import annotations

import time

import torch

from sae.kernels.matmul import onednn_available


def best_cpu_gflops(n: int, k: int, m: int, repeats: int = 20, bf16: bool = False) -> dict[str, float]:
    """GFLOP/s of an [n, k] × [k, m] product on the CPU, best of `repeats`, through each path this machine
    has: {"torch.mm": …, "onednn": …} (onednn only where available); fp32, or bf16 inputs with bf16=True.
    A benchmark's roofline is the best of them: the physical limit, not the slower library's."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
    paths = {"torch.mm": lambda: torch.mm(a, b)}
    if onednn_available():
        w = b.t().contiguous()
        paths["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
    rates = {}
    for name, product in paths.items():
        best = float("inf")
        for _ in range(repeats + 3):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
        rates[name] = 2 * n * k * m / best / 1e9
    return rates


def square_matmul_gflops(n: int = 2048, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """This machine's roofline as the benchmarks print it: the throughput of an n×n by n×n matmul
    (fp32 on the CPU, the faster of torch.mm and oneDNN, as sae.matmul picks; bf16 on CUDA), measured now."""
    device = torch.device(device)
    if device.type != "cuda":
        return max(best_cpu_gflops(n, n, n, repeats).values())
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9
