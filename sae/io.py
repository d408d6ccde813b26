"""Run folders: RUN/config.json + RUN/sae.safetensors. `sae.load` opens them (and, through
sae.interop, SAELens and sparsify folders). Nothing here reads a pickle."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.errors import UserError
from sae.store import write_json

CONFIG = "config.json"
WEIGHTS = "sae.safetensors"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("sae")
    except PackageNotFoundError:
        return "0+unknown"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_weights(model, path: Path) -> None:
    """Write the state dict as safetensors under a temporary name, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def save_run(model, run_dir, extra: dict | None = None) -> None:
    """Write config.json (the module's config plus run context) and sae.safetensors."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**(extra or {}), **model.config(),
              "version": package_version(), "git_commit": git_commit()}
    save_weights(model, run_dir / WEIGHTS)
    write_json(run_dir / CONFIG, config)


def read_config(run_dir) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no {CONFIG})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None


def build_from_config(config: dict):
    from sae import variants
    cls = variants.get(config["variant"])
    return cls(config["d_in"], config["d_sae"], **config.get("knobs", {}))


def load(path, device: str | torch.device = "cpu", weights: str | None = None, **kwargs):
    """Open a trained SAE: a run folder of this project, or (via sae.interop) another tool's layout."""
    path_str = str(path)
    run_dir = Path(path_str)
    if not run_dir.exists():
        from sae import interop
        return interop.load_foreign(path_str, device=device, **kwargs)
    if (run_dir / CONFIG).is_file() and "variant" in json.loads((run_dir / CONFIG).read_text() or "{}"):
        config = read_config(run_dir)
        model = build_from_config(config)
        weight_path = Path(weights) if weights else run_dir / WEIGHTS
        if not weight_path.is_file():
            raise UserError(f"{run_dir} has no weights ({weight_path.name} is missing)")
        model.load_state_dict(load_file(str(weight_path)))
        model.run_config = config
        return model.to(device).eval()
    from sae import interop
    return interop.load_foreign(path_str, device=device, **kwargs)
