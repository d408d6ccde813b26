"""Benchmark transcoders (issue 24): SmolLM2 layer 6, mlp_in -> mlp_out, TopK k=32 at 8x expansion, plain and
skip transcoders at equal k. Collects one store with both sites (`sae collect --site mlp_in --target-site
mlp_out`), trains both, and scores each with `sae eval`'s evaluate(): FVU of the MLP output on held-out rows and
the CE loss recovered with the MLP output replaced by the transcoder's prediction (baseline: the MLP output
zero-ablated). Prints a table with the machine's roofline and load.

    python scripts/bench_transcoder.py                                  # the defaults: a few minutes on a CPU
    python scripts/bench_transcoder.py --collect-tokens 20000 --train-tokens 40960 --windows 8   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", default="bbc")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=float, default=8.0)
    parser.add_argument("--collect-tokens", type=int, default=400_000, help="rows collected (both sites)")
    parser.add_argument("--train-tokens", type=int, default=1_200_000, help="training budget of each transcoder")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--windows", type=int, default=64, help="held-out windows replayed for the CE figures")
    parser.add_argument("--kinds", default="plain,skip", help="which to train here: plain, skip or both (two "
                                                             "processes can share --work; each prints the table)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default=None, help="folder for the store and runs (default: a temporary one; "
                                                      "a store already there is reused)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    from sae.collect import CollectOptions, collect
    from sae.devices import resolve
    from sae.evaluate.metrics import evaluate
    from sae.lm import load_model
    from sae.store import ActivationStore
    from sae.train.trainer import TrainOptions, train_on_store
    sys.path.insert(0, str(Path(__file__).parent))
    from roofline import square_matmul_gflops

    device = resolve(args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_transcoder_"))
    store_path = work / "store"
    loaded = load_model(args.model, device=device)
    started = time.perf_counter()
    if not (store_path / "manifest.json").is_file():
        collect(CollectOptions(model=args.model, dataset=args.dataset, layers=[args.layer], site="mlp_in",
                               target_site="mlp_out", out=store_path, tokens=args.collect_tokens, context_size=128,
                               batch_size=16, device=str(device)), loaded=loaded)
    store = ActivationStore(store_path)
    collect_seconds = store.manifest.get("collect_seconds") or time.perf_counter() - started
    kinds = ["plain", "skip"] if args.kinds == "both" else args.kinds.split(",")
    if set(kinds) - {"plain", "skip"}:
        raise SystemExit(f"--kinds: plain, skip, both or plain,skip; got {args.kinds!r}")
    for skip in [kind == "skip" for kind in kinds]:
        run = work / ("skip_transcoder" if skip else "transcoder")
        options = TrainOptions(tokens=args.train_tokens, batch_size=args.batch_size, lr=args.lr, seed=0,
                               device=str(device), checkpoint_every=0, log_every=50, eval_rows=0)
        begin = time.perf_counter()
        summary = train_on_store(store, "topk", run, options, knobs={"k": args.k}, expansion=args.expansion,
                                 transcoder=True, skip=skip, force=True, progress=True)
        train_seconds = time.perf_counter() - begin
        result = evaluate(run, store, device=device, loaded_model=loaded, max_windows=args.windows, probe=False,
                          progress=True)
        (run / "bench.json").write_text(json.dumps({"eval": result, "d_sae": summary["d_sae"],
                                                    "train_seconds": train_seconds}))
    done = [(name, work / folder / "bench.json") for name, folder in
            (("transcoder", "transcoder"), ("skip transcoder", "skip_transcoder"))]
    rows = [(name, json.loads(path.read_text())) for name, path in done if path.is_file()]
    load = os.getloadavg()
    roofline = square_matmul_gflops(device=device)
    print(f"\nSmolLM2 layer {args.layer} mlp_in -> mlp_out, topk k={args.k}, {args.expansion:g}x "
          f"(d_sae {rows[0][1]['d_sae']}), {len(store):,} rows collected in {collect_seconds:.0f} s, "
          f"{args.train_tokens:,} training tokens each, batch {args.batch_size}; device {device}, "
          f"roofline {roofline:,.0f} GFLOP/s, load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    print("| transcoder | FVU (MLP out) | L0 | CE clean | CE spliced | CE zero-abl. | CE recovered | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, saved in rows:
        result, seconds = saved["eval"], saved["train_seconds"]
        print(f"| {name} | {result['fvu']:.4f} | {result['l0']:.1f} | {result.get('ce_loss_clean', float('nan')):.4f} "
              f"| {result.get('ce_loss_spliced', float('nan')):.4f} | "
              f"{result.get('ce_loss_zero_ablated', float('nan')):.4f} | "
              f"{result.get('ce_loss_recovered') or float('nan'):.4f} | {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
