"""Sharded training of very wide TopK-family dictionaries: the latents are split across ranks.

Each rank of a torch.distributed process group owns a contiguous slice of the latents: its
encoder columns W_enc[:, lo:hi], b_enc[lo:hi] and decoder rows W_dec[lo:hi]. b_dec and the input
scale are replicated. Every rank sees the same batch. One forward:

    x_in      = copy_to_shards(x - b_dec)          identity; backward all-reduces the gradient
    pre_local = x_in @ W_enc_local + b_enc_local   [batch, d_local]
    local top-k (values, global indices)           [batch, k] each
    all-gather the candidates                      [world, batch, k]
    global top-k of the world·k candidates         (no gradient: a selection)
    partial   = Σ_{selected, owned here} value · W_dec_local[idx]   [batch, d_in]
    x_hat     = reduce_from_shards(partial) + b_dec identity backward: the loss is replicated

so gradients, Adam steps and decoder normalisation on each slice equal those of the unsharded
model's rows (checked against the unsharded TopK by tests/test_sharded.py on CPU/gloo). Memory per
rank is d_in × d_sae / world for each matrix plus [batch, d_sae / world] pre-activations: the layout
that lets a 1M-latent SAE train on several GPUs.

    model = ShardedTopK.from_full(sae.variants.create("topk", d_in, d_sae, k=32))
    out = model.training_loss(x_in, x_target, ctx)       # same on every rank
    full = model.gather_full()                           # an ordinary SAE (for saving, on any rank)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sae.errors import UserError
from sae.train import checkpoint, loggers
from sae.variants.base import LossOutput, StepContext, geometric_median

SHARDED_VARIANTS = ("topk",)


# ---- collectives with the gradients tensor parallelism needs -----------------------------------
class _CopyToShards(torch.autograd.Function):
    """Forward: identity (the input is replicated). Backward: sum the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromShards(torch.autograd.Function):
    """Forward: sum the ranks' partial tensors. Backward: identity (the loss is replicated)."""

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def shard_bounds(d_sae: int, rank: int, world_size: int) -> tuple[int, int]:
    """The latent slice [lo, hi) a rank owns: contiguous, sizes differing by at most one."""
    base, extra = divmod(d_sae, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class Selection(NamedTuple):
    """The global top-k of one batch, seen from one rank."""
    values: torch.Tensor   # [batch, k] this rank's candidate values, zero where not selected (with grad)
    local: torch.Tensor    # [batch, k] int64 indices into this rank's slice (0 where not selected)
    keep: torch.Tensor     # [batch, k] bool: the candidate is in the global top-k


class ShardedOutput(NamedTuple):
    x_hat: torch.Tensor        # [batch, d_in] full reconstruction, scaled units, same on every rank
    selection: Selection
    pre_local: torch.Tensor    # [batch, d_local] pre-activations of this rank's latents


class ShardedTopK(nn.Module):
    """One rank's slice of a TopK SAE (parameter names as in sae/variants/base.py)."""

    def __init__(self, d_in: int, d_sae: int, k: int, group=None, auxk_alpha: float = 1 / 32,
                 variant: str = "topk", knobs: dict | None = None):
        super().__init__()
        if not dist.is_initialized():
            raise UserError("sharded training needs torch.distributed (run it under torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if d_sae < self.world_size:
            raise UserError(f"d_sae {d_sae} is smaller than the world size {self.world_size}")
        self.d_in, self.d_sae, self.k = int(d_in), int(d_sae), int(k)
        self.lo, self.hi = shard_bounds(self.d_sae, self.rank, self.world_size)
        self.d_local = self.hi - self.lo
        self.auxk_alpha = auxk_alpha
        self.variant = variant
        self.knobs = dict(knobs or {"k": k, "auxk_coefficient": auxk_alpha})
        self.W_enc = nn.Parameter(torch.empty(d_in, self.d_local))   # [d_in, d_local]
        self.b_enc = nn.Parameter(torch.zeros(self.d_local))          # [d_local]
        self.W_dec = nn.Parameter(torch.empty(self.d_local, d_in))   # [d_local, d_in]
        self.b_dec = nn.Parameter(torch.zeros(d_in))                  # [d_in], replicated
        self.register_buffer("input_scale", torch.tensor(1.0))

    # ---- conversion to and from the ordinary SAE --------------------------------------------
    @classmethod
    def from_full(cls, full, group=None) -> "ShardedTopK":
        """This rank's slice of an unsharded TopK-family SAE (every rank passes the same weights)."""
        if full.name not in SHARDED_VARIANTS:
            raise UserError(f"sharded training supports {', '.join(SHARDED_VARIANTS)}, not {full.name}")
        knobs = dict(full.knobs)
        model = cls(full.d_in, full.d_sae, int(knobs["k"]), group=group, variant=full.name, knobs=knobs,
                    auxk_alpha=float(knobs.get("auxk_coefficient", 1 / 32)))
        with torch.no_grad():
            model.W_enc.copy_(full.W_enc[:, model.lo:model.hi])
            model.b_enc.copy_(full.b_enc[model.lo:model.hi])
            model.W_dec.copy_(full.W_dec[model.lo:model.hi])
            model.b_dec.copy_(full.b_dec)
            model.input_scale.copy_(full.input_scale)
        return model.to(full.W_enc.device)

    @torch.no_grad()
    def gather_full(self):
        """The unsharded SAE assembled from every rank's slice (a collective: call it on all ranks)."""
        from sae import variants
        full = variants.create(self.variant, self.d_in, self.d_sae, **self.knobs).to(self.W_enc.device)
        full.W_enc.copy_(torch.cat(self._gather_rows(self.W_enc.T.contiguous()), dim=0).T)
        full.b_enc.copy_(torch.cat(self._gather_rows(self.b_enc.data), dim=0))
        full.W_dec.copy_(torch.cat(self._gather_rows(self.W_dec.data), dim=0))
        full.b_dec.copy_(self.b_dec)
        full.input_scale.copy_(self.input_scale)
        return full

    def _gather_rows(self, local: torch.Tensor) -> list[torch.Tensor]:
        """All ranks' row blocks, in rank order (blocks may differ in length by one row)."""
        sizes = [shard_bounds(self.d_sae, r, self.world_size) for r in range(self.world_size)]
        longest = max(hi - lo for lo, hi in sizes)
        padded = torch.zeros((longest,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[:len(local)] = local
        blocks = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(blocks, padded, group=self.group)
        return [block[:hi - lo] for block, (lo, hi) in zip(blocks, sizes)]

    # ---- the sharded forward ------------------------------------------------------------------
    def select(self, pre_local: torch.Tensor, k: int) -> Selection:
        """Global top-k over all ranks of pre_local [batch, d_local] (-inf where a latent may not be
        chosen), then ReLU: the same latents and values as topk on the unsharded pre-activations."""
        batch = pre_local.shape[0]
        k_local = min(k, self.d_local)
        values, local = pre_local.topk(k_local, dim=1, sorted=False)  # [batch, k_local]
        if k_local < k:                                               # pad to a common shape
            pad = k - k_local
            values = torch.cat([values, values.new_full((batch, pad), float("-inf"))], dim=1)
            local = torch.cat([local, local.new_zeros(batch, pad)], dim=1)
        gathered = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(gathered, values.detach().contiguous(), group=self.group)
        candidates = torch.stack(gathered, dim=1).reshape(batch, self.world_size * k)  # [batch, world·k]
        winners = candidates.topk(k, dim=1, sorted=False).indices     # [batch, k] into world·k
        chosen = torch.zeros_like(candidates, dtype=torch.bool).scatter_(1, winners, True)
        keep = chosen.view(batch, self.world_size, k)[:, self.rank] & (values > 0)  # [batch, k]
        return Selection(torch.where(keep, F.relu(values), torch.zeros_like(values)),
                         torch.where(keep, local, torch.zeros_like(local)), keep)

    def decode_partial(self, selection: Selection) -> torch.Tensor:
        """This rank's share of the reconstruction (no b_dec). [batch, d_in]"""
        return F.embedding_bag(selection.local, self.W_dec, per_sample_weights=selection.values, mode="sum")

    def reconstruct(self, selection: Selection) -> torch.Tensor:
        """Sum of every rank's share plus b_dec. [batch, d_in], identical on all ranks."""
        return _ReduceFromShards.apply(self.decode_partial(selection), self.group) + self.b_dec

    def forward_scaled(self, x: torch.Tensor) -> ShardedOutput:
        x_in = _CopyToShards.apply(x - self.b_dec, self.group)
        pre_local = x_in @ self.W_enc + self.b_enc                    # [batch, d_local]
        selection = self.select(pre_local, self.k)
        return ShardedOutput(self.reconstruct(selection), selection, pre_local)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw activations -> (values [n, k], global latent indices [n, k], -1 where not this rank's)."""
        sel = self.forward_scaled(x * self.input_scale).selection
        return sel.values, torch.where(sel.keep, sel.local + self.lo, torch.full_like(sel.local, -1))

    def training_loss(self, x_input: torch.Tensor, x_target: torch.Tensor, ctx: StepContext) -> LossOutput:
        """The `topk` variant's loss (batch FVU + α·AuxK), the same value on every rank.
        ctx.dead_mask and the returned fire_counts are [d_local]: this rank's slice of the latents."""
        out = self.forward_scaled(x_input)
        total_variance = (x_target - x_target.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        recon = (out.x_hat - x_target).pow(2).sum() / total_variance
        terms = {"recon": recon}
        dead = ctx.dead_mask
        if dead is not None and self.auxk_alpha > 0:
            n_dead = dead.sum().reshape(1).float()
            dist.all_reduce(n_dead, group=self.group)
            n_dead = int(n_dead.item())
            if n_dead > 0:
                terms["auxk"] = self.auxk_alpha * self._auxk_loss(out, dead, x_target, total_variance, n_dead)
        loss = sum(terms.values())
        sel = out.selection
        fire_counts = torch.bincount(sel.local.reshape(-1), weights=sel.keep.reshape(-1).float(),
                                     minlength=self.d_local).long()
        stats = {"fvu": recon.detach()}
        return LossOutput(loss, out.x_hat.detach(), fire_counts,
                          {**{name: value.detach() for name, value in terms.items()}, **stats})

    def _auxk_loss(self, out: ShardedOutput, dead: torch.Tensor, x_target, total_variance, n_dead: int):
        """The k_aux = min(d_in/2, #dead) largest pre-activations among dead latents (over all ranks)
        reconstruct the detached residual, without b_dec; scaled by min(1, #dead / k_aux)."""
        k_aux = min(self.d_in // 2, n_dead)
        residual = (x_target - out.x_hat).detach()                    # [batch, d_in]
        masked = out.pre_local.masked_fill(~dead.to(out.pre_local.device)[None, :], float("-inf"))
        selection = self.select(masked, k_aux)
        residual_hat = _ReduceFromShards.apply(self.decode_partial(selection), self.group)
        scale = min(1.0, n_dead / max(1, k_aux))
        return scale * (residual_hat - residual).pow(2).sum() / total_variance

    # ---- what the trainer does between steps ---------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """b_dec at the geometric median of the scaled sample [n, d_in], as the unsharded variants do."""
        self.b_dec.copy_(geometric_median(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        if self.W_dec.grad is not None:
            grad, rows = self.W_dec.grad, self.W_dec
            grad.sub_((grad * rows).sum(dim=1, keepdim=True) * rows)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole (unsharded) gradient: sharded parts summed over ranks."""
        sharded = sum(p.grad.pow(2).sum() for p in (self.W_enc, self.b_enc, self.W_dec) if p.grad is not None)
        sharded = torch.as_tensor(sharded, dtype=torch.float32, device=self.W_enc.device).clone()
        dist.all_reduce(sharded, group=self.group)
        replicated = self.b_dec.grad.pow(2).sum() if self.b_dec.grad is not None else 0.0
        total = (sharded + replicated).sqrt()
        factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        return total


class ShardedTrainer:
    """sae.train.trainer.Trainer's step for a ShardedTopK: the same schedule, Adam, unit-norm decoder and dead-latent
    counters, on this rank's slice. Every rank passes the same batch (the latents are split, not the batch)."""

    def __init__(self, model: ShardedTopK, options):
        from sae.train.options import default_lr
        self.model, self.options = model, options
        self.total_steps = options.total_steps
        self.base_lr = options.lr or default_lr(model)  # by the global d_sae, as for the unsharded model
        self.optimizer = torch.optim.Adam(list(model.parameters()), lr=self.base_lr,
                                          betas=(options.beta1, options.beta2), eps=options.eps, foreach=True)
        self.dead_after = options.dead_after
        self.tokens_since_fired = torch.zeros(model.d_local, dtype=torch.int64, device=model.W_enc.device)
        self.step_count = 0

    def init_from_sample(self, x_raw: torch.Tensor) -> None:
        """As Trainer does (every rank holds the same sample: the latents are split, not the batch)."""
        from sae.train.trainer import init_from_sample
        init_from_sample(self.model, x_raw)

    def step(self, x_raw: torch.Tensor) -> dict:
        from sae.train.options import lr_at
        model, options = self.model, self.options
        x = x_raw.to(model.W_enc.device).float() * model.input_scale   # [batch, d_in]
        step = self.step_count
        ctx = StepContext(step=step, progress=step / self.total_steps,
                          dead_mask=self.tokens_since_fired >= self.dead_after)
        out = model.training_loss(x, x, ctx)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        model.remove_parallel_gradient()
        if options.grad_clip:
            model.clip_grad_norm_(options.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.total_steps, self.base_lr, options.lr_warmup, options.lr_decay)
        self.optimizer.step()
        model.normalize_decoder()
        self.tokens_since_fired += x.shape[0]
        self.tokens_since_fired.masked_fill_(out.fire_counts > 0, 0)
        self.step_count += 1
        return {"loss": float(out.loss.detach()), **{k: float(v) for k, v in out.terms.items()}}


    # ---- checkpoints (sae.train.sharded_checkpoint writes and reads them) -----------------------
    def slices(self) -> list[tuple[int, int]]:
        return [shard_bounds(self.model.d_sae, r, self.model.world_size) for r in range(self.model.world_size)]

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able meta) of this rank: its parameters, Adam state, dead-latent counters and RNG."""
        model, optim_state = self.model, self.optimizer.state_dict()
        tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
        for index, state in optim_state["state"].items():
            tensors.update({f"optim.{index}.{key}": value for key, value in state.items()})
        tensors["tokens_since_fired"] = self.tokens_since_fired
        tensors["rng.torch"] = torch.get_rng_state()
        if model.W_enc.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(model.W_enc.device)
        groups = [{k: v for k, v in group.items() if k != "lr"} for group in optim_state["param_groups"]]
        return tensors, {"step": self.step_count, "rank": model.rank, "slice": [model.lo, model.hi],
                         "base_lr": self.base_lr, "param_groups": groups}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        model = self.model
        self.base_lr = float(meta["base_lr"])
        if list(meta["slice"]) != [model.lo, model.hi]:
            raise UserError(f"the checkpoint's part for rank {model.rank} holds latents {meta['slice']}, "
                            f"this rank owns [{model.lo}, {model.hi}]")
        model.load_state_dict({name[6:]: value for name, value in tensors.items() if name.startswith("model.")})
        state: dict[int, dict] = {}
        for name, value in tensors.items():
            if name.startswith("optim."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        groups = [{**group, "lr": self.base_lr, "betas": tuple(group["betas"])} for group in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and model.W_enc.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], model.W_enc.device)
        self.step_count = int(meta["step"])


def _on_main(action) -> str:
    """Run action() (a refusal: UserError; a result: a str) on rank 0 and give every rank its verdict."""
    from sae import distributed
    refusal, result = "", ""
    if distributed.is_main_process():
        try:
            result = action() or ""
        except UserError as error:
            refusal = str(error)
    refusal = distributed.broadcast_bytes(refusal.encode()).decode()
    if refusal:
        raise UserError(refusal)
    return distributed.broadcast_bytes(result.encode()).decode()


def train_sharded_on_store(store, variant: str, run_dir, options, knobs: dict | None = None, layer=None,
                           d_sae: int | None = None, expansion: float | None = None, force: bool = False,
                           progress: bool = True, resume: bool = False) -> dict:
    """`torchrun --nproc-per-node N -m sae train --activations S --variant topk --shard-latents --out RUN`:
    every rank reads the same global batches; the latents are split; each rank checkpoints its slice
    (sae.train.sharded_checkpoint, on --checkpoint-every's schedule); --resume continues from the newest complete
    checkpoint with the same world size; rank 0 writes the assembled SAE (an ordinary run folder) and metrics.jsonl."""
    import json
    from pathlib import Path
    from tqdm import tqdm
    from sae import distributed, variants
    from sae.runs import save_run
    from sae.files import write_json
    from sae.train import sharded_checkpoint
    from sae.train.options import TrainOptions
    from sae.train.schedule import CheckpointClock
    info = distributed.info()
    run_dir = Path(run_dir)
    resume_from = None
    if resume:   # read-only checks first: a refused resume leaves the folder as it was
        chosen = _on_main(lambda: str(sharded_checkpoint.find_resumable(run_dir, info.world_size) or ""))
        resume_from = Path(chosen) if chosen else None
    if not info.enabled:
        raise UserError("--shard-latents splits the latents across ranks: launch it with torchrun --nproc-per-node N")
    if variant not in SHARDED_VARIANTS:
        raise UserError(f"--shard-latents supports {', '.join(SHARDED_VARIANTS)}, not {variant}")
    layer = store.resolve_layer(layer)
    if resume_from is not None:
        saved = sharded_checkpoint.read_config(resume_from)
        checkpoint.check_resumable(saved, run_dir, variant, store, layer, d_sae, dict(knobs or {}))
        extended = checkpoint.check_resumed_options(saved["training"], options, run_dir)   # a larger --tokens
        d_sae, knobs = saved["d_sae"], saved["knobs"]
        options = TrainOptions.from_json({**saved["training"], "device": options.device,
                                          **({"tokens": extended} if extended else {})})
        _on_main(lambda: sharded_checkpoint.prepare_resume(run_dir, resume_from))
    elif resume:
        _on_main(lambda: sharded_checkpoint.prepare_resume(run_dir, None))    # no checkpoint yet: start afresh
    else:
        _on_main(lambda: checkpoint.prepare_run_dir(run_dir, resume=False, force=force))  # --force: a run's files only
    device = torch.device("cuda", info.local_rank) if options.device != "cpu" and torch.cuda.is_available() \
        else torch.device("cpu")
    distributed.check_same_config({"variant": variant, "knobs": knobs, "d_sae": d_sae, "layer": str(layer),
                                   "options": options.to_json(), "store": store.digest,
                                   "resume_from": str(resume_from)})
    torch.manual_seed(options.seed)  # the same full initialisation on every rank; each keeps its slice
    full = variants.create(variant, store.d_model, d_sae, expansion=expansion or 8.0, **(knobs or {}))
    model = ShardedTopK.from_full(full).to(device)
    del full
    trainer = ShardedTrainer(model, options)
    if resume_from is not None:
        trainer.load_state_dict(*sharded_checkpoint.load_part(resume_from, info.rank))
    else:
        init_rows = min(options.init_rows, store.split_size("train"))  # the rows train_on_store uses
        samples = store.train_batches(layer, init_rows, options.seed + 1)
        trainer.init_from_sample(next(samples))
        samples.close()
    config = {"variant": variant, "d_in": model.d_in, "d_sae": model.d_sae, "knobs": model.knobs, "layer": layer,
              "store_digest": store.digest, "training": {**options.to_json(), "lr": trainer.base_lr}}
    batches = store.train_batches(layer, options.batch_size, seed=options.seed, start_step=trainer.step_count,
                                  prefetch=4 if torch.device(device).type == "cuda" else 0)   # the global batch
    bar = tqdm(total=trainer.total_steps, initial=trainer.step_count, unit="step",
               disable=None if progress and info.is_main else True, desc=f"sharded {variant} ×{info.world_size}")
    metrics_path = run_dir / "metrics.jsonl"
    clock, last = CheckpointClock(options.checkpoint_every, True), {}
    try:
        while trainer.step_count < trainer.total_steps:
            last = trainer.step(next(batches))
            bar.update(1)
            logging = trainer.step_count % options.log_every == 0 or trainer.step_count == trainer.total_steps
            if info.is_main and logging:
                line = {"step": trainer.step_count, "tokens": trainer.step_count * options.batch_size, **last}
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(line) + "\n")
                loggers.log_metrics(run_dir, line)          # --log wandb|tensorboard (a no-op without it)
                bar.set_postfix_str(f"loss {last['loss']:.4g}", refresh=False)
            if clock.due(trainer.step_count, logging) or trainer.step_count == trainer.total_steps:   # as Trainer
                sharded_checkpoint.save(run_dir, trainer, config, keep=options.keep_checkpoints)
                clock.saved()
    finally:
        bar.close()
        batches.close()
    assembled = model.gather_full()
    if info.is_main:
        extra = {"layer": layer, "site": store.manifest.get("site"), "model": store.manifest.get("model"),
                 "store": str(store.path), "store_digest": store.digest,
                 "training": {**options.to_json(), "lr": trainer.base_lr, "steps": trainer.step_count,
                              "complete": True, "world_size": info.world_size, "sharded_latents": True}}
        save_run(assembled.cpu(), run_dir, extra)
        write_json(run_dir / "train_summary.json", {"variant": variant, "steps": trainer.step_count,
                                                    "sharded_over": info.world_size, "train": last})
    dist.barrier()
    return {"steps": trainer.step_count, "run_dir": str(run_dir)}
