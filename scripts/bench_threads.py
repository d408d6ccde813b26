"""Threading policy benchmark: representative operations with OpenMP's default waiting, with
OMP_WAIT_POLICY=PASSIVE and with fewer threads, on the machine as it is ("idle": nothing of ours beside
it) and beside a competing load (a second process multiplying matrices on every core).

    python scripts/bench_threads.py [--ops train,loss_effect,steer,probe] [--settings default,passive,threads1]
                                    [--loads idle,loaded] [--model smollm2] [--train-tokens 65536]

Each (setting, load) runs in a fresh process, since OpenMP reads its environment when torch loads; model
loading is not timed. Operations:
- train: `sae train` (topk, k 32, 8 x 576 = 4,608 latents) on a random 576-wide store: tokens/s of its loop;
- loss_effect: the dashboard's loss effect of one feature on 8 contexts of 64 tokens (dashboard.live);
- steer: 30 steered tokens, sampled (dashboard.live.generate with a steering function);
- probe: one live probe of a 40-token text (dashboard.live.probe).
Prints `uptime`'s load beside the table, and the machine roofline (scripts/roofline.py). The figures
decide sae.threads' policy; the table goes in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {"SAE_THREADS": "default"},                                 # OpenMP as it comes: spin-waits
    "passive": {"SAE_THREADS": "default", "OMP_WAIT_POLICY": "PASSIVE"},
    "threads1": {"SAE_THREADS": "default", "OMP_NUM_THREADS": "1"},
}
SITE, LAYER, FEATURE = "resid_post", 6, 7
TEXT = ("The government said on Monday that it would cut taxes for small firms, while the opposition argued "
        "that the plan would widen the deficit and do little for growth in the coming year.")


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# ---- the child: one setting, every operation ------------------------------------------------------
def child(args) -> None:
    import torch
    results = {"threads": torch.get_num_threads()}
    ops = args.ops.split(",")
    if "train" in ops:
        results["train_tokens_per_s"] = train_rate(args)
    if any(op in ops for op in ("loss_effect", "steer", "probe")):
        from dashboard import live
        from sae import variants
        from sae.lm import load_model
        loaded = load_model(args.model, device="cpu")
        torch.manual_seed(0)
        sae_model = variants.create("topk", d_in=loaded.d_model, d_sae=8 * loaded.d_model, k=32).eval()
        ids = live.encode_text(loaded, (TEXT + " ") * 4)
        contexts = [ids[i:i + 64] for i in range(0, 8 * 8, 8)]            # 8 overlapping 64-token contexts
        timed = {"loss_effect": lambda: live.loss_effect(loaded, sae_model, SITE, LAYER, FEATURE, contexts),
                 "steer": lambda: live.generate(loaded, "I think that", seed=0, max_new_tokens=30, temperature=0.7,
                                                steer=live.steer_fn(sae_model, FEATURE, "add", 8.0), site=SITE,
                                                layer=LAYER),
                 "probe": lambda: live.probe(loaded, sae_model, SITE, LAYER, TEXT)}
        for op in ops:
            if op in timed:
                timed[op]()                                                  # warm-up
                start = time.perf_counter()
                timed[op]()
                results[f"{op}_s"] = time.perf_counter() - start
    print(json.dumps(results))


def train_rate(args) -> float:
    import torch
    from sae.store import ActivationStore
    folder = Path(tempfile.mkdtemp(prefix="bench_threads_"))
    torch.manual_seed(0)
    ActivationStore.from_tensors(folder / "store", torch.randn(args.train_tokens, 576).half())
    command = [sys.executable, "-m", "sae", "train", "--activations", str(folder / "store"), "--variant", "topk",
               "--k", "32", "--out", str(folder / "run"), "--tokens", str(args.train_tokens), "--batch-size",
               "1024", "--device", "cpu", "--checkpoint-every", "24h", "--eval-rows", "0"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sae train failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(json.loads((folder / "run" / "train_summary.json").read_text())["tokens_per_s"])


# ---- the parent: settings x loads -------------------------------------------------------------
def competing_load() -> subprocess.Popen:
    """A second process multiplying 1024 x 1024 matrices on every core until killed."""
    code = ("import torch\na=torch.randn(1024,1024)\nb=torch.randn(1024,1024)\n"
            "while True:\n    a@b\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(setting: str, loaded: bool, args) -> dict:
    env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
           **SETTINGS[setting], "PYTHONPATH": str(ROOT)}
    rival = competing_load() if loaded else None
    try:
        if rival is not None:
            time.sleep(2)                                                     # let it reach full speed
        command = [sys.executable, __file__, "--child", "--ops", args.ops, "--model", args.model,
                   "--train-tokens", str(args.train_tokens)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="train,loss_effect,steer,probe")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--loads", default="idle,loaded")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--train-tokens", type=int, default=65_536)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from roofline import square_matmul_gflops
    print(f"# before: {load()}")
    print(f"# roofline: {square_matmul_gflops(1024):.0f} GFLOP/s fp32 (1024^3 matmul, now)")
    columns = [("train_tokens_per_s", "train tok/s", ",.0f"), ("loss_effect_s", "loss effect s", ".2f"),
               ("steer_s", "30 steered tok s", ".2f"), ("probe_s", "probe s", ".3f")]
    print("| load | setting | threads | " + " | ".join(title for _, title, _ in columns) + " | uptime |")
    print("|---|---|---|" + "---|" * len(columns) + "---|")
    for which in args.loads.split(","):
        for setting in args.settings.split(","):
            result = measure(setting, which == "loaded", args)
            cells = [format(result[key], spec) if isinstance(result.get(key), (int, float)) else
                     result.get("error", "–") for key, _, spec in columns]
            average = load().split("load average:")[-1].strip()
            print(f"| {which} | {setting} | {result.get('threads', '?')} | " + " | ".join(cells)
                  + f" | {average} |", flush=True)
    print(f"# after: {load()}")


if __name__ == "__main__":
    main()
