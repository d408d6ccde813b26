"""Benchmark `sae train` per variant on SmolLM2 layer-6 activations of the embedded BBC corpus.

    python scripts/bench_train.py                   # every registered variant, full size (the lead's run)
    python scripts/bench_train.py --variant topk    # one variant
    python scripts/bench_train.py --activations STORE --tokens 16384   # a quick smoke run

Each variant is trained by a separate `python -m sae train` process, timed from start to exit
(imports, initialisation, checkpoints and the held-out scoring included). Beside each figure the
table prints the machine's own matmul rate, measured on a [batch, d_in] × [d_in, d_sae] product just before
and just after the variant's run (the faster of the two: these machines drift by several percent within
minutes), and the fraction of the roofline reached:
  dense variants       10·d_in·d_sae FLOP a token (forward 4, backward about 6);
  TopK family (any variant with a `k` knob): the encoder-only limit 2·d_in·d_sae FLOP a token
  (issue 4: only the encoder's product needs to be dense);
  penalty variants that decode sparse codes (jumprelu, gated, l1): the encoder's product and its weight
  gradient, 4·d_in·d_sae (the decoder, its gradient and the codes' gradient are sparse once codes are).
jumprelu runs with --target-l0 32 unless --set names that knob (other --set knobs add to it).
Held-out FVU, L0 and dead fraction come from the run's train_summary.json (up to 16,384 held-out
tokens of the store's fixed doc_id split), then the L0–FVU pairs of the sparse families.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ["topk", "batchtopk", "jumprelu", "gated", "l1"]
# knobs the bench gives unless --set names the variant: jumprelu at the TopK family's L0 (issue 22's target)
DEFAULT_SET = {"jumprelu": ["--target-l0", "32"]}


def cache_dir() -> Path:
    return Path(os.environ.get("SAE_CACHE", Path.home() / ".cache" / "sae"))


def ensure_store(args) -> Path:
    """The bench store: --activations, or SmolLM2 layer 6 collected once into the cache."""
    if args.activations:
        return Path(args.activations)
    store = cache_dir() / "bench" / f"smollm2_l6_resid_post_bbc_{args.collect_tokens}"
    if not (store / "manifest.json").is_file() or not json.loads((store / "manifest.json").read_text()).get("complete", True):
        print(f"collecting {args.collect_tokens:,} tokens of SmolLM2 layer-6 activations into {store} (once)",
              file=sys.stderr)
        subprocess.run([sys.executable, "-m", "sae", "collect", "--model", "smollm2", "--dataset", "bbc",
                        "--layers", "6", "--site", "resid_post", "--context-size", "128",
                        "--tokens", str(args.collect_tokens), "--out", str(store), "--resume"],
                       cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return store


def matmul_gflops(batch: int, d_in: int, d_sae: int, device: str, repeats: int = 20,
                  bf16: bool = False) -> tuple[float, str]:
    """Best-of-N rate of a [batch, d_in] × [d_in, d_sae] product and how it was reached: on the CPU the
    faster of torch.mm (MKL) and oneDNN, in fp32 (sae.matmul: training uses the faster one, so the limit
    must too) or, for runs with --bf16, in bf16; bf16 torch.mm on CUDA."""
    if device != "cuda":
        from roofline import best_cpu_gflops
        rates = best_cpu_gflops(batch, d_in, d_sae, repeats, bf16=bf16)
        best = max(rates, key=rates.get)
        detail = ", ".join(f"{name} {rate:,.0f}" for name, rate in rates.items())
        return rates[best], f"{'bf16' if bf16 else 'fp32'}, best of {detail} GFLOP/s"
    a = torch.randn(batch, d_in, device=device, dtype=torch.bfloat16)
    b = torch.randn(d_in, d_sae, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * batch * d_in * d_sae / best / 1e9, "bf16 torch.mm"


def train_one(variant: str, store: Path, out: Path, args) -> dict:
    command = [sys.executable, "-m", "sae", "train", "--activations", str(store), "--variant", variant,
               "--out", str(out), "--tokens", str(args.tokens), "--batch-size", str(args.batch_size),
               "--device", args.device, "--seed", str(args.seed), "--force", "--checkpoint-every", "24h"]  # 0 is refused: one at the end
    if args.expansion is not None:
        command += ["--expansion", str(args.expansion)]
    given = args.extra.get(variant, [])                  # --set adds to the bench's defaults, overriding only what it names
    defaults = DEFAULT_SET.get(variant, [])
    command += [part for name, value in zip(defaults[::2], defaults[1::2]) if name not in given[::2]
                for part in (name, value)] + given
    if args.bf16:
        command.append("--bf16")
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        return {"variant": variant, "error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    summary = json.loads((out / "train_summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    held = summary.get("held_out") or {}
    return {"variant": variant, "d_in": config["d_in"], "d_sae": config["d_sae"], "knobs": config.get("knobs", {}),
            "seconds": seconds, "tokens_per_s": summary["tokens"] / seconds,
            "loop_tokens_per_s": summary.get("tokens_per_s"), "fvu": held.get("fvu"), "l0": held.get("l0"),
            "dead_fraction": held.get("dead_fraction"), "held_out_rows": held.get("rows")}


@torch.no_grad()
def score_on_rows(run_dir: Path, path: str, rows: int = 16_384) -> dict:
    """FVU, L0 and dead fraction of a trained run on the last `rows` rows of a safetensors file's
    "activations" (the peers' held-out rows: ../shared/peers/make_acts.py), with the peers' formulas."""
    from safetensors.torch import load_file

    import sae
    x = load_file(path)["activations"].float()[-rows:]                    # [rows, d_in]
    model = sae.load(run_dir)
    codes = model.encode(x)                                                # [rows, d_sae]
    fvu = float((x - model.decode(codes)).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())
    tau = model.fire_threshold
    if tau is None:
        return {"peer_fvu": fvu}
    active = codes > tau
    return {"peer_fvu": fvu, "peer_l0": float(active.sum(dim=1).float().mean()),
            "peer_dead": float(1 - active.any(dim=0).float().mean())}


def flops_per_token(variant: str, d_in: int, d_sae: int, device: str = "cpu") -> tuple[int, str]:
    from sae import variants
    if "k" in variants.get(variant).KNOBS:
        return 2 * d_in * d_sae, "encoder-only 2·d·m"
    if variants.get(variant).sparse_decoding and device == "cpu":   # sparse codes (CPU only): the encoder stays dense
        return 4 * d_in * d_sae, "dense encoder 4·d·m"
    return 10 * d_in * d_sae, "dense 10·d·m"


def parse_extra(items) -> dict:
    """--set topk:k=64 --set l1:l1-coefficient=3 -> {"topk": ["--k", "64"], ...}"""
    extra: dict = {}
    for item in items or []:
        variant, _, assignment = item.partition(":")
        name, _, value = assignment.partition("=")
        extra.setdefault(variant, []).extend([f"--{name}", value])
    return extra


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def main() -> None:
    from sae import variants
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", help="variant(s) to run (default: every registered one)")
    parser.add_argument("--activations", help="an existing store (default: collect SmolLM2 layer 6 once)")
    parser.add_argument("--collect-tokens", type=int, default=147_456, help="tokens collected for the bench store")
    parser.add_argument("--tokens", type=int, default=524_288, help="training budget per variant")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--expansion", type=float, default=None, help="default: each variant's (8×; linear d_in/8)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", metavar="VARIANT:KNOB=VALUE", help="a knob for one variant")
    parser.add_argument("--bf16", action="store_true", help="train with `sae train --bf16` (CPU products with "
                        "bf16 inputs); the roofline is then the machine's bf16 product rate")
    parser.add_argument("--repeat", type=int, default=1, help="train each variant this many times and report "
                        "the try with the median roofline fraction (each against the rates measured beside it)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--keep-runs", metavar="DIR", help="keep the run folders under DIR (default: a temporary folder)")
    parser.add_argument("--peer-rows", metavar="FILE", help="also score every run on the last 16,384 rows of this "
                        "safetensors file, the peers' held-out rows (../shared/peers/make_acts.py writes it)")
    args = parser.parse_args()
    args.extra = parse_extra(args.set)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    names = args.variant or variants.names()
    store_path = ensure_store(args)
    from sae.store import ActivationStore
    store = ActivationStore(store_path)
    d_in = store.d_model
    d_sae_default = int(d_in * (args.expansion or 8))
    gflops, how = matmul_gflops(args.batch_size, d_in, d_sae_default, device, bf16=args.bf16)
    print(f"store {store_path}: {len(store):,} tokens, d_in {d_in}; device {device}, {torch.get_num_threads()} threads; "
          f"measured matmul {args.batch_size}×{d_in}×{d_sae_default}: {gflops:,.1f} GFLOP/s ({how})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:
        runs_dir = Path(args.keep_runs) if args.keep_runs else Path(scratch)
        for name in names:
            if (runs_dir / name).exists():
                shutil.rmtree(runs_dir / name)
            tries = []
            for _ in range(max(1, args.repeat)):
                before = gflops if not rows and not tries else matmul_gflops(args.batch_size, d_in, d_sae_default,
                                                                             device, bf16=args.bf16)[0]
                row = train_one(name, store_path, runs_dir / name, args)
                after = matmul_gflops(args.batch_size, d_in, d_sae_default, device, bf16=args.bf16)[0]
                # the limit beside a run is the faster of the products measured just before and just after
                # it: these machines drift by several percent within minutes; the stricter of the two is used
                row.update(matmul_gflops=max(before, after), matmul_gflops_before=before, matmul_gflops_after=after)
                if "error" not in row:
                    flops, rule = flops_per_token(name, row["d_in"], row["d_sae"], device)
                    limit = row["matmul_gflops"] * 1e9 / flops
                    row.update(roofline_rule=rule, roofline_tokens_per_s=limit,
                               roofline_fraction=row["tokens_per_s"] / limit)
                tries.append(row)
                if "error" in row:
                    break
                if args.repeat > 1:
                    print(f"  {name} try {len(tries)}: " + _line(row), flush=True)
            if "error" not in tries[-1]:   # the try with the median fraction (its run folder is the last one's)
                row = sorted(tries, key=lambda r: r["roofline_fraction"])[(len(tries) - 1) // 2]
                row["fractions_of_tries"] = [r["roofline_fraction"] for r in tries]
                if args.peer_rows:
                    row.update(score_on_rows(runs_dir / name, args.peer_rows))
            rows.append(row)
            print(_line(row), flush=True)
    print()
    print(f"{'variant':<12}{'d_sae':>7}{'tokens/s':>11}{'GFLOP/s':>9}{'roofline tok/s':>16}{'of roofline':>12}  "
          f"{'rule':<20}{'held-out FVU':>13}{'L0':>8}{'dead':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<12}  error: {row['error']}")
            continue
        print(f"{row['variant']:<12}{row['d_sae']:>7}{row['tokens_per_s']:>11,.0f}{row['matmul_gflops']:>9,.0f}"
              f"{row['roofline_tokens_per_s']:>16,.0f}"
              f"{row['roofline_fraction']:>12.1%}  {row['roofline_rule']:<20}{fmt(row['fvu'], '.4f'):>13}"
              f"{fmt(row['l0'], '.1f'):>8}{fmt(row['dead_fraction'], '.2%'):>8}")
    print("(GFLOP/s: the matmul rate measured on this machine just before and just after each run, the faster "
          "of the two; tokens/s = training tokens / wall time of the whole `sae train` process)")
    if args.peer_rows:
        print(f"\non the peers' held-out rows (last 16,384 of {args.peer_rows}):")
        for row in rows:
            if "peer_fvu" in row:
                print(f"  {row['variant']:<12} FVU {row['peer_fvu']:.4f}" + (
                    f", L0 {row['peer_l0']:.1f}, dead {row['peer_dead']:.2%}" if "peer_l0" in row else ""))
    pairs = sorted((r for r in rows if r["variant"] in PAIRS and "error" not in r and r["l0"] is not None),
                   key=lambda r: r["l0"])
    if pairs:
        print("\nL0–FVU pairs (held-out):  " + ",  ".join(f"{r['variant']} L0 {r['l0']:.1f} → FVU {r['fvu']:.4f}"
                                                         for r in pairs))
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_gflops": gflops, "device": device, "rows": rows}, indent=2))


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['variant']}: error: {row['error']}"
    return (f"{row['variant']}: {row['tokens_per_s']:,.0f} tokens/s ({row['roofline_fraction']:.1%} of the "
            f"{row['roofline_rule']} roofline), held-out FVU {fmt(row['fvu'], '.4f')}, L0 {fmt(row['l0'], '.1f')}, "
            f"dead {fmt(row['dead_fraction'], '.2%')}")


if __name__ == "__main__":
    main()
