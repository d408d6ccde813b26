"""Names that are neither `smollm2` nor a local folder are Hugging Face Hub ids: before transformers tries
them (and, offline, retries for half a minute), say in one line what is wrong and suggest a close name.

    check_hub_model("smollm")   # UserError: ... the Hugging Face Hub could not be reached ...; did you mean 'smollm2'?
    hub_problem(name, error)    # the one line for an error transformers / huggingface_hub raised
"""
from __future__ import annotations

import difflib
import os
import socket
from urllib.parse import urlparse

from sae.errors import UserError

KNOWN_NAMES = ("smollm2",)           # the embedded model(s), suggested for close misspellings
CONNECT_TIMEOUT_S = 3.0


def suggestion(name: str) -> str:
    """'; did you mean 'smollm2'?' for a close name (smollm, smolm2, SmolLM2), else ''."""
    lowered = name.strip().lower()
    close = difflib.get_close_matches(lowered, KNOWN_NAMES, n=1, cutoff=0.6)
    if not close and any(lowered.startswith(k[:4]) for k in KNOWN_NAMES):
        close = [k for k in KNOWN_NAMES if lowered.startswith(k[:4])][:1]
    return f"; did you mean {close[0]!r} (the embedded model)?" if close else ""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def reachable(url: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub's host opens within `timeout` seconds (no request is sent)."""
    parsed = urlparse(url or endpoint())
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def cached(name: str) -> bool:
    """Whether the hub id's config.json is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub library rejects is simply not cached
        return False


def check_hub_model(name: str) -> None:
    """For a hub id not in the cache: refuse at once when offline (HF_HUB_OFFLINE) or when the hub cannot be
    reached, instead of letting the download retry for half a minute."""
    if cached(name):
        return
    if offline():
        raise UserError(f"unknown model {name!r}: not 'smollm2' or a local model folder, and the Hugging Face Hub "
                        f"is switched off (HF_HUB_OFFLINE=1) with no copy in the local cache{suggestion(name)}")
    if not reachable():
        raise UserError(f"unknown model {name!r}: not 'smollm2' or a local model folder, and the Hugging Face Hub "
                        f"({endpoint()}) could not be reached to look it up (offline?){suggestion(name)}")


def hub_problem(name: str, error: Exception) -> UserError:
    """One line for an error raised while loading `name` from the hub, from huggingface_hub's error types."""
    from huggingface_hub import errors
    kinds = {errors.RepositoryNotFoundError: "no such model on the Hugging Face Hub",
             errors.GatedRepoError: "a gated model: accept its licence on the hub and log in (hf auth login)",
             errors.OfflineModeIsEnabled: "the Hugging Face Hub is switched off (HF_HUB_OFFLINE=1) and the model "
                                          "is not in the local cache",
             errors.LocalEntryNotFoundError: "the Hugging Face Hub could not be reached and the model is not in "
                                             "the local cache",
             errors.HFValidationError: "not a valid Hugging Face model id"}
    cause = error
    while cause is not None:
        for kind, why in kinds.items():
            if isinstance(cause, kind):
                return UserError(f"unknown model {name!r}: not 'smollm2' or a local model folder; {why}"
                                 f"{suggestion(name)}")
        cause = cause.__cause__ or cause.__context__
    return UserError(f"unknown model {name!r}: not 'smollm2', a local model folder, or a loadable "
                     f"Hugging Face model id [{type(error).__name__}]{suggestion(name)}")
