"""Training: one `Trainer` drives one SAE from raw batches; `train_on_store` is `sae train`'s whole loop.

    trainer = Trainer(model, TrainOptions(tokens=2**20), run_dir)
    trainer.init_from_sample(x_sample)        # input scale, decoder bias (reduced over ranks)
    for x in batches: trainer.step(x)         # corrupt, loss, backward, Adam, unit-norm decoder, dead latents
    trainer.finish()

What is shared by every variant lives here, never in a variant: Adam with LR warm-up and decay, the
sparsity-coefficient warm-up (StepContext.sparsity_scale), input scaling (mean token norm = sqrt(d_in)),
corruption (--noise-std, --mask-prob), dead-latent tracking and revival, checkpoints, NaN guard, logging.
The trainer never asks which variant it trains: it only reads the class flags and calls the hooks of
sae.variants.base.SAE.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from sae import distributed
from sae.train import checkpoint, loggers, parallel
from sae.distributed import StopFlag
from sae.errors import UserError
from sae.train.optim import Adam
from sae.train.options import TrainingDiverged, TrainOptions, default_lr, lr_at  # noqa: F401
from sae.train.report import format_summary, progress_postfix
from sae.train.schedule import CheckpointClock
from sae.variants.base import SAE, StepContext, squared_distance
from sae.kernels.autograd import sync_free
from sae.files import FolderLock, read_json

METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"


def held_out_summary(model, store, layer, rows: int, device) -> dict | None:
    """The one held-out scorer (sae.evaluate.scores, as `sae eval`) on up to `rows` held-out tokens."""
    from sae.evaluate.scores import held_out_batches, score, special_token_ids, summary_scores
    batches = held_out_batches(store, layer, special_token_ids(store), max_rows=rows,
                               targets=getattr(model, "is_transcoder", False))   # a transcoder: (input, target)
    return summary_scores(score(model, batches, device))


@torch.no_grad()
def init_from_sample(model, x: torch.Tensor) -> None:
    """Set the input scale (mean token norm -> sqrt(d_in)) and let the model initialise from the scaled sample
    [n, d_in] (decoder bias at the geometric median), then renormalise the decoder. Shared by every trainer."""
    x = x.to(model.input_scale.device).float()
    if x.shape[0] == 0:
        raise UserError("no rows to initialise from")
    mean_norm = x.norm(dim=1).mean()
    if not torch.isfinite(mean_norm) or float(mean_norm) == 0.0:
        raise UserError("the activations are all zero: nothing to train on" if torch.isfinite(mean_norm) else
                        f"the store is damaged: NaN or Inf in {int((~torch.isfinite(x)).any(dim=1).sum())} sampled rows")
    model.input_scale.fill_(math.sqrt(model.d_in) / float(mean_norm))
    model.init_from_data(x * model.input_scale)
    model.normalize_decoder()


class Trainer:
    """Trains one SAE; under torchrun every rank runs one Trainer on its slice of each global batch."""

    def __init__(self, model: SAE, options: TrainOptions, run_dir=None, config_extra: dict | None = None,
                 device: torch.device | None = None):
        from sae.devices import resolve
        self.model, self.options = model, options
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config_extra = dict(config_extra or {})
        self.dist = distributed.info()
        if self.run_dir is not None and self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = device or resolve(options.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        distributed.check_batch(options.batch_size, self.dist.world_size)
        model.to(self.device).train()
        self.total_steps = options.total_steps
        self.base_lr = options.lr or default_lr(model)
        # a unit-norm decoder the base class renormalises: the CPU's compiled Adam does it in its own pass
        unit_rows = [model.W_dec] if (model.unit_norm_decoder and isinstance(getattr(model, "W_dec", None), nn.Parameter)
                                      and type(model).normalize_decoder is SAE.normalize_decoder) else []
        self.optimizer = Adam(model.parameters(), lr=self.base_lr, betas=(options.beta1, options.beta2),
                              eps=options.eps, unit_rows=unit_rows)
        self.loss_module = parallel.loss_module(model, self.device, self.dist.enabled)   # DDP under torchrun
        self.noise_std = model.default_noise_std if options.noise_std is None else options.noise_std
        self.generator = torch.Generator(device=self.device).manual_seed(options.seed * 7919 + 17)
        self.tracks_dead = not model.signed_codes
        self.dead_after = options.dead_after
        self.revive_every = options.revive_every or max(1, self.dead_after // options.batch_size)
        self.tokens_since_fired = torch.zeros(model.d_sae, dtype=torch.int64, device=self.device)
        self.step_count = 0
        self.tokens_seen = 0
        self.revived_total = 0
        self.backward_products = nullcontext()
        if self.device.type == "cuda":
            self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if options.autocast else nullcontext()
        elif options.cpu_bf16:   # CUDA's autocast reaches the backward by itself; this switch is held around both
            from sae.kernels.matmul import bf16_products
            self.autocast = self.backward_products = bf16_products()
        else:
            self.autocast = nullcontext()
        self._reset_window()
        self._last_log_time = time.perf_counter()
        self.last_metrics: dict = {}

    # ---- set-up ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_sample(self, x_raw: torch.Tensor, y_raw: torch.Tensor | None = None) -> None:
        """The data-dependent initialisation (init_from_sample) on every rank's sample gathered; a transcoder's
        from its (input, target) pairs."""
        if y_raw is not None:
            gathered = [distributed.all_gather_cat(t.to(self.device).float()) for t in (x_raw, y_raw)]
            return self.model.init_from_pairs(*gathered)  # [n_total, d_in] each
        init_from_sample(self.model, distributed.all_gather_cat(x_raw.to(self.device).float()))  # [n_total, d_in]

    def _reset_window(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._window_steps = 0
        self._window_tokens = 0
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)

    def _accumulate(self, values: dict[str, torch.Tensor]) -> None:
        """Add a step's figures to the window's sums: one in-place foreach add for the names already there."""
        values = {name: value.detach().float() for name, value in values.items()}
        known = [name for name in values if name in self._sums]
        if known:
            torch._foreach_add_([self._sums[name] for name in known], [values[name] for name in known])
        for name in values:              # in the step's own order: every rank reduces the sums in the same one
            if name not in self._sums:
                self._sums[name] = values[name].clone()

    # ---- one step -------------------------------------------------------------------------
    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """Gaussian noise and/or masking of the scaled input. Under torchrun the noise is drawn for the
        global batch and sliced, so N ranks see the same corruption as one process."""
        if not self.noise_std and not self.options.mask_prob:
            return x
        world, rank = self.dist.world_size, self.dist.rank
        shape = (x.shape[0] * world, x.shape[1])
        rows = slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        x_input = x
        if self.noise_std:
            # scaled inputs have mean norm sqrt(d_in), so the per-dimension rms is about 1
            noise = torch.randn(shape, generator=self.generator, device=self.device)[rows]
            x_input = x_input + noise * self.noise_std
        if self.options.mask_prob:
            keep = torch.rand(shape, generator=self.generator, device=self.device)[rows] >= self.options.mask_prob
            x_input = x_input * keep
        return x_input

    def dead_mask(self) -> torch.Tensor:
        """[d_sae] bool: latents that have not fired for dead_after tokens (on device, no sync)."""
        return self.tokens_since_fired >= self.dead_after

    def step(self, x_raw: torch.Tensor, y_raw: torch.Tensor | None = None) -> dict:
        """One optimiser step on this rank's raw batch [batch, d_in] (a transcoder's: and its target y_raw).
        Returns the window's averaged metrics on logging steps (every log_every steps and the last), else {}."""
        model, options = self.model, self.options
        step = self.step_count
        x = x_raw.to(self.device, non_blocking=True).float() * model.input_scale  # [batch, d_in] clean target
        x_input = self.corrupt(x)
        if y_raw is not None:   # a transcoder: the target is another site's rows, in its own scale
            x = y_raw.to(self.device, non_blocking=True).float() * model.target_scale  # [batch, d_in]
        ctx = StepContext(step=step, progress=step / self.total_steps,
                          sparsity_scale=min(1.0, (step + 1) / max(1, int(self.total_steps * options.sparsity_warmup))),
                          dead_mask=self.dead_mask() if self.tracks_dead else None)
        with self.autocast:
            out = self.loss_module(x_input, x, ctx)
        loss = out.loss
        self.optimizer.zero_grad()
        with self.backward_products:
            loss.backward()
        model.remove_parallel_gradient()
        if options.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        lr = lr_at(step, self.total_steps, self.base_lr, options.lr_warmup, options.lr_decay)
        self.optimizer.lr = lr
        self.optimizer.step()
        if not self.optimizer.renormalised:
            model.normalize_decoder()

        global_batch = x.shape[0] * self.dist.world_size
        figures = {}
        if self.tracks_dead and out.fire_counts is not None:
            counts = distributed.reduce_sum(out.fire_counts.detach().float())  # [d_sae] over the global batch
            self.tokens_since_fired += global_batch
            self.tokens_since_fired.masked_fill_(counts > 0, 0)
            figures["l0"] = counts.sum() / global_batch
        self._bad |= ~torch.isfinite(loss.detach())
        x_hat = out.x_hat.detach().float()
        figures["loss"] = loss
        figures["fvu_num"] = out.squared_error if out.squared_error is not None else squared_distance(x_hat, x)
        figures["x_sq"] = torch.dot(x.reshape(-1), x.reshape(-1))  # FVU's denominator uses the whole window's
        figures["x_sum"] = x.sum(dim=0)   # mean, so it reduces across ranks exactly: Σ‖x‖² − ‖Σx‖²/n
        for name, value in out.terms.items():
            if torch.is_tensor(value):
                figures[f"terms.{name}"] = value.float().mean()
        self._accumulate(figures)
        self.step_count += 1
        self.tokens_seen += global_batch
        self._window_steps += 1
        self._window_tokens += global_batch
        if not sync_free(x):
            self.check_finite()  # free on CPU; on GPU only at log steps and checkpoints (no host sync per step)

        if model.revive_dead and self.tracks_dead and self.step_count % self.revive_every == 0 \
                and self.step_count < self.total_steps * (1 - options.lr_decay):
            self._revive(x, x_hat)
        last = self.step_count == self.total_steps
        if self.step_count % options.log_every == 0 or last:
            return self._log(x, lr)
        return {}

    def check_finite(self) -> None:
        if bool(distributed.reduce_max(self._bad.to(torch.int32))):
            self._bad.zero_()
            raise TrainingDiverged(
                f"the loss became NaN/Inf at step {self.step_count} (lr {self.base_lr:g}); stopped without saving "
                f"that state — try a lower --lr" + (f"; last checkpoint: {checkpoint.latest(self.run_dir)}"
                                                    if self.run_dir and checkpoint.latest(self.run_dir) else ""))

    @torch.no_grad()
    def _revive(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        dead = self.dead_mask()
        if not bool(dead.any()):
            return
        xs, x_hats = distributed.all_gather_cat(x), distributed.all_gather_cat(x_hat)  # the global batch
        revived = int(self.model.revive(dead, xs, x_hats) or 0)
        if revived:
            self.reset_optimizer_rows(dead)
            self.tokens_since_fired.masked_fill_(dead, 0)
            self.revived_total += revived

    @torch.no_grad()
    def reset_optimizer_rows(self, latents: torch.Tensor) -> None:
        """Zero Adam's moments for the given latents ([d_sae] bool) in every parameter with a latent axis."""
        d_sae = self.model.d_sae
        for name, param in self.model.named_parameters():
            state = self.optimizer.state.get(param)
            if not state:
                continue
            axes = [i for i, size in enumerate(param.shape) if size == d_sae]
            if not axes:
                continue
            axis = 0 if name.split(".")[-1].startswith("W_dec") else (1 if name.split(".")[-1].startswith("W_enc")
                                                                      and param.ndim > 1 else axes[-1])
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].shape == param.shape:
                    index = [slice(None)] * param.ndim
                    index[axis] = latents
                    state[key][tuple(index)] = 0.0

    # ---- logging --------------------------------------------------------------------------
    @torch.no_grad()
    def _log(self, x: torch.Tensor, lr: float) -> dict:
        self.check_finite()
        sums = {k: distributed.reduce_sum(v) for k, v in self._sums.items()}
        n = self._window_steps * (self.dist.world_size if self.dist.enabled else 1)
        now = time.perf_counter()
        metrics = {"step": self.step_count, "tokens": self.tokens_seen,
                   "loss": float(sums["loss"]) / n,
                   "fvu": float(sums["fvu_num"] / (sums["x_sq"] - sums["x_sum"].pow(2).sum()
                                                    / self._window_tokens).clamp_min(1e-12)),
                   "l0": float(sums["l0"]) / n if "l0" in sums else None,
                   "dead_fraction": float(self.dead_mask().float().mean()) if self.tracks_dead else None,
                   "lr": lr, "sparsity_scale": min(1.0, self.step_count / max(1, int(self.total_steps * self.options.sparsity_warmup))),
                   "tokens_per_s": self._window_tokens / max(1e-9, now - self._last_log_time)}
        if self.revived_total:
            metrics["revived"] = self.revived_total
        for key, value in sums.items():
            if key.startswith("terms.") and key[6:] not in metrics:  # the trainer's global figures win
                metrics[key[6:]] = float(value) / n
        try:
            extra = self.model.extra_metrics(x) if hasattr(self.model, "extra_metrics") else {}
            metrics.update({k: float(v) for k, v in (extra or {}).items()})
        except Exception:  # extra metrics are informative only
            pass
        self._last_log_time = now
        self._reset_window()
        self.last_metrics = metrics
        if self.run_dir is not None and self.dist.is_main:
            with open(self.run_dir / METRICS, "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
            loggers.log_metrics(self.run_dir, metrics)      # --log wandb|tensorboard (a no-op without it)
        return metrics

    # ---- state ----------------------------------------------------------------------------
    def config_extra_full(self, complete: bool) -> dict:
        return {**self.config_extra, "training": {**self.options.to_json(), "lr": self.base_lr,
                                                   "noise_std": self.noise_std, "steps": self.step_count,
                                                   "tokens_seen": self.tokens_seen, "complete": complete,
                                                   "world_size": self.dist.world_size}}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able meta): everything a bitwise resume needs besides the SAE's weights."""
        tensors, optim_meta = dict(self.optimizer.state_tensors()), self.optimizer.state_meta()
        tensors["tokens_since_fired"] = self.tokens_since_fired
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.corruption"] = self.generator.get_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"step": self.step_count, "tokens_seen": self.tokens_seen, "revived_total": self.revived_total,
                "base_lr": self.base_lr, "options": self.options.to_json(), "optimizer": optim_meta,
                "world_size": self.dist.world_size}
        return tensors, meta

    def load_state_dict(self, weights: dict, tensors: dict, meta: dict) -> None:
        self.model.load_state_dict(weights)
        self.model.to(self.device)
        self.optimizer.load(tensors, meta["optimizer"])
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"].to(self.device))
        torch.set_rng_state(tensors["rng.torch"])
        self.generator.set_state(tensors["rng.corruption"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step_count, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        self.revived_total = int(meta.get("revived_total", 0))
        self.base_lr = float(meta["base_lr"])

    def save_checkpoint(self) -> Path | None:
        """Write RUN/checkpoints/step_N (and refresh RUN/sae.safetensors + config.json). Rank 0 writes."""
        self.check_finite()
        path = None
        if self.run_dir is not None and self.dist.is_main:
            tensors, meta = self.state_dict()
            complete = self.step_count >= self.total_steps
            extra = self.config_extra_full(complete)
            path = checkpoint.save(self.run_dir, self.step_count, self.model, extra, tensors, meta,
                                   keep=self.options.keep_checkpoints)
            checkpoint.publish(path, self.run_dir)     # RUN/sae.safetensors: a link, the weights written once
        if self.dist.enabled:
            torch.distributed.barrier()
        return path

    def resume_from(self, path) -> None:
        weights, tensors, meta, _ = checkpoint.load(path)
        self.load_state_dict(weights, tensors, meta)
        if self.run_dir is not None and self.dist.is_main:
            checkpoint.truncate_metrics(self.run_dir / METRICS, self.step_count)

    def finish(self) -> dict:
        """Final save (checkpoint + RUN/sae.safetensors + config.json); returns the last metrics."""
        self.save_checkpoint()
        self.release_data_parallel()
        self.model.eval()
        return self.last_metrics

    def release_data_parallel(self) -> None:
        """Training is over: drop the DistributedDataParallel wrapper (it holds the process group, and while
        it does destroy_process_group cannot stop gloo's worker threads; see sae.distributed.teardown)."""
        module = getattr(self.loss_module, "module", None)
        if isinstance(module, parallel.LossModule):
            self.loss_module = module


# ---- `sae train --activations STORE`: the whole loop ----------------------------------------
def train_on_store(store, variant: str, run_dir, options: TrainOptions, knobs: dict | None = None, layer=None,
                   d_sae: int | None = None, expansion: float | None = None, resume: bool = False,
                   force: bool = False, progress: bool = True, on_log=None, allow_incomplete: bool = False,
                   transcoder: bool = False, skip: bool = False, init_from=None) -> dict:
    """Train one SAE of `variant` on an ActivationStore into run_dir (--init-from: sae.train.finetune); returns the summary dict. The run
    folder is locked while it is written (rank 0 holds the lock): a second writer is refused in one line."""
    import contextlib

    from sae.runs import check_store_finished
    check_store_finished(store, allow_incomplete)
    with FolderLock(run_dir, "sae train") if distributed.is_main_process() else contextlib.nullcontext():
        return _train_on_store(store, variant, run_dir, options, knobs, layer, d_sae, expansion, resume, force,
                               progress, on_log, transcoder, skip, init_from)


def _train_on_store(store, variant: str, run_dir, options: TrainOptions, knobs, layer, d_sae, expansion, resume,
                    force, progress, on_log, transcoder=False, skip=False, init_from=None) -> dict:
    from sae.progress import progress_bar as tqdm   # a bar in a terminal, a line every 30 s in a log

    from sae import variants
    from sae.train import finetune, transcoding
    transcoding.check_options(transcoder, skip)
    transcoding.check_store(store, transcoder)
    knobs = dict(knobs or {})
    cls = variants.get(variant)
    dist = distributed.info()
    distributed.check_batch(options.batch_size, dist.world_size)
    layer = store.resolve_layer(layer)
    if len(store) == 0:
        raise UserError(f"the store {store.path} is empty (0 rows)")
    run_dir = Path(run_dir)
    resume_from, refusal = None, ""
    if dist.is_main:  # only rank 0 touches the folder; its verdict is every rank's
        try:
            resume_from = checkpoint.prepare_run_dir(run_dir, resume, force)
        except UserError as error:
            refusal = str(error)
    if dist.enabled:
        refusal = distributed.broadcast_bytes(refusal.encode()).decode()
        chosen = distributed.broadcast_bytes(str(resume_from or "").encode()).decode()   # rank 0's checkpoint
        resume_from = Path(chosen) if resume and not refusal and chosen else None
    if refusal:
        raise UserError(refusal)
    if resume_from is not None:
        saved = read_json(resume_from / "config.json", "the checkpoint's config")
        checkpoint.check_resumable(saved, run_dir, variant, store, layer, d_sae, knobs)
        transcoding.check_resume(saved, run_dir, transcoder, skip)
        extended = checkpoint.check_resumed_options(saved["training"], options, run_dir)   # a larger --tokens
        if d_sae is None and expansion is not None and cls.default_d_sae(store.d_model, expansion) != saved["d_sae"]:
            raise UserError(f"cannot resume {run_dir}: its d_sae is {saved['d_sae']}, not {store.d_model} x "
                            f"--expansion {expansion}")
        d_sae, knobs = saved["d_sae"], saved.get("knobs", {})
        options = TrainOptions.from_json({**saved["training"], "device": options.device,
                                          **({"tokens": extended} if extended else {})})

    torch.manual_seed(options.seed)
    model = transcoding.create(cls, store.d_model, d_sae, expansion, knobs, transcoder, skip) if init_from is None \
        else finetune.start_from(init_from, cls, store, layer, d_sae, knobs, transcoder)      # --init-from
    config_extra = {**transcoding.config_extra(store.manifest.get("target_site"), transcoder),
                    "layer": layer, "site": store.manifest.get("site"), "model": store.manifest.get("model"),
                    "dataset": store.manifest.get("dataset"), "store": str(store.path), "store_digest": store.digest,
                    "model_dtype": store.manifest.get("model_dtype"), "store_dtype": store.manifest.get("dtype"), **finetune.provenance(init_from)}
    distributed.check_same_config({**model.config(), **config_extra, **options.to_json()})
    trainer = Trainer(model, options, run_dir, config_extra)
    if resume_from is not None:
        trainer.resume_from(resume_from)
    elif init_from is None:     # --init-from keeps the source's weights and (function-preserving) scale
        n_train = store.split_size("train")
        init_batch = min(options.init_rows, n_train) // dist.world_size * dist.world_size
        if init_batch < dist.world_size:
            raise UserError(f"the store has no training rows (all {len(store)} rows are held out)")
        sample_stream = store.train_batches(layer, init_batch, options.seed + 1, 0, dist.rank, dist.world_size,
                                            targets=transcoder)
        trainer.init_from_sample(*transcoding.pair(next(sample_stream)))
        sample_stream.close()

    total, batch, tokens_before = trainer.total_steps, options.batch_size, trainer.tokens_seen   # before: resumed
    started = time.perf_counter()
    cuda = trainer.device.type == "cuda"   # rows travel in the store's dtype, pinned and copied in the prefetch thread
    batches = store.train_batches(layer, batch, options.seed, trainer.step_count, dist.rank, dist.world_size,
                                  prefetch=4 if cuda else 0, targets=transcoder, dtype=None if cuda else torch.float32,
                                  device=trainer.device if cuda else None)
    bar = tqdm(total=total * batch, initial=trainer.tokens_seen, unit="tok", unit_scale=True, dynamic_ncols=True,
               desc=f"train {variant}", disable=(not progress) or (not dist.is_main) or None, file=sys.stderr)
    interrupted, clock = False, CheckpointClock(options.checkpoint_every, dist.enabled)
    try:
        with StopFlag() as stop:
            while trainer.step_count < total:
                x_raw = next(batches)  # [batch / world, d_in] raw activations (or input, target), prefetched
                metrics = trainer.step(*transcoding.pair(x_raw))
                bar.update(batch)
                if metrics:
                    bar.set_postfix_str(progress_postfix(metrics), refresh=False)
                    if on_log is not None and dist.is_main:
                        on_log(metrics)
                if clock.due(trainer.step_count, bool(metrics)) and trainer.step_count < total:
                    trainer.save_checkpoint()       # --checkpoint-every: steps or wall time (sae.train.schedule)
                    clock.saved()
                if (not dist.enabled or metrics) and stop.should_stop(dist.enabled):
                    interrupted = True
                    break
    finally:
        batches.close()
        bar.close()
    if interrupted:
        path = trainer.save_checkpoint()
        trainer.release_data_parallel()
        if dist.is_main:
            print(f"interrupted at step {trainer.step_count}/{total}: checkpoint saved to {path}\n"
                  f"continue with the same command and --resume", file=sys.stderr)
        return {"interrupted": True, "step": trainer.step_count, "run_dir": str(run_dir)}

    last = trainer.finish()
    elapsed = time.perf_counter() - started
    summary = {"variant": variant, "d_in": model.d_in, "d_sae": model.d_sae, "layer": layer, "train": last,
               "steps": trainer.step_count, "tokens": trainer.tokens_seen, "seconds": round(elapsed, 2),
               "tokens_this_run": trainer.tokens_seen - tokens_before, "run_dir": str(run_dir),
               "tokens_per_s": round((trainer.tokens_seen - tokens_before) / max(elapsed, 1e-9), 1) or None}
    if dist.is_main:
        summary["held_out"] = held_out_summary(model, store, layer, options.eval_rows, trainer.device) \
            if options.eval_rows else None
        from sae.files import write_json
        write_json(run_dir / SUMMARY, summary)
        if progress:
            print(format_summary(summary))
    return summary
