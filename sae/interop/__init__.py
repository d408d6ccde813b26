"""Other tools' layouts, in and out: SAELens, sparsify and Gemma Scope SAE folders, Hugging Face Hub repos
of either, published SAEs by release name (releases.py, registry releases.json), and SAELens activation
caches.

    sae.load("path/to/saelens_folder")                        # cfg.json + sae_weights.safetensors
    sae.load("path/to/sparsify_folder")                       # cfg.json + sae.safetensors
    sae.load("path/to/gemma_scope_folder")                    # params.npz (gemma_scope.py)
    sae.load("org/repo", subfolder="blocks.8.hook_resid_pre") # a Hub release (huggingface_hub)
    sae.load("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")   # by release name
    store = open_store(PATH)    # an ActivationStore, or a SAELens activation cache read lazily

Each foreign SAE comes back as an instance of this project's registered variant that computes the
same function (SAELens "standard" -> l1, "topk" -> topk, "gated" -> gated, "jumprelu" -> jumprelu;
sparsify -> topk; Gemma Scope -> jumprelu), with `run_config` describing it, so analysis and the dashboard work on it.
Nothing here reads a pickle.
"""
from __future__ import annotations

import re
from pathlib import Path

from sae.errors import UserError

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


def detect_format(path) -> str | None:
    """'run' (this project), 'saelens', 'sparsify', 'gemma_scope', 'saelens_cache', or None for an unknown folder."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "config.json").is_file() and (path / "sae.safetensors").is_file():
        return "run"
    if (path / "cfg.json").is_file():
        if (path / "sae_weights.safetensors").is_file():
            return "saelens"
        if (path / "sae.safetensors").is_file():
            return "sparsify"
    if (path / "params.npz").is_file():
        return "gemma_scope"
    from sae.interop.saelens_cache import is_saelens_cache
    if is_saelens_cache(path):
        return "saelens_cache"
    return None


def looks_like_hub_id(text: str) -> bool:
    """'org/name' (no leading ./, /, ~, no backslash, exactly one slash)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith((".", "~"))


def fetch_hub(repo_id: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """Download a Hub repo (only `subfolder/*` when given) with huggingface_hub; return the local folder
    that holds the SAE (the snapshot's subfolder when given)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise UserError("loading from the Hugging Face Hub needs huggingface_hub (pip install huggingface_hub)")
    subfolder = subfolder.strip("/") if subfolder else None
    # a release repo holds many SAEs (one folder each): without a subfolder fetch only the root's files
    patterns = [f"{subfolder}/*"] if subfolder else list(ROOT_FILES)
    try:
        local = Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns, revision=revision))
    except Exception as error:  # network, auth, missing repo: one line for the user
        raise UserError(f"could not fetch {repo_id!r} from the Hugging Face Hub: "
                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    folder = local / subfolder if subfolder else local
    if not folder.is_dir():
        raise UserError(f"{repo_id} has no folder {subfolder!r}")
    if not subfolder and detect_format(folder) is None:
        raise UserError(f"{repo_id} holds no SAE at its root; name one with subfolder=, e.g. "
                        f"{', '.join(_hub_sae_folders(repo_id, revision)) or 'blocks.8.hook_resid_pre'}")
    return folder


# what a single-SAE repo holds at its root (this project's run folder, SAELens, sparsify)
ROOT_FILES = ("config.json", "sae.safetensors", "cfg.json", "sae_weights.safetensors", "sparsity.safetensors",
              "README.md", "eval.json", "metrics.jsonl", "analysis/*")


def _hub_sae_folders(repo_id: str, revision: str | None) -> list[str]:
    """Folders of a Hub repo that hold an SAE config (best effort: [] when the listing fails)."""
    try:
        from huggingface_hub import list_repo_files
        files = list_repo_files(repo_id, revision=revision)
    except Exception:
        return []
    folders = {f.rsplit("/", 1)[0] for f in files if "/" in f and f.rsplit("/", 1)[1] in ("cfg.json", "config.json")}
    return sorted(folders)[:4]


def _subfolders_with_sae(path: Path) -> list[str]:
    """SAE folders one or two levels below `path` (a release repo, a multi-layer run)."""
    found = {p.parent for pattern in ("*/cfg.json", "*/*/cfg.json", "*/config.json", "*/*/config.json",
                                      "*/params.npz", "*/*/params.npz", "*/*/*/params.npz")
             for p in path.glob(pattern) if detect_format(p.parent) in ("run", "saelens", "sparsify", "gemma_scope")}
    return sorted(str(p.relative_to(path)) for p in found)[:8]


def locate(path, subfolder: str | None = None, revision: str | None = None) -> tuple[Path, str | None]:
    """(local folder, its format) for what sae.load was given: a folder, a folder's subfolder, or a Hub id
    (fetched). The format is one of detect_format's; None only for a folder that holds no SAE we know."""
    path_str = str(path)
    local = Path(path_str).expanduser()
    if not local.exists():
        if looks_like_hub_id(path_str):
            local = fetch_hub(path_str, subfolder, revision)
            subfolder = None
        else:
            raise UserError(f"{path_str} does not exist (nor is it a Hub id like org/name)")
    if subfolder:
        local = local / subfolder
        if not local.is_dir():
            raise UserError(f"{path_str} has no subfolder {subfolder!r}")
    if local.is_file():
        _refuse_file(local)
    return local, detect_format(local)


def load_foreign(local: Path, kind: str | None, device="cpu"):
    """Open an SAE folder saved by another tool (kind from `locate`) as this project's module."""
    if kind == "saelens":
        from sae.interop.saelens import load_saelens
        return load_saelens(local, device=device)
    if kind == "sparsify":
        from sae.interop.sparsify import load_sparsify
        return load_sparsify(local, device=device)
    if kind == "gemma_scope":
        from sae.interop.gemma_scope import load_gemma_scope
        return load_gemma_scope(local, device=device)
    if kind == "saelens_cache":
        raise UserError(f"{local} is a SAELens activation cache, not an SAE: pass it to --activations")
    pickles = [p.name for p in local.iterdir() if p.suffix in PICKLE_SUFFIXES] if local.is_dir() else []
    if pickles:
        _refuse_file(local / pickles[0])
    inside = _subfolders_with_sae(local) if local.is_dir() else []
    if inside:
        raise UserError(f"{local} holds several SAEs; pick one with subfolder=, e.g. {', '.join(inside[:4])}")
    raise UserError(f"{local} is not an SAE folder this tool knows (this project's config.json + sae.safetensors, "
                    f"SAELens cfg.json + sae_weights.safetensors, sparsify cfg.json + sae.safetensors, or "
                    f"Gemma Scope params.npz)")


def _refuse_file(path: Path):
    if path.suffix in PICKLE_SUFFIXES:
        owner = " (dictionary_learning's format)" if path.name == "ae.pt" else ""
        raise UserError(f"{path.name}{owner} is a pickle, which can run arbitrary code when loaded; this tool "
                        f"only reads safetensors: convert it with its own library (load, then save the tensors "
                        f"with safetensors) first")
    raise UserError(f"{path} is a file; sae.load takes a folder")


def describe(path) -> dict | None:
    """A config.json-like dict for a foreign SAE folder (what analysis and the dashboard read), or None."""
    kind = detect_format(path)
    if kind == "saelens":
        from sae.interop.saelens import describe_saelens
        return describe_saelens(Path(path))
    if kind == "sparsify":
        from sae.interop.sparsify import describe_sparsify
        return describe_sparsify(Path(path))
    if kind == "gemma_scope":
        from sae.interop.gemma_scope import describe_gemma_scope
        return describe_gemma_scope(Path(path))
    return None


def open_store(path):
    """An activation store for `sae train --activations`: this project's store, or a SAELens
    activation cache (a `datasets` folder saved with save_to_disk) read lazily through Arrow."""
    from sae.interop.saelens_cache import SAELensCacheStore, is_saelens_cache
    from sae.store import MANIFEST, ActivationStore
    path = Path(path)
    if (path / MANIFEST).is_file():
        return ActivationStore(path)
    if is_saelens_cache(path):
        return SAELensCacheStore(path)
    if not path.exists():
        raise UserError(f"the store {path} does not exist")
    raise UserError(f"{path} is not an activation store (no {MANIFEST}) nor a SAELens activation cache")

