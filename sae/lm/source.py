"""Where activations come from: the model, its layers and site, the data, and which rows are kept. One
definition for `sae collect` (CollectOptions) and live training (LiveOptions), checked when made."""
from __future__ import annotations

from dataclasses import dataclass

from sae.errors import UserError
from sae.lm.loading import parse_model_dtype
from sae.lm.sites import parse_layers


@dataclass(kw_only=True)
class SourceOptions:
    model: str
    layers: list                          # '3,6,9' or [3, 6, 9]
    site: str = "resid_post"
    target_site: str | None = None        # a second site stored beside it (a transcoder's target: mlp_out)
    dataset: str = "bbc"
    text_column: str | None = None
    split: str | None = None
    context_size: int = 128               # tokens per window, BOS included
    keep_special_tokens: bool = False
    max_norm_ratio: float | None = None   # drop rows above this x the layer's median norm
    model_dtype: str = "auto"             # auto|float32|bfloat16|float16 (auto: bf16 on CUDA, fp32 on the CPU)

    def __post_init__(self):
        """Refuse bad options in one line, for Python callers as for the command line."""
        self.layers = parse_layers(self.layers)
        parse_model_dtype(self.model_dtype)
        if self.target_site is not None and self.target_site == self.site:
            raise UserError(f"--target-site must differ from --site (both are {self.site}): a transcoder "
                            f"predicts one site from another")
        if self.context_size < 2:
            raise UserError(f"--context-size must be at least 2, got {self.context_size}")
        if self.max_norm_ratio is not None and not self.max_norm_ratio > 0:
            raise UserError(f"--max-norm-ratio must be positive, got {self.max_norm_ratio}")
