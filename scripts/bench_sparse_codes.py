"""Benchmark the penalty variants' sparse decoder against the dense one, by how many codes are nonzero.

    python scripts/bench_sparse_codes.py                    # d_in 576, d_sae 4,608, batch 1,024 (the bench's shape)
    python scripts/bench_sparse_codes.py --d-sae 16384

One decode with its backward (x̂ = codes W_dec + b_dec; the gradients of the codes, W_dec and b_dec), the dense
product (sae.kernels.matmul: 6·d_in·d_sae FLOP a token) against sae.kernels.autograd's list_entries and
decode_listed (forced: max_density 1), at codes with L0 nonzero entries a token placed at random. Each row alternates
the two paths and keeps the best of --repeat tries of each (these machines drift by up to 10% within
minutes). The roofline beside it is this machine's best fp32 product of the decoder's shape, measured in
the same run. The crossover is where SPARSE_CODES_DENSITY should sit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import best_cpu_gflops  # noqa: E402
from sae.kernels.autograd import SPARSE_CODES_DENSITY, decode_listed, list_entries  # noqa: E402
from sae.kernels.matmul import addmm  # noqa: E402


def codes_with_l0(batch: int, d_sae: int, l0: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, d_sae] non-negative codes with exactly l0 nonzero entries a token, at random latents."""
    scores = torch.rand(batch, d_sae, generator=generator)
    picked = scores.topk(l0, dim=1).indices                               # [batch, l0]
    codes = torch.zeros(batch, d_sae)
    codes.scatter_(1, picked, torch.rand(batch, l0, generator=generator) + 0.1)
    return codes


def timed(step, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--l0", default="8,16,32,64,128,256,512,1024")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(args.d_sae, args.d_in, generator=generator).requires_grad_()   # [d_sae, d_in]
    b_dec = torch.zeros(args.d_in, requires_grad=True)
    target = torch.randn(args.batch, args.d_in, generator=generator)                  # [batch, d_in]
    rate = max(best_cpu_gflops(args.batch, args.d_sae, args.d_in).values())
    flop = 6 * args.d_in * args.d_sae * args.batch
    print(f"batch {args.batch:,}, d_in {args.d_in}, d_sae {args.d_sae:,}; roofline {rate:.0f} GFLOP/s "
          f"(best fp32 product of this shape), i.e. {flop / rate / 1e6:.1f} ms for the dense decode with its "
          f"backward; SPARSE_CODES_DENSITY = 1/{round(1 / SPARSE_CODES_DENSITY)} "
          f"(L0 {SPARSE_CODES_DENSITY * args.d_sae:.0f} here)")
    print("| L0 | density | dense ms | sparse ms | sparse speed-up | dense of roofline |")
    print("|---:|---:|---:|---:|---:|---:|")
    for l0 in (int(v) for v in args.l0.split(",")):
        codes = codes_with_l0(args.batch, args.d_sae, l0, generator).requires_grad_()

        def dense():
            (addmm(b_dec, codes, W_dec) - target).pow(2).sum().backward()

        def sparse():
            listing = list_entries(codes, max_density=1.0)
            values = codes[listing.rows, listing.cols]                   # [n]
            (decode_listed(values, listing, W_dec, b_dec) - target).pow(2).sum().backward()

        dense_s = sparse_s = float("inf")
        for _ in range(2):                                                # alternate, best of both rounds
            dense_s = min(dense_s, timed(dense, args.repeat))
            sparse_s = min(sparse_s, timed(sparse, args.repeat))
        print(f"| {l0} | {l0 / args.d_sae:.2%} | {dense_s * 1e3:.1f} | {sparse_s * 1e3:.1f} | "
              f"{dense_s / sparse_s:.2f}× | {flop / dense_s / 1e9 / rate:.0%} |")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
