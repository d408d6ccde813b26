"""The variant registry: one file per variant; each file's class registers itself by name.

    from sae.variants import REGISTRY, create
    model = create("topk", d_in=576, d_sae=4608, k=32)
"""
from __future__ import annotations

import importlib
import pkgutil

from sae.variants.base import REGISTRY, SAE, LossOutput, register  # noqa: F401

_loaded = False


def load_all() -> dict:
    """Import every module in this package so that each variant registers itself."""
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if info.name not in ("base",) and not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True
    return REGISTRY


def names() -> list[str]:
    return sorted(load_all())


def get(name: str) -> type[SAE]:
    from sae.errors import UserError
    registry = load_all()
    if name not in registry:
        raise UserError(f"unknown variant {name!r}; valid variants: {', '.join(sorted(registry))}")
    return registry[name]


def create(name: str, d_in: int, d_sae: int | None = None, **knobs) -> SAE:
    return get(name).create(d_in=d_in, d_sae=d_sae, **knobs)
