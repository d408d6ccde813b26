"""Files this project writes and reads: atomic writes (temporary name, fsync, rename), JSON reading with
one-line errors, the cache folder, and byte counts for people. Imports nothing of the project but errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

from sae.errors import UserError


def cache_dir() -> Path:
    """Where built kernels and converted models are kept: $SAE_CACHE, else ~/.cache/sae."""
    return Path(os.environ.get("SAE_CACHE") or Path.home() / ".cache" / "sae")


def write_atomic_bytes(path: Path, payload: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """Write JSON through a temporary file and a rename: a reader never sees half a file."""
    write_atomic_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path, what: str | None = None, missing_ok: bool = False) -> dict | None:
    """A JSON file's object; a missing (None with missing_ok), unreadable or damaged file, or one that holds
    no JSON object, is one UserError line (the dashboard shows it as the page's message)."""
    path = Path(path)
    if missing_ok and not path.exists():
        return None
    named = f"{what} ({path})" if what else str(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} is missing ({path})" if what else f"{path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{named} is not valid JSON (half-written? {error})") from None
    except OSError as error:
        raise UserError(f"cannot read {what or path}: {error}") from None
    if not isinstance(value, dict):
        raise UserError(f"{named} does not hold a JSON object")
    return value


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
