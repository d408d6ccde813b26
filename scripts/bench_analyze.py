"""Benchmark `sae analyze` against the encoder's matrix product alone (issue 6).

Synthesises a store with random windows (no model needed) and a ReLU SAE whose bias gives about
--l0 firing latents per token, runs the analysis in a child process (its peak RSS is measured), then
times x @ W_enc alone over the same number of tokens, and a square matmul for the machine's roofline.

    python scripts/bench_analyze.py                       # full size: 1,000,000 tokens x 16,384 latents
    python scripts/bench_analyze.py --tokens 20000 --d-sae 2048   # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--d-in", type=int, default=576, help="SmolLM2-135M's d_model by default")
    parser.add_argument("--d-sae", type=int, default=16_384)
    parser.add_argument("--l0", type=float, default=64, help="target firing latents per token")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--shard-rows", type=int, default=65_536)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--phase", default="all", choices=["all", "analyze"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def synthesise_store(path: Path, args) -> None:
    """Shards like `collect` writes (BOS dropped from each window), float16 activations."""
    from sae.store import shard_name, write_shard
    from sae.files import write_json
    gen = torch.Generator().manual_seed(0)
    per_window = args.context_size - 1
    shards, shard_rows, written, doc = [], [], 0, 0
    path.mkdir(parents=True, exist_ok=True)
    while written < args.tokens:
        n_windows = max(1, min(args.shard_rows, args.tokens - written) // per_window)
        rows = min(n_windows * per_window, args.tokens - written)
        n_windows = -(-rows // per_window)
        window_tokens = torch.randint(0, 49_152, (n_windows, args.context_size), generator=gen, dtype=torch.int32)
        window_index = torch.arange(rows, dtype=torch.int64) // per_window
        position = (torch.arange(rows) % per_window + 1).to(torch.int32)
        tensors = {f"activations.0": torch.randn(rows, args.d_in, generator=gen).to(torch.float16),
                   "token_ids": window_tokens[window_index, position.long()],
                   "window_tokens": window_tokens, "window_index": window_index, "position": position,
                   "doc_id": (window_index + doc).to(torch.int64)}
        name = shard_name(len(shards))
        write_shard(path / name, tensors)
        shards.append(name)
        shard_rows.append(rows)
        written += rows
        doc += n_windows
    write_json(path / "manifest.json", {
        "model": None, "layers": [0], "site": "resid_post", "d_model": args.d_in, "n_tokens": written,
        "context_size": args.context_size, "dataset": "synthetic", "dtype": "float16", "shards": shards,
        "shard_rows": shard_rows, "held_out": {"rule": "none", "modulus": 20}})


def synthesise_run(path: Path, store_path: Path, args) -> None:
    """A ReLU SAE whose per-latent bias makes each latent fire on about l0 / d_sae of the tokens."""
    from sae import variants
    from sae.runs import save_run
    from sae.store import ActivationStore
    torch.manual_seed(0)
    model = variants.create("relu", d_in=args.d_in, d_sae=args.d_sae)
    sample = next(ActivationStore(store_path).activations(0, batch_size=8192))      # [8192, d_in]
    with torch.no_grad():
        pre = sample @ model.W_enc                                                  # [8192, d_sae]
        keep = max(1, int(round(len(sample) * args.l0 / args.d_sae)))
        model.b_enc.copy_(-pre.topk(keep, dim=0).values[-1])
    save_run(model, path, {"layer": 0, "site": "resid_post"})


def run_analysis(args) -> None:
    """Child process: analyse and print one JSON line."""
    from sae.analyze.pipeline import AnalyzeOptions, analyze
    from sae.devices import keep_freed_memory
    keep_freed_memory()  # as `sae analyze` does (sae.cli)
    started, cpu_started = time.perf_counter(), time.process_time()
    meta = analyze(Path(args.dir) / "run", Path(args.dir) / "store", force=True, log=None,
                   options=AnalyzeOptions(batch_size=args.batch_size, device=args.device, with_model=False))
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"total_s": total, "cpu_s": cpu, "pass_s": meta["pass_seconds"], "peak_rss_mib": peak_kib / 1024,
                      "n_dead": meta["n_dead"]}))


def time_encoder_matmul(args) -> tuple[float, float]:
    """x @ W_enc alone over the same tokens, same batch size (float32, data already in memory), through the
    faster of torch.matmul (MKL) and sae.matmul's oneDNN path (which the analysis itself uses)."""
    from sae.devices import keep_freed_memory
    from sae.kernels.matmul import raw_addmm
    keep_freed_memory()  # as the analysis child does: each oneDNN call allocates its [batch, d_sae] result
    x = torch.randn(args.batch_size, args.d_in)
    W_enc = torch.randn(args.d_in, args.d_sae)
    out = torch.empty(args.batch_size, args.d_sae)
    paths = {"torch.matmul": lambda rows: torch.matmul(x[:rows], W_enc, out=out[:rows]),
             "sae.kernels.matmul": lambda rows: raw_addmm(None, x[:rows], W_enc)}
    best = None
    for product in paths.values():
        product(args.batch_size)
        started, cpu_started = time.perf_counter(), time.process_time()
        done = 0
        while done < args.tokens:
            rows = min(args.batch_size, args.tokens - done)
            product(rows)
            done += rows
        timing = (time.perf_counter() - started, time.process_time() - cpu_started)
        best = timing if best is None or timing[0] < best[0] else best
    return best


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phase == "analyze":
        run_analysis(args)
        return
    temporary = args.dir is None
    work = Path(tempfile.mkdtemp(prefix="bench_analyze_")) if temporary else Path(args.dir)
    args.dir = str(work)
    try:
        if not (work / "store" / "manifest.json").is_file():
            print(f"synthesising {args.tokens:,} tokens x d_in {args.d_in} in {work} ...", flush=True)
            synthesise_store(work / "store", args)
        synthesise_run(work / "run", work / "store", args)
        command = [sys.executable, __file__, "--phase", "analyze", "--dir", str(work),
                   "--batch-size", str(args.batch_size), "--device", args.device]
        if args.threads:
            command += ["--threads", str(args.threads)]
        child = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if child.returncode != 0:
            sys.exit(f"analysis failed:\n{child.stderr}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        matmul_s, matmul_cpu = time_encoder_matmul(args)
        from roofline import square_matmul_gflops
        roofline = square_matmul_gflops()
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    flops = 2 * args.tokens * args.d_in * args.d_sae
    matmul_gflops = flops / matmul_s / 1e9
    analyze_gflops = flops / result["total_s"] / 1e9
    rows = [
        ("tokens x latents", f"{args.tokens:,} x {args.d_sae:,} (d_in {args.d_in}, target L0 {args.l0:g})"),
        ("torch threads", f"{torch.get_num_threads()}"),
        ("machine roofline (2048^3 matmul)", f"{roofline:.1f} GFLOP/s"),
        ("encoder matmul alone", f"{matmul_s:.1f} s  ({matmul_gflops:.1f} GFLOP/s, "
                                 f"{matmul_gflops / roofline:.0%} of roofline)"),
        ("analyze: streaming pass", f"{result['pass_s']:.1f} s"),
        ("analyze: total (pass + tables)", f"{result['total_s']:.1f} s  ({analyze_gflops:.1f} GFLOP/s, "
                                           f"{analyze_gflops / roofline:.0%} of roofline)"),
        ("ratio analyze / matmul", f"{result['total_s'] / matmul_s:.2f}  (target <= 2)"),
        ("ratio pass / matmul", f"{result['pass_s'] / matmul_s:.2f}"),
        ("ratio in CPU time (analyze / matmul)", f"{result['cpu_s'] / matmul_cpu:.2f}  "
                                                 f"({result['cpu_s']:.1f} s / {matmul_cpu:.1f} s; fairer on a busy machine)"),
        ("peak RSS of analyze", f"{result['peak_rss_mib']:.0f} MiB  (target < 4096)"),
        ("dead latents", f"{result['n_dead']}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
