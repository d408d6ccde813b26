#!/usr/bin/env bash
# The GPU check (issue 19): one prepared run on a single CUDA GPU, under 8 minutes, printing one table:
#   1. collect tokens/s against the bare forward of the same model truncated at the layer, both bf16
#   2. topk k=32, 16,384 latents trained in bf16: tokens/s, share of the GPU's measured bf16 matmul rate
#      (encoder-only rule 2·d_in·d_sae a token, as scripts/bench_train.py), held-out FVU, dead fraction,
#      against the same run on the CPU at a small budget
#   3. kill -9 during training, then --resume on CUDA: the step it resumed from, and the final weights
#      against an uninterrupted run (max |difference|; CUDA's atomic adds are not bitwise reproducible)
#   4. live training (sae train --model) tokens/s against the model's bare forward alone
#   5. sae eval: CE loss recovered
#
#   scripts/gpu_check.sh [WORKDIR]      (default: a temporary folder, removed at the end)
# Without CUDA it refuses in one line and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): this check needs one" >&2
    exit 2
fi
WORK="${1:-}"
KEEP=1
if [ -z "$WORK" ]; then WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"; KEEP=0; fi
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 GPU_CHECK_WORK="$WORK"
status=0
timeout 470 "$PY" - <<'PYTHON' || status=$?
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import torch

sys.path.insert(0, "scripts")
WORK = Path(os.environ["GPU_CHECK_WORK"])
SAE = [sys.executable, "-m", "sae"]
LAYER, SITE, CONTEXT, WINDOWS = 6, "resid_post", 128, 64
rows = []      # (what, figure, against, note)


def sh(args, timeout=150):
    start = time.perf_counter()
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, args[2:4]))} failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start, done.stdout


def step(name, fn):
    try:
        fn()
    except Exception as error:  # one failed part still leaves the others' rows
        rows.append((name, "FAILED", "", f"{type(error).__name__}: {str(error)[:160]}"))


from roofline import square_matmul_gflops
bf16_rate = square_matmul_gflops(8192, 20, "cuda")              # GFLOP/s, bf16, measured now
device_name = torch.cuda.get_device_name(0)
bare = {}


def check_collect():
    from torch import nn
    from sae.data import load_documents, pack_windows
    from sae.lm import block_list, load_model
    loaded = load_model("smollm2", device=torch.device("cuda"), dtype="bfloat16")
    documents, _ = load_documents("bbc")
    windows = []
    for window in pack_windows(documents, loaded.tokenizer, CONTEXT, loaded.bos_id, loaded.eos_id, loaded.pad_id):
        windows.append(window.input_ids)
        if len(windows) == 64 * 40:
            break
    batches = [torch.stack(windows[i:i + WINDOWS]).cuda() for i in range(0, len(windows), WINDOWS)]
    path, blocks = block_list(loaded.model)
    parent, _, attr = path.rpartition(".")
    base = loaded.model.get_submodule(parent) if parent else loaded.model
    setattr(base, attr, nn.ModuleList(list(blocks)[:LAYER + 1]))
    with torch.inference_mode():
        base(input_ids=batches[0], use_cache=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for ids in batches:
            base(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
    setattr(base, attr, blocks)
    bare["tokens_s"] = sum(b.numel() for b in batches) / (time.perf_counter() - start)
    del loaded
    torch.cuda.empty_cache()
    seconds, _ = sh(SAE + ["collect", "--model", "smollm2", "--dataset", "bbc", "--layers", LAYER, "--site", SITE,
                           "--tokens", 300_000, "--context-size", CONTEXT, "--batch-size", WINDOWS, "--device", "cuda",
                           "--model-dtype", "bfloat16", "--out", WORK / "store", "--force"])
    manifest = json.loads((WORK / "store" / "manifest.json").read_text())
    fed = manifest["n_tokens"] / manifest["collect_seconds"]
    rows.append(("collect, rows stored/s (bf16 model)", f"{fed:,.0f}", f"bare truncated forward {bare['tokens_s']:,.0f} tok/s",
                 f"{fed / bare['tokens_s']:.2f}x of bare; whole process {seconds:.0f} s"))


TRAIN = ["train", "--activations", WORK / "store", "--variant", "topk", "--k", 32, "--d-sae", 16384,
         "--batch-size", 4096, "--eval-rows", 16384]


def summary(run):
    return json.loads((run / "train_summary.json").read_text())


def check_train():
    sh(SAE + TRAIN + ["--tokens", 20_000_000, "--device", "cuda", "--out", WORK / "gpu", "--force"], timeout=200)
    gpu = summary(WORK / "gpu")
    rate = gpu["tokens_per_s"] * 2 * gpu["d_in"] * gpu["d_sae"] / 1e9
    sh(SAE + TRAIN + ["--tokens", 4096 * 8, "--device", "cpu", "--out", WORK / "cpu", "--force"], timeout=200)
    cpu = summary(WORK / "cpu")
    held, cheld = gpu["held_out"] or {}, cpu["held_out"] or {}
    rows.append(("topk k=32, 16,384 latents, bf16: tokens/s", f"{gpu['tokens_per_s']:,.0f}",
                 f"CPU {cpu['tokens_per_s']:,.0f} tok/s", f"{rate / bf16_rate:.1%} of the bf16 matmul rate "
                 f"({bf16_rate:,.0f} GFLOP/s, {device_name})"))
    rows.append(("  held-out FVU / dead fraction", f"{held.get('fvu', float('nan')):.4f} / {held.get('dead_fraction', float('nan')):.2%}",
                 f"CPU {cheld.get('fvu', float('nan')):.4f} / {cheld.get('dead_fraction', float('nan')):.2%}",
                 f"GPU {gpu['tokens']:,} tokens, CPU {cpu['tokens']:,}"))


def check_resume():
    from safetensors.torch import load_file
    args = SAE + TRAIN + ["--tokens", 4096 * 600, "--device", "cuda", "--checkpoint-every", 100]
    sh(args + ["--out", WORK / "straight", "--force"], timeout=200)
    run = WORK / "killed"
    shutil.rmtree(run, ignore_errors=True)
    process = subprocess.Popen([str(a) for a in args + ["--out", run]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("step_*")):
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    sh(args + ["--out", run, "--resume"], timeout=200)
    a, b = load_file(str(WORK / "straight" / "sae.safetensors")), load_file(str(run / "sae.safetensors"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    rows.append(("kill -9, then --resume (CUDA)", f"resumed at step {steps[-1] if steps else '?'}",
                 "uninterrupted run", f"final weights max |diff| {diff:.2e}"))


def check_live():
    seconds, _ = sh(SAE + ["train", "--model", "smollm2", "--dataset", "bbc", "--layers", LAYER, "--site", SITE,
                           "--variant", "topk", "--k", 32, "--d-sae", 16384, "--tokens", 4096 * 60, "--batch-size", 4096,
                           "--device", "cuda", "--eval-rows", 0, "--out", WORK / "live", "--force"], timeout=200)
    found = list((WORK / "live").rglob("train_summary.json"))
    tokens_s = json.loads(found[0].read_text())["tokens_per_s"] if found else 4096 * 60 / seconds
    rows.append(("live training (sae train --model), tokens/s", f"{tokens_s:,.0f}",
                 f"model alone {bare.get('tokens_s', float('nan')):,.0f} tok/s",
                 f"{tokens_s / bare['tokens_s']:.2f}x of the bare forward" if bare else ""))


def check_eval():
    _, out = sh(SAE + ["eval", "--run", WORK / "gpu", "--activations", WORK / "store", "--device", "cuda", "--json"])
    result = json.loads(out)
    rows.append(("eval: CE loss recovered", f"{result.get('ce_loss_recovered', float('nan')):.4f}",
                 f"FVU {result.get('fvu', float('nan')):.4f}", f"KL score {result.get('kl_div_score', float('nan')):.4f}"))


for name, fn in (("collect", check_collect), ("train", check_train), ("resume", check_resume),
                 ("live", check_live), ("eval", check_eval)):
    step(name, fn)
print(f"\ngpu_check on {device_name}, torch {torch.__version__}, bf16 matmul {bf16_rate:,.0f} GFLOP/s "
      f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
print("| check | figure | against | note |")
print("|---|---:|---|---|")
for row in rows:
    print("| " + " | ".join(str(x) for x in row) + " |")
sys.exit(1 if any(r[1] == "FAILED" for r in rows) else 0)
PYTHON
[ "$KEEP" = 1 ] || rm -rf "$WORK"
exit "$status"
