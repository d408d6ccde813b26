"""Benchmark live training (issue 10): SmolLM2, context 128, TopK k=32, 8× expansion.

For layer 6 alone and for layers 3,6,9 together it measures
  model   — tokens/s of the forward pass alone (stopped after the deepest layer), the producer's work;
  SAE     — tokens/s of the SAE training steps alone (one Trainer per layer) on activations in memory;
  live    — tokens/s of `sae.live.train_live` end to end (model and SAEs overlapping);
and prints live / min(model, SAE) (target ≥ 0.85: the two overlap) and the cost of three layers
against one (target: well under 3×). The machine's roofline (a measured square matmul) is printed beside.

    python scripts/bench_live.py                                   # full size (the defaults)
    python scripts/bench_live.py --tokens 8192 --sae-steps 10 --model-tokens 4096 --layer-sets 6   # smoke
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", default="bbc")
    parser.add_argument("--site", default="resid_post")
    parser.add_argument("--layer-sets", default="6;3,6,9", help="';'-separated layer lists (default '6;3,6,9')")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=4096, help="SAE batch (tokens per step)")
    parser.add_argument("--model-batch", type=int, default=32, help="windows per forward pass")
    parser.add_argument("--tokens", type=int, default=1 << 20, help="training budget of the live run")
    parser.add_argument("--model-tokens", type=int, default=1 << 18, help="tokens forwarded for 'model alone'")
    parser.add_argument("--sae-steps", type=int, default=100, help="steps timed for 'SAE alone'")
    parser.add_argument("--buffer-size", default="256MB")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="SAE steps with bf16 products (`sae train --bf16`)")
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def documents(args):
    from sae.data import load_documents
    return load_documents(args.dataset)[0]


def model_alone(loaded, args, layers, device) -> tuple[float, dict]:
    """Forward passes over packed training windows, stopped after the deepest layer. Returns (tokens/s, a
    sample of activations per layer for the SAE-alone measurement)."""
    from sae.train.producer import LiveSpec, Producer
    spec = LiveSpec(site=args.site, layers=layers, batch_size=args.batch_size, generation_rows=args.batch_size,
                    context_size=args.context_size, model_batch=args.model_batch)
    producer = Producer(loaded, lambda: documents(args), spec, device)
    batches = producer._batches(0)
    producer.forward([w for _, w in next(batches)[1]])   # warm-up
    sample = {layer: [] for layer in layers}
    tokens, seconds = 0, 0.0
    while tokens < args.model_tokens:
        windows = [w for _, w in next(batches)[1]]
        sync(device)
        start = time.perf_counter()
        acts = producer.forward(windows)
        sync(device)
        seconds += time.perf_counter() - start
        tokens += sum(len(w.input_ids) for w in windows)
        for layer in layers:
            if sum(len(x) for x in sample[layer]) < 4 * args.batch_size:
                sample[layer].append(acts[layer].reshape(-1, acts[layer].shape[-1])[1:])
    return tokens / seconds, {layer: torch.cat(parts) for layer, parts in sample.items()}


def sae_alone(sample: dict, args, device) -> float:
    """One Trainer per layer stepping on in-memory activations: the consumer's work."""
    from sae import variants
    from sae.train.trainer import TrainOptions, Trainer
    options = TrainOptions(tokens=args.sae_steps * args.batch_size, batch_size=args.batch_size,
                           device=str(device), checkpoint_every=0, eval_rows=0, cpu_bf16=args.bf16)
    trainers = {}
    for layer, rows in sample.items():
        model = variants.create("topk", rows.shape[1], expansion=args.expansion, k=args.k)
        trainers[layer] = Trainer(model, options, None, device=device)
        trainers[layer].init_from_sample(rows)
    batches = {layer: [rows[i:i + args.batch_size] for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)]
               for layer, rows in sample.items()}
    for layer, trainer in trainers.items():       # warm-up
        trainer.step(batches[layer][0])
    sync(device)
    start = time.perf_counter()
    for step in range(args.sae_steps - 1):
        for layer, trainer in trainers.items():
            trainer.step(batches[layer][step % len(batches[layer])])
    sync(device)
    return (args.sae_steps - 1) * args.batch_size / (time.perf_counter() - start)


def live_run(loaded, args, layers, device) -> float:
    from sae.train.live import LiveOptions, train_live
    from sae.train.options import TrainOptions
    options = TrainOptions(tokens=args.tokens, batch_size=args.batch_size, device=str(device),
                           checkpoint_every=0, eval_rows=0, log_every=50, cpu_bf16=args.bf16)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        source = LiveOptions(model=loaded.name, layers=layers, site=args.site, dataset=args.dataset,
                             context_size=args.context_size, model_batch=args.model_batch,
                             buffer_size=args.buffer_size)
        train_live(loaded, lambda: documents(args), source, variant="topk", out=f"{out}/run", options=options,
                   knobs={"k": args.k}, expansion=args.expansion)
        sync(device)
        return args.tokens / (time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    from roofline import square_matmul_gflops
    from sae.devices import keep_freed_memory, resolve
    keep_freed_memory()  # as `sae train` does (sae.cli)
    from sae.lm import load_model
    device = resolve(args.device)
    loaded = load_model(args.model, device=device)
    roofline = square_matmul_gflops(device=device)
    rows = []
    for text in args.layer_sets.split(";"):
        layers = [int(x) for x in text.split(",")]
        model_tps, sample = model_alone(loaded, args, layers, device)
        sae_tps = sae_alone(sample, args, device)
        live_tps = live_run(loaded, args, layers, device)
        rows.append((text, model_tps, sae_tps, live_tps, live_tps / min(model_tps, sae_tps)))
        print(f"layers {text}: model {model_tps:,.0f} tok/s, SAE {sae_tps:,.0f} tok/s, live {live_tps:,.0f} tok/s",
              flush=True)
    d_sae = int(loaded.d_model * args.expansion)
    print(f"\nlive training, {args.model} {args.site}, context {args.context_size}, topk k={args.k}, "
          f"d_sae {d_sae}, SAE batch {args.batch_size}, model batch {args.model_batch} windows, device {device}")
    print(f"machine roofline ({'bf16' if device.type == 'cuda' else 'fp32'} 2048³ matmul): {roofline:,.1f} GFLOP/s; "
          f"SAE encoder+decoder ≈ {6 * loaded.d_model * d_sae / 1e6:.1f} MFLOP/token/layer (dense-equivalent fwd+bwd "
          f"of the encoder)")
    print(f"{'layers':<10}{'model tok/s':>14}{'SAE tok/s':>12}{'live tok/s':>12}{'live/slower':>13}")
    for text, model_tps, sae_tps, live_tps, ratio in rows:
        print(f"{text:<10}{model_tps:>14,.0f}{sae_tps:>12,.0f}{live_tps:>12,.0f}{ratio:>13.2f}")
    if len(rows) > 1:
        one, many = rows[0], rows[-1]
        print(f"cost of layers {many[0]} vs {one[0]} (live time per token): {one[3] / many[3]:.2f}×")
    print("targets: live/slower ≥ 0.85; three layers well under 3× one")


if __name__ == "__main__":
    main()
