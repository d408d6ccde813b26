"""What `sae collect` settles before it loads the model or touches --out: a store that --resume would not add
a row to, a layer the model does not have; and, when it fails, the empty folder it made."""
from __future__ import annotations

from pathlib import Path

from sae import store as store_lib
from sae.files import read_json


def already_complete(out: Path, tokens: int | None) -> dict | None:
    """CollectResult's fields (n_tokens, n_shards, size_bytes, exhausted, manifest) for a finished store in `out`
    that holds --tokens rows (or the whole dataset), else None; a damaged or unfinished store is left to the
    resume path to judge."""
    from sae.errors import UserError
    try:
        manifest = read_json(Path(out) / store_lib.MANIFEST, missing_ok=True)
    except UserError:
        return None
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        return None
    progress = manifest.get("progress") or {}
    exhausted = any(isinstance(p, dict) and p.get("exhausted") for p in progress.values())
    n_tokens = int(manifest.get("n_tokens") or 0)
    if not (exhausted or (tokens is not None and n_tokens >= tokens)):
        return None
    shards = list(manifest.get("shards") or [])
    size = sum((Path(out) / name).stat().st_size for name in shards if (Path(out) / name).is_file())
    return {"n_tokens": n_tokens, "n_shards": len(shards), "size_bytes": size, "exhausted": bool(exhausted),
            "manifest": manifest}


def check_before_loading(options) -> None:
    """Refuse a layer the model does not have from its config alone (before seconds of weight loading)."""
    from sae.lm.loading import check_layers_early
    check_layers_early(options.model, options.layers)


def remove_if_left_empty(out: Path) -> None:
    """Remove `out` (made by this failed run) when it holds nothing but this tool's hidden temporaries."""
    import shutil
    out = Path(out)
    try:
        entries = list(out.iterdir())
    except OSError:
        return
    if all(entry.name.startswith(".") for entry in entries):
        shutil.rmtree(out, ignore_errors=True)
