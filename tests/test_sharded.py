"""Sharded TopK (sae.sharded): latents split over 2 CPU processes (gloo) train exactly like the unsharded
`topk` SAE driven by sae.train.Trainer in one process — forward, backward (AuxK included) and Adam steps."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

D_IN, D_SAE, K, BATCH, STEPS = 16, 90, 4, 64, 4   # 90 latents: uneven split is exercised at 4 ranks too


def batches():
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(D_IN, D_IN, generator=generator)
    return [torch.randn(BATCH, D_IN, generator=generator) @ base + 0.3 for _ in range(STEPS + 1)]


def options():
    from sae.train.options import TrainOptions
    # dead after one batch: AuxK is active from the second step on
    return TrainOptions(tokens=STEPS * BATCH, batch_size=BATCH, device="cpu", lr=3e-3, lr_warmup=0.0,
                        dead_after_tokens=BATCH, grad_clip=1.0, autocast=False)


def full_model():
    from sae import variants
    torch.manual_seed(11)
    return variants.create("topk", D_IN, D_SAE, k=K)


def reference():
    """The unsharded model through the ordinary Trainer (no process group yet): what the shards must match."""
    from sae.train.trainer import Trainer
    data = batches()
    model = full_model()
    trainer = Trainer(model, options(), None)
    trainer.init_from_sample(data[-1])
    sel_model = full_model()
    sel_model.load_state_dict(model.state_dict())
    first_x_hat = sel_model(data[0]).detach()
    for x in data[:STEPS]:
        trainer.step(x)
    return {"init": sel_model.state_dict(), "x_hat": first_x_hat, "final": model.state_dict(),
            "dead": trainer.dead_mask().clone()}


def worker(rank, world, port, results_dir):
    import faulthandler
    faulthandler.enable(open(os.path.join(results_dir, f"fault{rank}.txt"), "w"))   # a crash leaves its stack
    torch.set_num_threads(1)
    expected = reference()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from sae.train.sharded import ShardedTopK, ShardedTrainer, shard_bounds
        data = batches()
        full = full_model()
        sharded = ShardedTopK.from_full(full)
        trainer = ShardedTrainer(sharded, options())
        trainer.init_from_sample(data[-1])
        lo, hi = shard_bounds(D_SAE, rank, world)
        init = expected["init"]
        torch.testing.assert_close(sharded.b_dec.data, init["b_dec"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sharded.W_dec.data, init["W_dec"][lo:hi], atol=1e-6, rtol=1e-5)
        # forward: the raw-unit reconstruction equals the unsharded model's
        with torch.no_grad():
            out = sharded.forward_scaled(data[0] * sharded.input_scale)
        torch.testing.assert_close(out.x_hat / sharded.input_scale, expected["x_hat"], atol=1e-5, rtol=1e-5)
        # a few optimiser steps (gradients, AuxK on dead latents, clipping, Adam, unit-norm decoder)
        for x in data[:STEPS]:
            trainer.step(x)
        final = expected["final"]
        torch.testing.assert_close(sharded.W_enc.data, final["W_enc"][:, lo:hi], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(sharded.b_enc.data, final["b_enc"][lo:hi], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(sharded.W_dec.data, final["W_dec"][lo:hi], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(sharded.b_dec.data, final["b_dec"], atol=2e-5, rtol=1e-4)
        assert torch.equal(trainer.tokens_since_fired >= trainer.dead_after, expected["dead"][lo:hi])
        assert bool(expected["dead"].any()), "the test must exercise AuxK"
        gathered = sharded.gather_full()
        for name, value in final.items():
            torch.testing.assert_close(gathered.state_dict()[name], value, atol=2e-5, rtol=1e-4)
        open(os.path.join(results_dir, f"ok{rank}"), "w").close()
        dist.barrier()   # neither rank tears down its connections while the other still uses them
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world", [2])
def test_two_process_gloo_matches_unsharded(tmp_path, world):
    try:
        mp.spawn(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    except Exception as error:
        stacks = [(tmp_path / f"fault{r}.txt").read_text() for r in range(world) if (tmp_path / f"fault{r}.txt").exists()]
        raise AssertionError(f"{error}\n" + "\n".join(stacks)) from None
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("ok")) == [f"ok{r}" for r in range(world)]


def test_select_needs_a_process_group():
    from sae.errors import UserError
    from sae.train.sharded import ShardedTopK, shard_bounds
    with pytest.raises(UserError, match="torch.distributed"):
        ShardedTopK(D_IN, D_SAE, K)
    bounds = [shard_bounds(10, r, 3) for r in range(3)]
    assert bounds == [(0, 4), (4, 7), (7, 10)]


def test_torchrun_shard_latents_matches_single_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m sae train ... --shard-latents` (gloo, CPU) ends with the weights of
    the same run trained by `train_on_store` in one process."""
    import subprocess
    import sys

    import sae
    from sae.store import ActivationStore, from_tensors
    from sae.train.trainer import TrainOptions, train_on_store
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3000, D_IN, generator=generator) @ torch.randn(D_IN, D_IN, generator=generator)
    from_tensors(tmp_path / "store", x)
    common = ["--variant", "topk", "--k", str(K), "--d-sae", str(D_SAE), "--batch-size", "64", "--tokens", "640",
              "--lr", "3e-3", "--device", "cpu", "--seed", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAE_DEBUG": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), "-m", "sae", "train", "--activations",
                             str(tmp_path / "store"), "--out", str(tmp_path / "sharded"), "--shard-latents", *common],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    options = TrainOptions(tokens=640, batch_size=64, lr=3e-3, device="cpu", seed=4, eval_rows=0, checkpoint_every=0)
    train_on_store(ActivationStore(tmp_path / "store"), "topk", tmp_path / "single", options, knobs={"k": K},
                   d_sae=D_SAE, progress=False)
    sharded, single = sae.load(tmp_path / "sharded"), sae.load(tmp_path / "single")
    assert sharded.run_config["training"]["sharded_latents"] is True
    for name, value in single.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[name], value, atol=1e-4, rtol=1e-3)
    # refused outside torchrun
    from sae.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--activations", str(tmp_path / "store"), "--out", str(tmp_path / "x"), "--shard-latents",
              *common])
    assert exit_info.value.code == 2
