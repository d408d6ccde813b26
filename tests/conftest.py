"""Shared fixtures. The real embedded model is loaded once per test run; tokenizers never download."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (dequantised, cached) as a sae.models.LoadedModel."""
    from sae.models import load_model
    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from sae.models import load_tokenizer
    return load_tokenizer("smollm2")
