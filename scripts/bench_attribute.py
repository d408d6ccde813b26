"""Benchmark `sae attribute` (issue 24): a 32-token prompt through the embedded SmolLM2's 30 layers, each MLP
replaced by a topk skip transcoder (k=32, 8x: 4,608 latents; random weights: timing does not depend on them).

It times each stage: the clean pass (freezing norms and attention, encoding, encoder rows), the direct-effect
rows (the logit's, then --max-feature-nodes features', in backward passes of --batch-size targets), pruning and
the JSON (wall seconds, and CPU seconds of all threads: on a busy machine wall time says little, and the CPU
seconds over the core count bound what an idle machine takes); and prints the completeness error, the load
average and the machine's roofline beside.

    python scripts/bench_attribute.py                       # 32 tokens, 256 feature rows, batches of 64 (the defaults of sae attribute)
    python scripts/bench_attribute.py --max-feature-nodes 2048 --batch-size 64
"""
from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = ("The Eiffel Tower is in the city of Paris, and the Colosseum is in the city of Rome. The Brandenburg "
          "Gate stands in the city of Berlin, and the Tower of London is in the city of")


def random_transcoders(n_layers: int, d_model: int, expansion: int, k: int, seed: int = 0):
    from sae.variants.transcoder import make_transcoder
    torch.manual_seed(seed)
    made = []
    for _ in range(n_layers):
        model = make_transcoder("topk", d_model, expansion * d_model, skip=True, k=k)
        with torch.no_grad():
            model.W_enc.normal_(0, d_model ** -0.5)
            model.W_dec.normal_(0, 0.1 * d_model ** -0.5)
            model.W_skip.normal_(0, 0.1 * d_model ** -0.5)
        made.append(model.eval())
    return made


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    parser.add_argument("--max-feature-nodes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from roofline import square_matmul_gflops

    from sae.attribute.effects import direct_effect_rows
    from sae.attribute.graph import build_graph
    from sae.attribute.pipeline import check_completeness
    from sae.attribute.replacement import Part, ReplacementModel
    from sae.devices import resolve
    from sae.lm import load_model
    device = resolve(args.device)
    loaded = load_model(args.model, device=device, dtype="float32")
    ids = loaded.tokenizer(PROMPT * 4)["input_ids"][:args.tokens]
    input_ids = torch.tensor([ids], device=device)
    parts = {layer: Part(layer, "transcoder", tc.to(device), run=f"random/layer_{layer}")
             for layer, tc in enumerate(random_transcoders(loaded.n_layers, loaded.d_model, args.expansion, args.k))}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, cpu = {}, {}
    start, cpu_start = time.perf_counter(), time.process_time()
    mark_cpu = cpu_start
    rm = ReplacementModel(loaded, parts)
    with torch.no_grad():
        clean = rm.prepare(input_ids)
    sync()
    times["clean pass"] = time.perf_counter() - start
    cpu["clean pass"], mark_cpu = time.process_time() - mark_cpu, time.process_time()
    token = int(clean[-1].argmax())
    mark = time.perf_counter()
    rows = direct_effect_rows(rm, token, args.max_feature_nodes, args.batch_size, progress=False)
    sync()
    times["direct-effect rows"] = time.perf_counter() - mark
    cpu["direct-effect rows"], mark_cpu = time.process_time() - mark_cpu, time.process_time()
    mark = time.perf_counter()
    done = check_completeness(rm, rows.logit, token)
    graph = build_graph(rm, rows, token, loaded.tokenizer.decode([token]), 0.8, 0.98)
    times["completeness, pruning, graph"] = time.perf_counter() - mark
    cpu["completeness, pruning, graph"] = time.process_time() - mark_cpu
    total, total_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    roofline = square_matmul_gflops(device=device)
    load = os.getloadavg()
    print(f"\n{loaded.name}: {loaded.n_layers} layers, {args.tokens}-token prompt, topk k={args.k} skip transcoders "
          f"x{args.expansion}; {rm.n_features:,} active features, {len(rows.visited)} feature rows "
          f"(batch {args.batch_size}); device {device}\n")
    print("| stage | wall s | CPU s (all threads) |\n|---|---:|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.2f} | {cpu[name]:.2f} |")
    print(f"| **total** | **{total:.2f}** | {total_cpu:.2f} |")
    print(f"\ngraph: {graph['counts']['nodes']} nodes, {graph['counts']['edges']} edges kept; completeness: "
          f"|direct + bias - logit| = {abs(done['direct_sum'] + done['bias'] - done['logit']):.3g} "
          f"(logit {done['logit']:.4g}, relative {done['relative_error']:.1e}, "
          f"{abs(done['direct_sum'] + done['bias'] - done['logit']) / done['direct_abs_sum']:.1e} of sum |effects|)")
    print(f"machine roofline ({'bf16' if device.type == 'cuda' else 'fp32'} 2048^3 matmul): {roofline:,.1f} GFLOP/s; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
