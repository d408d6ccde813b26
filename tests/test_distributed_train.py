"""Training under torchrun (2 CPU processes, gloo): same global batch -> same result as one process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae import distributed
from sae.train import checkpoint
from sae.store import from_tensors
from tiny_variants import synthetic

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def torchrun(*args, nproc=2, timeout=240):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return from_tensors(tmp_path_factory.mktemp("dist") / "store", synthetic(n=6000, d_in=16), layer=6)


TRAIN = ["--tokens", 128 * 24, "--batch-size", 128, "--device", "cpu", "--expansion", 4, "--eval-rows", 0,
         "--checkpoint-every", "24h", "--dead-after-tokens", 256]


@pytest.mark.parametrize("variant,extra", [("relu", ["--noise-std", "0.2", "--mask-prob", "0.1"]),
                                           ("batchtopk", ["--k", "4"])])  # global k-th value, variance, AuxK
def test_two_ranks_match_one_process(store, tmp_path, variant, extra):
    single, double = tmp_path / "single", tmp_path / "double"
    one = subprocess.run([sys.executable, "-m", "sae", "train", "--activations", str(store.path), "--variant", variant,
                          "--out", str(single), *map(str, TRAIN), *extra], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two = torchrun("-m", "sae", "train", "--activations", store.path, "--variant", variant, "--out", double,
                   *TRAIN, *extra)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(str(single / "sae.safetensors")), load_file(str(double / "sae.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (key, (a[key] - b[key]).abs().max())
    # the input scale and the dead-latent counters were computed from the global batch on both
    assert torch.equal(a["input_scale"], b["input_scale"]) or torch.allclose(a["input_scale"], b["input_scale"])
    ta = load_file(str(checkpoint.latest(single) / "trainer.safetensors"))["tokens_since_fired"]
    tb = load_file(str(checkpoint.latest(double) / "trainer.safetensors"))["tokens_since_fired"]
    assert torch.equal(ta, tb)
    # only rank 0 wrote: one metrics line per logged step
    import json
    lines_two = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()]
    lines_one = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines_two] == [m["step"] for m in lines_one]
    for key in ("loss", "l0", "fvu", "dead_fraction"):  # logged metrics are global-batch figures too
        assert lines_two[-1][key] == pytest.approx(lines_one[-1][key], rel=1e-3, abs=1e-6), key


def test_world_size_must_divide_the_batch(store, tmp_path):
    result = torchrun("-m", "sae", "train", "--activations", store.path, "--variant", "relu", "--out",
                      tmp_path / "r", *TRAIN, "--batch-size", 127)
    assert result.returncode != 0
    assert "not divisible by the world size 2" in result.stderr and "Traceback" not in result.stderr.split("error:")[0]


HOOKS = textwrap.dedent("""
    import os, torch
    from sae import distributed
    from sae.errors import UserError
    info = distributed.setup("cpu")
    rank = info.rank
    out = []
    out.append(f"sum {distributed.reduce_sum(torch.tensor([rank + 1.0])).item()}")
    out.append(f"max {distributed.reduce_max(torch.tensor([rank * 5])).item()}")
    out.append(f"mean {distributed.reduce_mean(torch.tensor([rank * 2.0])).item()}")
    gathered = distributed.all_gather_cat(torch.full((rank + 1, 2), float(rank)))
    out.append(f"gather {gathered[:, 0].tolist()}")
    out.append(f"bytes {distributed.broadcast_bytes(b'hello' if rank == 0 else None).decode()}")
    distributed.check_same_config({"variant": "relu", "lr": 1e-3})
    try:
        distributed.check_same_config({"variant": "relu", "lr": 1e-3 * (rank + 1)})
        out.append("config: no error")
    except UserError as error:
        out.append(f"config: {error}")
    # one file per rank: two processes printing to one pipe can interleave their lines
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"rank{rank}.txt"), "w") as handle:
        handle.write(f"rank{rank}: " + " | ".join(out))
    distributed.teardown()
""")


def test_reduce_hooks_and_config_disagreement(tmp_path):
    script = tmp_path / "hooks.py"
    script.write_text(HOOKS)
    result = torchrun(script)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {f"rank{r}": (tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    for rank in ("rank0", "rank1"):
        line = lines[rank]
        assert "sum 3.0" in line and "max 5" in line and "mean 1.0" in line
        assert "gather [0.0, 1.0, 1.0]" in line and "bytes hello" in line
        assert "ranks disagree on the training config" in line
    assert "lr: rank 0 has 0.001, this rank 0.002" in lines["rank1"]


def test_hooks_are_identity_in_one_process():
    x = torch.randn(3, 2)
    for hook in (distributed.reduce_sum, distributed.reduce_max, distributed.reduce_mean, distributed.all_gather_cat):
        assert hook(x) is x
    distributed.check_same_config({"anything": 1})
    distributed.check_batch(1000, 1)
    with pytest.raises(Exception, match="not divisible"):
        distributed.check_batch(1001, 2)


def test_nccl_missing_falls_back_to_gloo_and_says_so():
    backend, message = distributed.choose_backend("cuda", "nccl")
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        assert backend == "nccl" and message is None
    else:
        assert backend == "gloo" and "NCCL is not available" in message and "gloo" in message
    assert distributed.choose_backend("cpu", "auto") == ("gloo", None)
