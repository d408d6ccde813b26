"""Benchmark `sae collect` against the bare model forward truncated at the hooked layer.

Both paths see the same windows (the first N windows of the packed dataset) in the same batches,
in one process, alternating, best of --repeats. The bare path runs the model's base module with its
block list cut after the hooked layer (no hooks, no LM head, nothing stored). The collect path is
sae.collect.collect() end to end: tokenising, hooked forward with early stop, row selection,
shard writing and the manifest. Target: collect >= 0.9x bare.

    python scripts/bench_collect.py                       # SmolLM2 layer 6, context 128 (full size)
    python scripts/bench_collect.py --windows 16          # a quick smoke run
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def matmul_roofline(repeats: int = 30) -> float:
    """Best fp32 matmul GFLOP/s on this machine (shapes like one MLP projection), through the faster of
    torch.mm and oneDNN: the model's linears run on the faster one (sae.matmul.accelerate_linears)."""
    from roofline import best_cpu_gflops
    return max(best_cpu_gflops(1024, 576, 1536, repeats).values())


def forward_flops(model: nn.Module, blocks: nn.ModuleList, layer: int, tokens: int, context: int, d_model: int) -> float:
    """Approximate FLOPs of the truncated forward: 2·params of blocks 0..layer per token + attention."""
    params = sum(p.numel() for block in blocks[:layer + 1] for p in block.parameters())
    attention = 2 * 2 * context * d_model * (layer + 1)  # QK^T and AV per token (full, not causal-halved)
    return tokens * (2 * params + attention)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", default="bbc")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--site", default="resid_post")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--windows", type=int, default=160, help="windows per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from sae.collect import CollectOptions, collect
    from sae.data import PAD_DOC, load_documents, pack_windows
    from sae.lm import block_list, load_model

    loaded = load_model(args.model)
    documents, _ = load_documents(args.dataset)
    windows = []
    for window in pack_windows(documents, loaded.tokenizer, args.context_size, loaded.bos_id, loaded.eos_id,
                               loaded.pad_id):
        windows.append(window)
        if len(windows) == args.windows:
            break
    special = torch.tensor(sorted(loaded.special_ids))
    kept_rows = sum(int(((w.doc_ids != PAD_DOC) & ~torch.isin(w.input_ids, special)).sum()) for w in windows)
    batches = [torch.stack([w.input_ids for w in windows[i:i + args.batch_size]])
               for i in range(0, len(windows), args.batch_size)]
    n_tokens = sum(b.numel() for b in batches)

    blocks_path, blocks = block_list(loaded.model)
    parent_path, _, attr = blocks_path.rpartition(".")
    base = loaded.model.get_submodule(parent_path) if parent_path else loaded.model
    truncated = nn.ModuleList(list(blocks)[:args.layer + 1])
    extra = {"use_cache": False} if getattr(loaded.model.config, "use_cache", None) is not None else {}

    def bare() -> float:
        setattr(base, attr, truncated)
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                for input_ids in batches:
                    base(input_ids=input_ids, **extra)
            return time.perf_counter() - start
        finally:
            setattr(base, attr, blocks)

    scratch = Path(tempfile.mkdtemp(prefix="bench_collect_"))

    def collected() -> float:
        out = scratch / "store"
        shutil.rmtree(out, ignore_errors=True)
        options = CollectOptions(model=args.model, layers=[args.layer], site=args.site, dataset=args.dataset,
                                 out=out, tokens=kept_rows, context_size=args.context_size,
                                 batch_size=args.batch_size, progress=False)
        start = time.perf_counter()
        result = collect(options, loaded=loaded)
        elapsed = time.perf_counter() - start
        assert result.n_tokens == kept_rows, (result.n_tokens, kept_rows)
        return elapsed

    bare()  # warm-up
    times = {"bare": [], "collect": []}
    for _ in range(args.repeats):
        times["bare"].append(bare())
        times["collect"].append(collected())
    shutil.rmtree(scratch, ignore_errors=True)

    roofline = matmul_roofline()
    flops = forward_flops(loaded.model, blocks, args.layer, n_tokens, args.context_size, loaded.d_model)
    bare_best, collect_best = min(times["bare"]), min(times["collect"])
    print(f"\nbench_collect: {args.model} layer {args.layer} {args.site}, context {args.context_size}, "
          f"batch {args.batch_size} windows, {len(windows)} windows = {n_tokens:,} tokens fed "
          f"({kept_rows:,} rows stored), best of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"machine: float32 matmul roofline {roofline:,.1f} GFLOP/s (measured, 1024x576 @ 576x1536)")
    print()
    print("| path | tokens fed/s | rows stored/s | vs bare | GFLOP/s | of roofline |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds in (("bare forward, truncated at the layer", bare_best), ("sae collect (end to end)", collect_best)):
        print(f"| {name} | {n_tokens / seconds:,.0f} | {kept_rows / seconds:,.0f} | {bare_best / seconds:.2f}x | "
              f"{flops / seconds / 1e9:,.1f} | {flops / seconds / 1e9 / roofline:.0%} |")
    ratio = bare_best / collect_best
    print(f"\ncollect / bare = {ratio:.2f} (target >= 0.90){'' if ratio >= 0.9 else '  BELOW TARGET'}")


if __name__ == "__main__":
    sys.exit(main())
