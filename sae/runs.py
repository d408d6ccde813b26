"""Run folders: RUN/config.json + RUN/sae.safetensors. `sae.load` opens them (and, through
sae.interop, SAELens and sparsify folders and Hub repos), `save_pretrained` / `push_to_hub` write and
share them. Nothing here reads a pickle. sae.interop never imports this module back."""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.errors import UserError
from sae.files import read_json, replace_durably, write_atomic_bytes, write_json

CONFIG = "config.json"
WEIGHTS = "sae.safetensors"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    for distribution in ("sae-toolkit", "sae"):      # the distribution's name on the package index, then the old one
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return sys.modules["sae"].__version__     # the parent package, always imported before this module


@functools.lru_cache(maxsize=1)
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
    replace_durably(tmp, path)


def save_run(model, run_dir, extra: dict | None = None) -> None:
    """Write config.json (the module's config plus run context) and sae.safetensors."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**(extra or {}), **model.config(),
              "version": package_version(), "git_commit": git_commit()}
    save_weights(model, run_dir / WEIGHTS)
    write_json(run_dir / CONFIG, config)


# what save_run writes itself (the module's config(), the package's version): the rest of a config is context
_OWN_KEYS = ("variant", "d_in", "d_sae", "knobs", "fire_threshold", "signed_codes", "version", "git_commit")


def run_context(config: dict) -> dict:
    """A run config's context (layer, site, model, store, training ...), to save again beside other weights."""
    return {k: v for k, v in config.items() if k not in _OWN_KEYS}


def read_config(run_dir) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        from sae import interop
        foreign = interop.describe(run_dir)  # a SAELens / sparsify folder: its config in our terms
        if foreign is not None:
            return foreign
        raise UserError(f"{run_dir} is not a run folder (no {CONFIG})")
    return read_json(path, "the run's config")


def build_from_config(config: dict, where="the run's config.json"):
    """The module a run's config describes, empty; a config with missing or wrong fields is one line."""
    from sae import variants
    missing = [key for key in ("variant", "d_in", "d_sae") if key not in config]
    if missing:
        raise UserError(f"{where} is damaged: it lacks {', '.join(missing)}")
    cls = variants.get(config["variant"])
    knobs = config.get("knobs") or {}
    try:
        d_in, d_sae = int(config["d_in"]), int(config["d_sae"])
        if d_in <= 0 or d_sae <= 0 or not isinstance(knobs, dict):
            raise ValueError("widths must be positive")
        if config.get("transcoder"):
            from sae.variants.transcoder import transcoder_class
            return transcoder_class(cls)(d_in, d_sae, skip=bool(config.get("skip")), **knobs)
        return cls(d_in, d_sae, **knobs)
    except (TypeError, ValueError) as error:
        raise UserError(f"{where} is damaged: {error}") from None


def _is_device(value) -> bool:
    return isinstance(value, torch.device) or (
        isinstance(value, str) and re.fullmatch(r"(cpu|cuda|mps|xpu|meta|auto)(:\d+)?", value) is not None)


def load(path, sae_id: str | None = None, device: str | torch.device = "cpu", weights: str | None = None,
         subfolder: str | None = None, revision: str | None = None):
    """Open a trained SAE: a run folder of this project, or (via sae.interop) another tool's layout (SAELens,
    sparsify, Gemma Scope's params.npz), local or a Hub id (`subfolder` picks one SAE of a repo; RUN/layer_L of
    a live-training run), or a published SAE by release name: load(RELEASE, SAE_ID) or load("RELEASE:SAE_ID")
    (sae/interop/releases.json). load(RUN, "cuda") still reads the second argument as the device."""
    from sae import interop
    from sae.interop import releases
    name = str(path)
    if sae_id is not None and _is_device(sae_id) and not releases.is_release(name):
        device, sae_id = sae_id, None
    spec = releases.parse_spec(name) if sae_id is None else None
    exists = Path(name).expanduser().exists()
    if spec is not None or (not exists and releases.is_release(name)):
        release, sae_id = spec or (name, sae_id)
        return releases.load_release(release, sae_id, device=device, revision=revision)
    if sae_id is not None:
        if not exists:
            releases.check_release(name)          # unknown release: the closest names
        raise UserError(f"{name} is a folder, not a release name: sae.load(FOLDER) takes no SAE id "
                        f"(subfolder= picks one SAE inside it)")
    local, kind = interop.locate(path, subfolder, revision)
    config = read_config(local) if kind in ("run", None) and (local / CONFIG).is_file() else {}
    if "variant" not in config:            # another tool's layout (or nothing we know: it says why)
        return interop.load_foreign(local, kind, device=device)
    model = build_from_config(config, f"{local / CONFIG}")
    weight_path = Path(weights) if weights else local / WEIGHTS
    if not weight_path.is_file():
        raise UserError(f"{local} has no weights ({weight_path.name} is missing)")
    try:
        state = load_file(str(weight_path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types for a damaged file
        raise UserError(f"{weight_path} cannot be read ({type(error).__name__}): the weights are damaged") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise UserError(f"{weight_path} does not fit its config.json ({detail[:200]})") from None
    model.run_config = config
    return model.to(device).eval()


def release_run(release: str, sae_id: str | None, revision: str | None = None) -> Path:
    """A published SAE as a run folder of this project (config.json + sae.safetensors, the same function),
    made once under the cache (SAE_CACHE/releases/RELEASE/SAE_ID), so that eval, analyze and the dashboard
    open it as any run and write eval.json and analysis/ beside it."""
    from sae.files import cache_dir
    from sae.interop import releases
    info = releases.resolve(release, sae_id)
    folder = cache_dir() / "releases" / release / info["sae_id"]
    if (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file():
        return folder
    model = releases.load_release(release, info["sae_id"], revision=revision)
    save_run(model, folder, run_context(model.run_config))   # config.json last
    return folder


def resolve_run(text) -> str:
    """A --run / RUN argument: a folder as given, or RELEASE:SAE_ID made into a run folder (release_run)."""
    from sae.interop import releases
    spec = releases.parse_spec(str(text))
    return str(release_run(*spec)) if spec is not None else str(text)


# ---- Hugging Face Hub: a run folder is a Hub repo as it is ----------------------------------
MODEL_CARD = "README.md"


def save_pretrained(model, save_directory, extra: dict | None = None, model_card: bool = True) -> Path:
    """Write a module as a run folder (config.json + sae.safetensors, and a README.md model card unless
    one exists) that `from_pretrained` reads back and `push_to_hub` uploads as it is."""
    save_directory = Path(save_directory)
    save_run(model, save_directory, {**run_context(getattr(model, "run_config", None) or {}), **(extra or {})})
    if model_card and not (save_directory / MODEL_CARD).exists():
        write_atomic_bytes(save_directory / MODEL_CARD, model_card_text(read_config(save_directory)).encode())
    return save_directory


def model_card_text(config: dict) -> str:
    where = ", ".join(f"{k} {config[k]}" for k in ("model", "layer", "site") if config.get(k) is not None)
    return (f"---\nlibrary_name: sae\ntags:\n- sparse-autoencoder\n- interpretability\n"
            f"- sae-{config.get('variant')}\n---\n\n"
            f"# {config.get('variant')} sparse autoencoder{' (' + where + ')' if where else ''}\n\n"
            f"d_in = {config.get('d_in')}, d_sae = {config.get('d_sae')}, knobs: {config.get('knobs', {})}.\n\n"
            f"```python\nimport sae\nmodel = sae.io.from_pretrained(\"<this repo id>\")   # or sae.load(\"<repo id>\")\n"
            f"codes = model.encode(x)      # x: [n, {config.get('d_in')}] raw activations\n"
            f"x_hat = model.decode(codes)\n```\n\n"
            f"Files: config.json (variant, knobs, training context), sae.safetensors (weights; the input scale is "
            f"the `input_scale` buffer); analysis/ and eval.json when present.\n")


def from_pretrained(name_or_path, subfolder: str | None = None, revision: str | None = None,
                    device: str | torch.device = "cpu"):
    """`sae.load` for a local folder or a Hub repo id (fetched with huggingface_hub; only `subfolder/*`
    when a subfolder is named). Opens this project's runs and SAELens / sparsify layouts alike."""
    return load(name_or_path, device=device, subfolder=subfolder, revision=revision)


def push_to_hub(run_dir, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "Upload sparse autoencoder") -> str:
    """Upload a run folder to the Hub as it is (config.json, sae.safetensors, analysis/ ...)."""
    from huggingface_hub import HfApi
    run_dir = Path(run_dir)
    read_config(run_dir)  # refuse what is not a run folder before touching the network
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(run_dir), repo_id=repo_id, commit_message=commit_message,
                      ignore_patterns=[".*", "**/.*", "*.tmp*", "checkpoint*/**"])
    return f"https://huggingface.co/{repo_id}"


def check_finished(config: dict, what, allow_incomplete: bool = False) -> None:
    """An interrupted training run (config.json's training.complete is false) is refused in one line unless
    allowed; allowed, it goes through with a warning on stderr."""
    training = config.get("training") or {}
    if training.get("complete") is False:
        detail = f"stopped at {training['tokens_seen']:,} of {training['tokens']:,} tokens" \
            if isinstance(training.get("tokens_seen"), int) and isinstance(training.get("tokens"), int) else "unfinished"
        _unfinished(f"{what} is an unfinished training run ({detail})", "sae train", allow_incomplete)


def check_store_finished(store, allow_incomplete: bool = False) -> None:
    """An unfinished store (manifest complete: false, a collection still running or killed) likewise."""
    if store.manifest.get("complete") is False:
        _unfinished(f"the store {store.path} is unfinished (its collection stopped or is still running)", "sae collect",
                    allow_incomplete)


def _unfinished(what: str, command: str, allow_incomplete: bool) -> None:
    if not allow_incomplete:
        raise UserError(f"{what}: finish it with `{command} ... --resume`, or pass --allow-incomplete")
    import sys
    print(f"warning: {what}", file=sys.stderr)


def check_run_store(config: dict, store, layer=None, allow_incomplete: bool = False):
    """Where a run meets a store (eval, analyze): the store's layer key to use, or one UserError line naming
    what differs (model, site, width, layer). Unfinished runs and stores are refused unless allowed."""
    check_finished(config, "the run", allow_incomplete)
    check_store_finished(store, allow_incomplete)
    manifest = store.manifest
    released = bool((config.get("source") or {}).get("release"))
    if released:   # a published SAE: its model counts by name (a local copy of the model is fine)
        from sae.interop import releases
        releases.check_store(config, manifest, store.d_model)
    differences = []
    for key in ("site", "target_site") if released else ("model", "site", "target_site"):
        if config.get(key) is not None and manifest.get(key) is not None and str(config[key]) != str(manifest[key]):
            differences.append(f"{key}: run {config[key]!r}, store {manifest[key]!r}")
    if config.get("d_in") is not None and int(config["d_in"]) != store.d_model:
        differences.append(f"d_model: run {config['d_in']}, store {store.d_model}")
    if differences:
        raise UserError("the run and the store do not match (" + "; ".join(differences) + ")")
    if layer is not None and config.get("layer") is not None and str(layer) != str(config["layer"]):
        raise UserError(f"the run was trained on layer {config['layer']}, not --layer {layer}")
    if layer is None and config.get("layer") is not None:
        if not any(str(config["layer"]) == str(known) for known in store.layers):
            raise UserError(f"the run was trained on layer {config['layer']}, the store holds layers {store.layers}")
        layer = config["layer"]
    return store.resolve_layer(layer)


def weights_digest(run_dir) -> str | None:
    """A digest of RUN/sae.safetensors (None when there is none): eval.json and analysis/meta.json record
    the weights they were computed from, so a result made stale by retraining is caught."""
    import hashlib
    path = Path(run_dir) / WEIGHTS
    if not path.is_file():
        return None
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def check_fresh(run_dir, derived: dict, what: str) -> None:
    """Refuse a result (eval.json, an analysis) recorded from other weights than the run holds now."""
    recorded = (derived or {}).get("weights_digest")
    if recorded and recorded != weights_digest(run_dir):
        raise UserError(f"{what} of {run_dir} was computed from other weights than its sae.safetensors holds now "
                        f"(retrained?): recompute it first (e.g. sae analyze --force)")
