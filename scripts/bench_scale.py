"""Benchmark opening big activation stores: memory and time against the row count (issue 19).

Writes synthetic stores (d 16, fp16, 1M-row shards, with per-shard metadata as `sae collect` keeps it) at
three sizes, then, each in a fresh process (peak RSS from os.wait4 of that process):
  open     ActivationStore(STORE) and its first shuffled training batch (in-process timing)
  train    `sae train --variant topk` to its first training step and on to the end of a 1-step run
           (whole process: imports, the init sample, one step, a checkpoint, the held-out scoring)
  eval     `sae eval --max-tokens 65536 --no-model` on that run
  analyze  `sae analyze --max-tokens 65536 --no-model` on that run
Targets at 200M rows: under 10 s and under 2 GiB peak RSS each.

    python scripts/bench_scale.py                         # 2M, 20M, 200M rows (about 8 GB of disk at 200M)
    python scripts/bench_scale.py --rows 1000000 --rows 4000000   # a quick run
    python scripts/bench_scale.py --keep DIR              # keep the stores (default: a temporary folder, removed)

Free disk is checked with df (shutil.disk_usage) before writing: the script refuses a size that would leave
less than 5 GB free.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
D, SHARD_ROWS, DOC_ROWS = 16, 1 << 20, 128


def write_store(path: Path, rows: int) -> float:
    """A synthetic store of `rows` rows, d 16 fp16 (one random shard's rows repeated in every shard: the
    benchmark measures bookkeeping, not content), doc_id = row // 128; returns seconds taken."""
    from sae.store import index as store_index
    from sae.store.layout import FORMAT, HELD_OUT_MODULUS, HELD_OUT_RULE, MANIFEST, shard_name
    from sae.files import write_json
    start = time.perf_counter()
    path.mkdir(parents=True)
    names, shard_rows = [], []
    block = torch.randn(SHARD_ROWS, D, generator=torch.Generator().manual_seed(0)).half()     # [shard, 16], reused
    block_norms = block.float().norm(dim=-1, keepdim=True)                                     # [shard, 1]
    for i, lo in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - lo)
        tensors = {"activations.0": block[:n],                                                 # [n, 16]
                   "doc_id": torch.arange(lo, lo + n, dtype=torch.int64) // DOC_ROWS}         # [n]
        name = shard_name(i)
        save_file(tensors, str(path / name))
        store_index.append(path, store_index.shard_meta(name, tensors, [0], path / name, block_norms[:n]))
        names.append(name)
        shard_rows.append(n)
    write_json(path / MANIFEST, {
        "format": FORMAT, "model": None, "layers": [0], "site": "resid_post", "d_model": D, "n_tokens": rows,
        "context_size": None, "dataset": "synthetic", "dtype": "float16", "shards": names, "shard_rows": shard_rows,
        "held_out": {"rule": HELD_OUT_RULE, "modulus": HELD_OUT_MODULUS}, "source": "bench_scale", "complete": True})
    return time.perf_counter() - start


OPEN = """
import sys, time
begin = time.perf_counter()
from sae.store import ActivationStore
start = time.perf_counter()
store = ActivationStore(sys.argv[1])
opened = time.perf_counter() - start
batch = next(store.train_batches(0, 4096, seed=0))
print(f"{opened:.3f} {time.perf_counter() - start:.3f} {start - begin:.3f} {len(store)} {store.split_size('held_out')}")
"""


def run_child(argv: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in GiB, stdout) of one fresh process, its peak RSS from GNU time (%M): a child
    spawned straight from this process would inherit this process's own high-water mark through exec."""
    import subprocess
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *argv], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"}, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(argv[1:5])}… failed: {done.stderr.strip().splitlines()[-3:]}")
    kb = [line for line in done.stderr.splitlines() if line.startswith("MAXRSS_KB ")][-1].split()[1]
    return seconds, int(kb) / 2**20, done.stdout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="store sizes (default 2M, 20M, 200M)")
    parser.add_argument("--keep", help="write the stores under this folder and keep them")
    parser.add_argument("--max-tokens", type=int, default=65536)
    args = parser.parse_args(argv)
    sizes = args.rows or [2_000_000, 20_000_000, 200_000_000]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_scale_", dir=os.environ.get("TMPDIR")))
    base.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    rows_out = []
    load = os.getloadavg()
    print(f"bench_scale: d {D} fp16, {SHARD_ROWS:,}-row shards, doc_id = row // {DOC_ROWS}; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs", flush=True)
    try:
        for rows in sizes:
            need = rows * (2 * D + 8)
            free = shutil.disk_usage(base).free
            if free - need < 5 << 30:
                print(f"skipping {rows:,} rows: it needs {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free")
                continue
            store = base / f"store_{rows}"
            write_s = write_store(store, rows)
            run = base / f"run_{rows}"
            open_s, open_rss, out = run_child([python, "-c", OPEN, str(store)])
            opened, first_batch, imports = (float(x) for x in out.split()[:3])
            train = [python, "-m", "sae", "train", "--activations", str(store), "--variant", "topk", "--k", "4",
                     "--expansion", "4", "--tokens", "4096", "--batch-size", "4096", "--device", "cpu",
                     "--out", str(run)]
            train_s, train_rss, _ = run_child(train)
            common = ["--run", str(run), "--activations", str(store), "--max-tokens", str(args.max_tokens),
                      "--no-model", "--device", "cpu"]
            eval_s, eval_rss, _ = run_child([python, "-m", "sae", "eval", *common, "--json"])
            analyze_s, analyze_rss, _ = run_child([python, "-m", "sae", "analyze", *common, "--out", str(base / f"analysis_{rows}")])
            size = sum(p.stat().st_size for p in store.iterdir())
            row = {"rows": rows, "shards": len(list(store.glob("shard_*"))), "store_gib": size / 2**30,
                   "write_s": write_s, "open_s": opened, "first_batch_s": first_batch, "import_s": imports,
                   "open_rss": open_rss,
                   "train_s": train_s, "train_rss": train_rss, "eval_s": eval_s, "eval_rss": eval_rss,
                   "analyze_s": analyze_s, "analyze_rss": analyze_rss}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(store)
                shutil.rmtree(run, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("| rows | shards | store | open + first batch (after imports) | imports | peak RSS | `sae train`, whole "
          "1-step run | peak RSS | `eval --max-tokens` | peak RSS | `analyze --max-tokens` | peak RSS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['rows']:,} | {r['shards']} | {r['store_gib']:.2f} GiB | {r['first_batch_s']:.2f} s "
              f"(open {r['open_s']:.2f} s) | {r['import_s']:.1f} s | {r['open_rss']:.2f} GiB | {r['train_s']:.1f} s | "
              f"{r['train_rss']:.2f} GiB | "
              f"{r['eval_s']:.1f} s | {r['eval_rss']:.2f} GiB | {r['analyze_s']:.1f} s | {r['analyze_rss']:.2f} GiB |")


if __name__ == "__main__":
    main()
