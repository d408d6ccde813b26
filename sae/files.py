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
    tmp.write_bytes(payload)
    replace_durably(tmp, path)


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path) -> None:
    """The mode a plain open() gives a new file (0666 less the umask: 0644 usually), for files that a library
    creates 0600 (safetensors' save_file does), so that other users can read shards and weights."""
    os.chmod(path, 0o666 & ~current_umask())


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file into place, its bytes on disk first (fsync), and the rename too (the
    folder's fsync), so that a crash leaves the old file or the new one, never a named but empty one.
    The file gets normal permissions (normal_permissions)."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    normal_permissions(tmp)
    os.replace(tmp, path)
    try:
        folder = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def remove_stale_temporaries(folder) -> None:
    """Remove `.NAME.tmpPID` files and folders left by a process that is gone (kill -9); a live writer's stay."""
    import re
    import shutil
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.glob(".*.tmp*"):
        match = re.search(r"\.tmp(\d+)$", path.name)
        if match is None or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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


# ---- output folders: what --force may replace, and one writer at a time -------------------------------
MARKER = ".sae-output"    # {"kind": ...}: a folder this tool wrote whole (an analysis, an export)
LOCK = ".sae-lock"        # {"pid", "host", "command"}: the process writing into a folder


def mark_output(folder, kind: str) -> None:
    """Record that `folder` is this tool's output of `kind`, so that a later --force may replace it."""
    write_json(Path(folder) / MARKER, {"kind": kind, "writer": "sae"})


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_folder(out, kind: str, force: bool, inputs=(), owned=None) -> None:
    """Refuse an output folder this command may not write or replace, in one line.

    Missing or empty: fine. Non-empty: needs `force`, and even then only a folder this tool wrote as `kind`
    (its MARKER, or `owned(out)` for outputs written before markers existed) is replaced: never a folder
    that holds anything else, and never one that is or contains an input of the command."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder: give a folder to write into")
    for source in inputs:
        if source is not None and _inside(Path(source), out):
            raise UserError(f"{out} holds this command's input {source}: give another output folder")
    entries = [p for p in out.iterdir() if p.name not in (MARKER, LOCK)] if out.is_dir() else []
    if not entries:
        return
    if not force:
        raise UserError(f"{out} is not empty: pass --force to replace it")
    try:
        marker = read_json(out / MARKER, missing_ok=True)
    except UserError:
        marker = None
    if (isinstance(marker, dict) and marker.get("kind") == kind) or (owned is not None and owned(out)):
        return
    raise UserError(f"--force replaces only a folder this tool wrote ({kind}); {out} holds other files "
                    f"({', '.join(sorted(p.name for p in entries)[:3])}{', …' if len(entries) > 3 else ''}): "
                    f"give a new or empty folder")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """`with FolderLock(out, "sae train"):` one writer at a time. A second one is refused with one line
    naming the process that holds the folder; the lock of a process that no longer runs (kill -9) is stale
    and taken over. The lock file is created with O_EXCL, so two starting writers cannot both win."""

    def __init__(self, folder, command: str, name: str = LOCK):
        self.path = Path(folder) / name
        self.command = command
        self.held = False

    def __enter__(self) -> "FolderLock":
        import socket
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {folder} is a file, not a folder")
        self.created = not folder.exists()      # removed again if the command writes nothing
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot write to --out {folder}: {error.strerror or error}") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not holder:                     # being written by a starting writer, or damaged: look again
                    import time
                    time.sleep(0.2)
                    holder = self._holder()
                pid = holder.get("pid")
                stale = isinstance(pid, int) and holder.get("host") in (None, me["host"]) and (
                    pid == os.getpid() or not _process_alive(pid))
                if not holder or stale:            # its process is gone (or it never said who it was)
                    self.path.unlink(missing_ok=True)
                    continue
                raise UserError(f"{self.path.parent} is in use by {holder.get('command', 'another sae command')} "
                                f"(process {holder.get('pid')} on {holder.get('host')}); wait for it to end, or "
                                f"delete {self.path} if that process is gone")
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(me))
            self.held = True
            return self
        raise UserError(f"could not lock {self.path.parent}: another writer keeps taking it")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def __exit__(self, *exc) -> bool:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created:
                try:
                    self.path.parent.rmdir()                  # only if still empty
                except OSError:
                    pass
        return False
