"""What every sparse autoencoder is, whatever its variant; the trainer talks only to this interface.

A variant is one file in sae/variants/ with one class that subclasses SAE, decorated @register,
and says only what differs: its knobs, build(), encode_scaled(), decode_scaled(), training_loss().

Units: the public encode()/decode() take and return raw activations. Internally every variant works
on scaled inputs x_scaled = x_raw * input_scale (the trainer sets input_scale so that the mean
training-token norm is sqrt(d_in)); the scale is a buffer, saved with the weights.

Parameter names, where a variant has them (export and dead-latent resampling rely on them):
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from sae import distributed
from sae.kernels import native
from sae.kernels.autograd import Listing, count_latents
from sae.kernels.matmul import addmm
from sae.errors import UserError

REGISTRY: dict[str, type["SAE"]] = {}


def register(cls):
    """Class decorator: add a variant to the registry under cls.name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Knob:
    """One variant-specific option, exposed on the command line as --<name with dashes>."""
    default: object
    help: str
    type: type = float
    minimum: float | None = None          # inclusive lower bound
    positive: bool = False                # strictly > 0


def check_fits_in_memory(d_in: int, d_sae: int) -> None:
    """Refuse, before allocating, an SAE whose fp32 encoder and decoder with Adam's two moments (6 x d_in x d_sae
    floats) would not fit in this machine's memory, naming what it would need."""
    import os
    need = 6 * 4 * int(d_in) * int(d_sae)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        from sae.files import human_bytes
        raise UserError(f"d_sae {d_sae:,} x d_in {d_in:,} needs about {human_bytes(need)} for the weights and Adam's "
                        f"state, more than this machine's {human_bytes(have)}: choose a smaller --expansion / --d-sae")


@dataclass
class StepContext:
    """What the trainer tells a variant about the current step."""
    step: int = 0
    progress: float = 0.0                 # fraction of the training budget done, in [0, 1]
    sparsity_scale: float = 1.0           # warm-up factor for sparsity penalties, in [0, 1]
    dead_mask: torch.Tensor | None = None  # [d_sae] bool: latents that have not fired for a long time


@dataclass
class LossOutput:
    loss: torch.Tensor                    # scalar: what the optimiser minimises
    x_hat: torch.Tensor                   # [batch, d_in] reconstruction of the clean target, scaled units
    fire_counts: torch.Tensor | None      # [d_sae] how many tokens of the batch each latent fired on; None for dense signed codes
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # named loss parts and extra stats, for logging
    squared_error: torch.Tensor | None = None  # Σ‖x_hat − x‖² of the batch (no grad), when the loss had it at hand


class SAE(nn.Module):
    name: ClassVar[str] = ""
    KNOBS: ClassVar[dict[str, Knob]] = {}
    signed_codes: ClassVar[bool] = False       # codes are signed and dense (linear, vae): L0/dead are null
    unit_norm_decoder: ClassVar[bool] = True   # keep decoder rows at unit norm; remove the parallel gradient
    revive_dead: ClassVar[bool] = False        # trainer calls revive() on dead latents (resampling / code restart)
    default_noise_std: ClassVar[float] = 0.0   # input corruption applied by the trainer unless the user sets it
    default_lr: ClassVar[float | None] = None  # a learning rate this variant trains well with (None: trainer's)
    sparse_decoding: ClassVar[bool] = False    # training lists its codes (list_entries) and decodes them sparse

    def __init__(self, d_in: int, d_sae: int, **knobs):
        super().__init__()
        self.d_in = int(d_in)
        self.d_sae = int(d_sae)
        self.knobs = {name: knobs.get(name, knob.default) for name, knob in self.KNOBS.items()}
        unknown = set(knobs) - set(self.KNOBS)
        if unknown:
            raise UserError(f"variant {self.name} does not take {', '.join(sorted(unknown))}")
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.build()

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def default_d_sae(cls, d_in: int, expansion: float) -> int:
        return int(round(d_in * expansion))

    @classmethod
    def check_width(cls, d_in: int, d_sae: int) -> None:
        """Raise UserError for a width this variant cannot use."""
        if d_sae <= 0:
            raise UserError(f"d_sae must be positive, got {d_sae}")
        check_fits_in_memory(d_in, d_sae)

    @classmethod
    def check_knobs(cls, d_in: int, d_sae: int, knobs: dict) -> None:
        """Validate knob values (bounds from Knob; variants add cross-checks by overriding)."""
        for name, value in knobs.items():
            knob = cls.KNOBS[name]
            if value is None:
                continue
            if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
            if knob.positive and not value > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0 for {cls.name}, got {value}")
            if knob.minimum is not None and value < knob.minimum:
                raise UserError(f"--{name.replace('_', '-')} must be ≥ {knob.minimum} for {cls.name}, got {value}")

    @classmethod
    def create(cls, d_in: int, d_sae: int | None = None, expansion: float = 8.0, **knobs) -> "SAE":
        d_sae = cls.default_d_sae(d_in, expansion) if d_sae is None else int(d_sae)
        cls.check_width(d_in, d_sae)
        full = {name: knobs.get(name, knob.default) for name, knob in cls.KNOBS.items()}
        unknown = set(knobs) - set(cls.KNOBS)
        if unknown:
            raise UserError(f"variant {cls.name} does not take {', '.join(sorted(unknown))}")
        cls.check_knobs(d_in, d_sae, full)
        return cls(d_in, d_sae, **full)

    def build(self) -> None:
        """Create parameters (called from __init__ with self.d_in, self.d_sae, self.knobs set)."""
        raise NotImplementedError

    def config(self) -> dict:
        """What reproduces this module: variant, widths, knobs (config.json adds the run's context)."""
        return {"variant": self.name, "d_in": self.d_in, "d_sae": self.d_sae, "knobs": dict(self.knobs),
                "fire_threshold": self.fire_threshold, "signed_codes": self.signed_codes}

    # ---- inference, raw units -------------------------------------------------------------
    @property
    def fire_threshold(self) -> float | None:
        """τ: a latent fires when its code is > τ. None for signed dense codes."""
        return None if self.signed_codes else 0.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d_in] raw activations -> [n, d_sae] codes."""
        return self.encode_scaled(x.to(self.input_scale.dtype) * self.input_scale)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[n, d_sae] codes -> [n, d_in] reconstruction in raw units."""
        return self.decode_scaled(codes) / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x_hat [n, d_in], fire_counts [d_sae] of the n tokens, None for signed codes), raw units: what
        scoring needs, the same as decode(encode(x)). Sparse variants override it to skip dense codes."""
        codes = self.encode(x)                                    # [n, d_sae]
        counts = None if self.fire_threshold is None else (codes > self.fire_threshold).sum(dim=0)
        return self.decode(codes), counts

    def decoder_directions_raw(self) -> torch.Tensor:
        """[d_sae, d_in] the decoder's directions in the activations' own (raw) units: decode(c) ==
        c @ decoder_directions_raw() + decode(0), so a code of a on latent j adds a · row j to the
        reconstruction (what sae.steer uses). `W_dec` is in the SAE's internal scaled units (raw ×
        input_scale): `x + a * W_dec[j]` steers at a scale that is not a code of a."""
        return self.W_dec / self.input_scale

    @property
    def W_dec_raw(self) -> torch.Tensor:
        """[d_sae, d_in] decoder directions in raw units (= decoder_directions_raw())."""
        return self.decoder_directions_raw()

    # ---- what a variant implements --------------------------------------------------------
    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_scaled(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, x_input: torch.Tensor, x_target: torch.Tensor, ctx: StepContext) -> LossOutput:
        """x_input: the (possibly corrupted) scaled input; x_target: the clean scaled input to reconstruct."""
        raise NotImplementedError

    @torch.no_grad()
    def extra_metrics(self, x: torch.Tensor) -> dict:
        """Variant-specific figures on a scaled sample [n, d_in] (vq: perplexity, usage; vae: active dims)."""
        return {}

    # ---- training hooks with shared defaults ----------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Called once before training with a scaled sample [n, d_in]: b_dec at the geometric median."""
        if hasattr(self, "b_dec") and isinstance(self.b_dec, torch.Tensor):
            self.b_dec.copy_(geometric_median(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder and hasattr(self, "W_dec"):
            if not native.normalize_rows_(self.W_dec.data, 1e-8):    # one pass where the C kernels are here
                self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Project out the gradient component parallel to each (unit) decoder row."""
        if self.unit_norm_decoder and hasattr(self, "W_dec") and self.W_dec.grad is not None:
            grad, rows = self.W_dec.grad, self.W_dec
            parallel = (grad * rows).sum(dim=1)                   # [d_sae] component along each unit row (einsum: a slow bmm)
            grad.addcmul_(parallel[:, None], rows, value=-1.0)

    @torch.no_grad()
    def revive(self, dead_mask: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor) -> int:
        """Anthropic's resampling: re-point dead latents at poorly reconstructed inputs.

        dead_mask [d_sae] bool, x/x_hat [n, d_in] scaled. Returns how many latents were revived.
        The trainer resets their optimiser state.
        """
        dead = dead_mask.nonzero().squeeze(1)
        if len(dead) == 0 or not all(hasattr(self, n) for n in ("W_enc", "b_enc", "W_dec")):
            return 0
        errors = (x - x_hat).pow(2).sum(dim=1)  # [n]
        probs = errors / errors.sum() if errors.sum() > 0 else torch.full_like(errors, 1 / len(errors))
        picks = torch.multinomial(probs, len(dead), replacement=len(dead) > len(errors))
        directions = x[picks] - self.b_dec if hasattr(self, "b_dec") else x[picks]
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)  # [n_dead, d_in]
        alive = ~dead_mask
        alive_norm = self.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
        self.W_dec[dead] = directions
        self.W_enc[:, dead] = directions.T * alive_norm * 0.2
        self.b_enc[dead] = 0.0
        return len(dead)


def encode_centred(x: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """(x − b_dec) W_enc (+ bias) -> [batch, d_sae], with b_dec's gradient through a vector product: the product
    reads x centred on a detached b_dec (so a bf16 product rounds the centred rows, not the raw ones), and
    b_dec's gradient −W_enc Σ_batch grad comes from (b_dec.detach() − b_dec) W_enc, a bias term whose value is
    exactly zero. Autograd of the plain form would compute the [batch, d_in] gradient of x − b_dec instead, a
    second dense product of the encoder's size, only to sum it."""
    zero = (b_dec.detach() - b_dec) @ W_enc                   # [d_sae], value 0: carries b_dec's gradient
    return addmm(zero if bias is None else bias + zero, x - b_dec.detach(), W_enc)


@torch.no_grad()
def geometric_median(x: torch.Tensor, iterations: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm on [n, d] -> [d]."""
    median = x.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(eps)  # [n]
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        if (new - median).norm() < eps * max(1.0, float(median.norm())):
            median = new
            break
        median = new
    return median


def kaiming_pair(d_in: int, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder rows at unit norm, encoder initialised as the decoder's transpose (a common SAE init).
    Returns W_enc [d_in, d_sae], W_dec [d_sae, d_in]."""
    W_dec = torch.randn(d_sae, d_in)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    return W_dec.T.clone().contiguous(), W_dec


def squared_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_d (x̂ − x)² per token, averaged over the batch (the reconstruction term of every penalty)."""
    return (x_hat - x).pow(2).sum(dim=-1).mean()


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ (a − b)² over every element: (a − b).pow(2).sum() as one fused pass, with a fused backward."""
    return torch.nn.functional.mse_loss(a, b.expand_as(a), reduction="sum")


def total_variance(x: torch.Tensor) -> torch.Tensor:
    """Σ‖x − mean(x)‖² of the batch, no gradient. Under torch.distributed: the *global* batch's, divided by
    the world size, so that DDP's averaged gradients of Σ_local‖x − x̂‖² / total_variance equal those of a
    single process on the whole batch. In one process it is the plain batch variance sum."""
    x = x.detach()
    if not distributed.is_active():
        return squared_distance(x, x.mean(dim=0)).clamp_min(1e-12)
    n = torch.tensor([float(x.shape[0])], device=x.device)
    stats = distributed.reduce_sum(torch.cat([n, x.pow(2).sum().reshape(1), x.sum(dim=0)]))
    n_global, sq_global, sum_global = stats[0], stats[1], stats[2:]
    variance = sq_global - sum_global.pow(2).sum() / n_global
    return (variance / distributed.world_size()).clamp_min(1e-12)


def batch_fvu(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fraction of the batch's variance left unexplained: Σ‖x − x̂‖² / Σ‖x − mean(x)‖² (global batch under DDP)."""
    return squared_distance(x_hat, x) / total_variance(x)


def firing_quantile(pre: torch.Tensor, l0: float, d_sae: int) -> torch.Tensor:
    """pre [n, m] pre-activations of m latents -> [m] each latent's value exceeded on about min(l0, d_sae/4)/d_sae
    of the n tokens: a bias lowered by it makes about l0 of d_sae latents fire a token (the sparse starts and
    revivals of jumprelu, gated and l1)."""
    rate = min(0.25, l0 / d_sae)
    rank = min(len(pre), max(1, int(round((1 - rate) * len(pre)))))
    return pre.kthvalue(rank, dim=0).values


def fired(codes: torch.Tensor, threshold: float = 0.0, listing: Listing | None = None, d_sae: int = 0) -> torch.Tensor:
    """[batch, d_sae] codes -> [d_sae] number of tokens on which each latent fired (code > τ); or codes [n] at a
    listing's entries (sae.kernels.autograd.list_entries), the rest zero, of d_sae latents."""
    if listing is not None:
        return count_latents(listing.cols, (codes.detach() > threshold).long(), d_sae)
    return (codes.detach() > threshold).sum(dim=0)
