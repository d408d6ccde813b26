"""Lazy re-exports for a stage package's __init__: `from sae.train import TrainOptions` works, yet importing
the package (or one of its modules) does not import the rest of the stage. Imports nothing of the project."""
from __future__ import annotations

import importlib


def exports(package: str, names: dict[str, str]):
    """(__getattr__, __all__) for `package`: each name is read from its module on first use."""

    def __getattr__(name):
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, list(names)
