"""Published SAEs by release name, from the registry shipped with the package (releases.json):

    sae.load("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")
    sae.load("gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_82")      # the command line's form

A release names its Hugging Face repo, where one SAE lies inside it, its format, the model, site and layer
it reads, and the widths. Only the named SAE's folder is fetched (huggingface_hub.snapshot_download), and
only when a release is named; offline, the error names the repo it needed. An unknown release or SAE id
is refused with the closest names (difflib).
"""
from __future__ import annotations

import difflib
import functools
import json
import re
from pathlib import Path

from sae.errors import UserError

REGISTRY = Path(__file__).with_name("releases.json")
FORMATS = ("gemma_scope", "saelens", "sparsify")
FILE_SUFFIXES = (".npz", ".safetensors", ".json")   # a path ending so names a file: its folder is fetched


@functools.lru_cache(maxsize=1)
def registry() -> dict:
    """{release name: entry} from releases.json."""
    try:
        return json.loads(REGISTRY.read_text())["releases"]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"the release registry {REGISTRY} is unreadable ({type(error).__name__}): "
                        f"reinstall the package") from None


def is_release(name) -> bool:
    return isinstance(name, str) and name in registry()


def parse_spec(text) -> tuple[str, str] | None:
    """'RELEASE:SAE_ID' -> (release, sae_id) when RELEASE is in the registry and no such local path exists."""
    if not isinstance(text, str) or ":" not in text or Path(text).expanduser().exists():
        return None
    release, sae_id = text.split(":", 1)
    if release in registry():
        return release, sae_id
    if re.fullmatch(r"[a-z0-9][a-z0-9.-]*", release) and "/" not in release and sae_id:
        check_release(release)   # looks like RELEASE:ID but the release is unknown: say so, with close names
    return None


def _close(word: str, options, n: int = 3) -> str:
    close = difflib.get_close_matches(word, list(options), n=n, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else ""


def check_release(release: str) -> dict:
    entries = registry()
    if release not in entries:
        raise UserError(f"unknown SAE release {release!r}{_close(release, entries)} "
                        f"({len(entries)} releases are known: see sae/interop/releases.json)")
    return entries[release]


def sae_ids(release: str) -> list[str]:
    entry = check_release(release)
    return list(entry.get("sae_ids", [])) + list(entry.get("sae_paths", {}))


def resolve(release: str, sae_id: str | None) -> dict:
    """What the registry says of one SAE: repo, path (file inside the repo), folder, format, model, site, layer,
    d_in, d_model, release, sae_id. UserError (with close matches) for an unknown release or id."""
    entry = check_release(release)
    known = sae_ids(release)
    if not sae_id:
        raise UserError(f"release {release} holds {len(known)} SAEs: name one, e.g. {release}:{known[0]}"
                        if known else f"release {release} lists no SAEs")
    sae_id = str(sae_id).strip("/")
    if sae_id not in known:
        raise UserError(f"release {release} has no SAE {sae_id!r}{_close(sae_id, known)}")
    folder = entry.get("sae_paths", {}).get(sae_id, sae_id)
    path = entry.get("path", "{path}").format(path=folder)
    layer = re.search(r"layer_(\d+)", sae_id)
    fmt = entry.get("format", "gemma_scope")
    if fmt not in FORMATS:
        raise UserError(f"release {release} has format {fmt!r}, which this version does not read")
    return {"release": release, "sae_id": sae_id, "repo": entry["repo"], "path": path,
            "folder": path.rsplit("/", 1)[0] if path.endswith(FILE_SUFFIXES) else path, "format": fmt,
            "model": entry.get("model"), "site": entry.get("site"), "layer": int(layer.group(1)) if layer else None,
            "d_in": entry.get("d_in"), "d_model": entry.get("d_model")}


def fetch(info: dict, revision: str | None = None) -> Path:
    """The SAE's folder, downloaded (only that folder) into the Hugging Face cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise UserError("loading a published SAE needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        local = Path(snapshot_download(repo_id=info["repo"], allow_patterns=[f"{info['folder']}/*"],
                                       revision=revision))
    except Exception as error:  # noqa: BLE001 - network, auth, missing repo: one line for the user
        first = str(error).splitlines()[0] if str(error) else ""
        raise UserError(f"{info['release']}:{info['sae_id']} needs the Hugging Face repo {info['repo']} "
                        f"(folder {info['folder']}), which could not be fetched: {type(error).__name__}"
                        f"{': ' + first if first else ''}") from None
    folder = local / info["folder"]
    if not folder.is_dir():
        raise UserError(f"the Hugging Face repo {info['repo']} has no folder {info['folder']} "
                        f"(the registry's entry for {info['release']}:{info['sae_id']})")
    return folder


def load_release(release: str, sae_id: str | None, device="cpu", revision: str | None = None):
    """sae.load(RELEASE, SAE_ID): the published SAE as this project's module, its run_config saying where
    it came from (model, site, layer, release, sae_id, repo)."""
    info = resolve(release, sae_id)
    folder = fetch(info, revision)
    described = {k: info[k] for k in ("release", "sae_id", "repo", "model", "site", "layer")}
    if info["format"] == "gemma_scope":
        from sae.interop.gemma_scope import load_gemma_scope
        model = load_gemma_scope(folder, device=device, release=described)
    else:
        from sae.interop import load_foreign
        model = load_foreign(folder, info["format"], device=device)
        model.run_config = {**model.run_config, **{k: v for k, v in described.items() if v is not None},
                            "source": {**model.run_config.get("source", {}), **described}}
    if info.get("d_in") is not None and int(model.d_in) != int(info["d_in"]):
        raise UserError(f"{release}:{info['sae_id']} has d_in={model.d_in}, the registry says {info['d_in']}")
    return model


def _model_key(name) -> str:
    """'google/gemma-2-2b', '/models/gemma-2-2b/' -> 'gemma-2-2b' (a local folder counts by its name)."""
    return Path(str(name).rstrip("/")).name.lower()


def check_store(config: dict, manifest: dict, d_model: int) -> None:
    """A published SAE against a store: its model and width must be the store's (one line naming both)."""
    source = config.get("source") or {}
    if not source.get("release"):
        return
    label = f"{source['release']}:{source.get('sae_id')}"
    if config.get("d_in") is not None and int(config["d_in"]) != int(d_model):
        raise UserError(f"{label} reads d_in={config['d_in']} ({config.get('model')}, {config.get('site')}) "
                        f"but the store's rows have d_model={d_model}")
    model, store_model = config.get("model"), manifest.get("model")
    if model and store_model and _model_key(model) != _model_key(store_model):
        raise UserError(f"{label} was trained on {model}, but the store holds activations of {store_model}")
