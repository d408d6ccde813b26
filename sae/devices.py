"""Device choice shared by every command."""
from __future__ import annotations

import torch

from sae.errors import UserError


def resolve(name: str | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is refused."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)
