"""What a training run is asked to do: TrainOptions (validated when made), and the schedules every trainer
shares (the default learning rate, LR warm-up and decay)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from sae.errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN or Inf: training stops and nothing from that step is saved."""


@dataclass
class TrainOptions:
    tokens: int = 524_288                 # training budget (tokens)
    batch_size: int = 1024                # global batch (split across ranks under torchrun)
    lr: float | None = None               # None: the variant's default_lr, else 8e-4·sqrt(16384/d_sae), at most 2e-3
    lr_warmup: float = 0.02               # fraction of steps with linear LR warm-up
    lr_decay: float = 0.2                 # final fraction of steps with linear decay to 0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    sparsity_warmup: float = 0.05         # fraction of steps over which sparsity penalties ramp up to full
    seed: int = 0
    device: str = "auto"
    noise_std: float | None = None        # None: the variant's default_noise_std (std in units of the scaled input's per-dim rms)
    mask_prob: float = 0.0                # drop each input dimension with this probability (input corruption)
    checkpoint_every: int | str = "10m"   # steps (500) or wall time ("10m"); 0 (Python API): only at the end
    keep_checkpoints: int = 3             # newest checkpoints kept (0: all)
    log_every: int = 10                   # steps between metrics.jsonl lines
    dead_after_tokens: int | None = None  # a latent is dead after this many tokens without firing (None: min(10M, tokens/10))
    revive_every: int | None = None       # steps between revivals for variants with revive_dead (None: the dead window)
    init_rows: int = 16384                # rows used to set the input scale and the decoder bias
    grad_clip: float | None = None        # max gradient norm (None: no clipping)
    autocast: bool = True                 # bf16 autocast on CUDA
    cpu_bf16: bool = False                # CPU products with bf16 inputs, fp32 results (sae.matmul.bf16_products)
    eval_rows: int = 16384                # held-out rows scored at the end (0: skip)

    def __post_init__(self):
        """Refuse bad options in one line, for Python callers as for the command line."""
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.tokens < self.batch_size:
            raise UserError(f"--tokens {self.tokens} is less than one batch ({self.batch_size})")
        if self.lr is not None and not 0 < self.lr < 10:
            raise UserError(f"--lr must be in (0, 10), got {self.lr}")
        if self.noise_std is not None and not self.noise_std >= 0:
            raise UserError(f"--noise-std must be ≥ 0, got {self.noise_std}")
        if not 0 <= self.mask_prob < 1:
            raise UserError(f"--mask-prob must be in [0, 1), got {self.mask_prob}")
        for name in ("lr_warmup", "lr_decay", "sparsity_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        from sae.train.schedule import parse
        parse(self.checkpoint_every, allow_zero=True)
        for name in ("keep_checkpoints", "eval_rows"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(self, name)}")
        for name in ("log_every", "dead_after_tokens", "grad_clip", "revive_every", "init_rows"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    @property
    def dead_after(self) -> int:
        """Tokens without firing after which a latent counts as dead (the rule every trainer uses)."""
        return self.dead_after_tokens or max(self.batch_size, min(10_000_000, self.tokens // 10))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainOptions":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def default_lr(model) -> float:
    """The variant's own default_lr, else 8e-4·sqrt(16384/d_sae) within [1e-4, 2e-3]."""
    own = getattr(model, "default_lr", None)
    if own:
        return float(own)
    return float(min(2e-3, max(1e-4, 8e-4 * math.sqrt(16384 / model.d_sae))))


def lr_at(step: int, total: int, base: float, warmup: float, decay: float) -> float:
    """Linear warm-up over the first `warmup` fraction, flat, then linear decay to 0 over the last `decay`."""
    warm_steps = max(1, int(total * warmup))
    decay_steps = int(total * decay)
    if step < warm_steps:
        return base * (step + 1) / warm_steps
    if decay_steps and step >= total - decay_steps:
        return base * max(0.0, (total - step) / decay_steps)
    return base
