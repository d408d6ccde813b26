"""Checkpoints of `--shard-latents` runs: every rank writes its own slice; a marker written last makes it whole.

RUN/checkpoints/sharded_step_000500/
    rank_00000.safetensors   that rank's W_enc/b_enc/W_dec slice, the replicated b_dec and input_scale, its Adam
                             moments and step counts, its dead-latent counters, its RNG state
    rank_00000.json          its step, latent slice [lo, hi), base learning rate, Adam's hyper-parameters
    rank_00001.*             ... one pair per rank
    complete.json            the marker, written by rank 0 once every rank's files are in place: step, world size,
                             each rank's slice, and the run's config (variant, d_in, d_sae, knobs, layer, store digest,
                             training options)

Each file is written under a temporary name, synced and renamed (sae.files), and the marker only after a barrier,
so a run killed at any moment (kill -9 included) leaves every earlier checkpoint whole; a folder without its
marker is ignored and removed on --resume. Resuming needs the world size the checkpoint records: the slices are
fixed by it. No pickles: tensors in safetensors, the rest in JSON.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.errors import UserError
from sae.files import read_json, remove_stale_temporaries, replace_durably, write_json
from sae.train import checkpoint

MARKER = "complete.json"
_NAME = re.compile(r"^sharded_step_(\d{6,})$")


def step_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / checkpoint.CHECKPOINTS / f"sharded_step_{step:06d}"


def rank_files(folder: Path, rank: int) -> tuple[Path, Path]:
    """(tensors, meta) of one rank's part."""
    return folder / f"rank_{rank:05d}.safetensors", folder / f"rank_{rank:05d}.json"


def list_complete(run_dir) -> list[tuple[int, Path]]:
    """Sharded checkpoints whose marker and every rank's files are present, oldest first."""
    root = Path(run_dir) / checkpoint.CHECKPOINTS
    found = []
    for child in root.iterdir() if root.is_dir() else []:
        match = _NAME.match(child.name)
        if match is None or not (child / MARKER).is_file():
            continue
        try:
            world = int(read_json(child / MARKER)["world_size"])
        except (UserError, KeyError, TypeError, ValueError):
            continue
        if all(path.is_file() for rank in range(world) for path in rank_files(child, rank)):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest(run_dir) -> Path | None:
    found = list_complete(run_dir)
    return found[-1][1] if found else None


def find_resumable(run_dir, world_size: int) -> Path | None:
    """The newest complete sharded checkpoint of RUN (None: start afresh), refused in one line when it was written
    by another world size or the folder holds something else. Reads only: nothing is changed here."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder")
    found = latest(run_dir)
    if found is None:
        if checkpoint.list_checkpoints(run_dir):
            raise UserError(f"cannot resume {run_dir} with --shard-latents: its checkpoints are an unsharded run's "
                            f"(resume it without --shard-latents)")
        entries = [p for p in run_dir.iterdir() if not p.name.startswith(".")] if run_dir.is_dir() else []
        if entries and not (run_dir / "config.json").is_file() and not (run_dir / checkpoint.CHECKPOINTS).is_dir():
            raise UserError(f"--resume: {run_dir} holds no training run (no config.json or checkpoints/)")
        return None
    saved = read_json(found / MARKER, "the checkpoint's marker")["world_size"]
    if int(saved) != world_size:
        raise UserError(f"cannot resume {run_dir}: its checkpoint {found.name} was written by {saved} ranks, this "
                        f"launch has {world_size}; resume it with torchrun --nproc-per-node {saved} (the latent "
                        f"slices are fixed by the world size)")
    return found


def prepare_resume(run_dir, found: Path | None) -> None:
    """Rank 0, once the resume is accepted: remove half-written files and checkpoints a killed run left, and the
    metrics logged after the checkpoint (or all of them when there is none: the run starts afresh)."""
    run_dir = Path(run_dir)
    remove_stale_temporaries(run_dir)
    complete = {path for _, path in list_complete(run_dir)}
    root = run_dir / checkpoint.CHECKPOINTS
    for child in root.iterdir() if root.is_dir() else []:
        if _NAME.match(child.name) and child not in complete:
            shutil.rmtree(child, ignore_errors=True)
    metrics = run_dir / "metrics.jsonl"
    if found is None:
        metrics.unlink(missing_ok=True)
    else:
        checkpoint.truncate_metrics(metrics, _step(found))
    run_dir.mkdir(parents=True, exist_ok=True)


def _step(folder: Path) -> int:
    return int(_NAME.match(folder.name).group(1))


def read_config(folder: Path) -> dict:
    """The run's config recorded in a checkpoint's marker (what checkpoint.check_resumable reads)."""
    return read_json(folder / MARKER, "the checkpoint's marker")["config"]


# ---- writing and reading (collectives: every rank calls them) --------------------------------
def save(run_dir, trainer, config: dict, keep: int = 3) -> Path:
    """Write checkpoint `trainer.step_count`: each rank its part, then rank 0 the marker; keep the newest `keep`
    complete ones (0 keeps all)."""
    import torch.distributed as dist
    model = trainer.model
    folder = step_dir(run_dir, trainer.step_count)
    folder.mkdir(parents=True, exist_ok=True)
    if model.rank == 0:
        (folder / MARKER).unlink(missing_ok=True)     # the same step saved again: incomplete until rewritten
    dist.barrier(group=model.group)
    tensors, meta = trainer.state_dict()
    tensor_path, meta_path = rank_files(folder, model.rank)
    tmp = tensor_path.with_name(f".{tensor_path.name}.tmp{os.getpid()}")
    save_file({name: value.detach().cpu().contiguous() for name, value in tensors.items()}, str(tmp))
    replace_durably(tmp, tensor_path)
    write_json(meta_path, meta)
    dist.barrier(group=model.group)
    if model.rank == 0:
        write_json(folder / MARKER, {"step": trainer.step_count, "world_size": model.world_size,
                                     "slices": [list(slice_) for slice_ in trainer.slices()], "config": config})
        if keep > 0:
            for _, old in list_complete(run_dir)[:-keep]:
                (old / MARKER).unlink(missing_ok=True)    # incomplete first: a kill mid-removal leaves no half
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group=model.group)
    return folder


def load_part(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of one rank's part; a damaged or non-finite one is one UserError line."""
    tensor_path, meta_path = rank_files(folder, rank)
    try:
        tensors = load_file(str(tensor_path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types
        raise UserError(f"checkpoint {folder} is unreadable: {tensor_path.name}: {error}") from None
    bad = sorted(name for name, value in tensors.items() if value.is_floating_point()
                 and not bool(torch.isfinite(value).all()))
    if bad:
        raise UserError(f"checkpoint {folder} holds NaN or Inf ({', '.join(bad[:3])}): resume from an older "
                        f"checkpoint (delete this one) or train anew")
    return tensors, read_json(meta_path, "a rank's checkpoint state")
