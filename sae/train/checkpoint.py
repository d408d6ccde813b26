"""Training checkpoints: safetensors + JSON, no pickles, written atomically.

RUN/checkpoints/step_000500/
    config.json, sae.safetensors      what `sae.load` opens (the SAE at that step, in raw units)
    trainer.safetensors               optimiser moments, dead-latent counters, RNG states (uint8)
    trainer.json                      step, tokens, options, optimiser hyper-parameters, RNG notes

A checkpoint is written into a hidden temporary folder and renamed into place, so a run killed at any
moment (even kill -9) leaves only complete checkpoints behind; `latest(run_dir)` picks the newest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.errors import UserError
from sae.runs import save_run
from sae.files import write_json
from sae.files import read_json, remove_stale_temporaries

CHECKPOINTS = "checkpoints"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
_NAME = re.compile(r"^step_(\d{6,})$")


def step_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints under RUN/checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / TRAINER_JSON).is_file() and (child / TRAINER_TENSORS).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def readable(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a damaged file: its headers and JSON are read, not its
    tensors), or None when it looks whole."""
    from safetensors import safe_open
    try:
        for name in ("sae.safetensors", TRAINER_TENSORS):
            with safe_open(str(path / name), framework="pt") as handle:
                list(handle.keys())
        read_json(path / TRAINER_JSON)
        read_json(path / "config.json")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types for a bad file
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"
    return None


def latest_readable(run_dir) -> Path | None:
    """The newest checkpoint that is not damaged; the damaged ones after it are named on stderr and skipped."""
    import sys
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = readable(path)
        if problem is None:
            return path
        print(f"warning: checkpoint {path.name} is damaged ({problem}); trying the one before", file=sys.stderr)
    return None


# ---- whole checkpoints --------------------------------------------------------------------
def save(run_dir, step: int, model, config_extra: dict, tensors: dict[str, torch.Tensor], meta: dict,
         keep: int = 3) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep` (0 keeps all). Returns its folder."""
    final = step_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_run(model, tmp, config_extra)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TRAINER_TENSORS))
    write_json(tmp / TRAINER_JSON, meta)
    if final.exists():  # the same step saved again (e.g. a resumed run that was already complete)
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def publish(path: Path, run_dir) -> None:
    """Make checkpoint `path` the run's current weights: RUN/sae.safetensors becomes a hard link to the
    checkpoint's file (the weights are written once per checkpoint; pruning the checkpoint later leaves
    the link's data in place), RUN/config.json a copy of its config. A file system without hard links gets
    a copy."""
    run_dir = Path(run_dir)
    for name in ("sae.safetensors", "config.json"):
        tmp = run_dir / f".{name}.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            if name == "config.json":
                raise OSError   # small: copied, so editing one never edits the other
            os.link(path / name, tmp)
        except OSError:
            shutil.copyfile(path / name, tmp)
        os.replace(tmp, run_dir / name)


def load(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict, dict]:
    """(sae weights, trainer tensors, trainer meta, config) of one checkpoint folder."""
    path = Path(path)
    try:
        weights = load_file(str(path / "sae.safetensors"))
        tensors = load_file(str(path / TRAINER_TENSORS))
        meta = read_json(path / TRAINER_JSON)
        config = read_json(path / "config.json")
        bad = sorted(name for name, tensor in weights.items() if tensor.is_floating_point()
                     and not bool(torch.isfinite(tensor).all()))
        if bad:
            raise UserError(f"its weights hold NaN or Inf ({', '.join(bad[:3])}): resume from an older checkpoint "
                            f"(delete this one) or train anew")
    except UserError as error:
        raise UserError(f"checkpoint {path} is unreadable: {error}") from None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types
        raise UserError(f"checkpoint {path} is unreadable: {error}") from None
    return weights, tensors, meta, config


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines logged after `step` (a resumed run logs them again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    from sae.files import write_atomic_bytes
    write_atomic_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())


# what a training run writes, and what is derived from its weights (replaced with them by --force)
RUN_ARTEFACTS = ("config.json", "sae.safetensors", "metrics.jsonl", "train_summary.json", "eval.json", CHECKPOINTS,
                 "analysis", "README.md", "tensorboard")


def prepare_run_dir(run_dir, resume: bool, force: bool) -> Path | None:
    """Check (and with --force clear) the output folder. Returns the checkpoint to resume from, or None.

    A missing or empty folder is fine; a non-empty one needs --resume (continue from its newest
    checkpoint; none yet: start afresh) or --force (remove the previous run's files, nothing else)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder")
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(".")] if run_dir.is_dir() else []
    remove_stale_temporaries(run_dir)            # half-written files of a killed run
    if resume:
        for stale in (run_dir / CHECKPOINTS).glob(".step_*.tmp*") if (run_dir / CHECKPOINTS).is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # a checkpoint half-written when the run was killed
        found = latest_readable(run_dir)
        if found is None and entries and not (run_dir / "config.json").is_file() \
                and not (run_dir / CHECKPOINTS).is_dir():
            raise UserError(f"--resume: {run_dir} holds no training run (no config.json or checkpoints/)")
        if found is None:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        return found
    if entries and not force:
        raise UserError(f"--out {run_dir} is not empty: pass --resume to continue that run or --force to replace it")
    others = sorted(p.name for p in entries if p.name not in RUN_ARTEFACTS)
    if force and others:
        raise UserError(f"--force replaces only a training run; {run_dir} holds other files "
                        f"({', '.join(others[:3])}): give a new or empty folder")
    if force:
        for name in RUN_ARTEFACTS:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def prepare_live_dir(out, resume: bool, force: bool, state_file: str) -> None:
    """The same rule for a live-training folder (OUT/live_state.json + OUT/layer_L/ run folders): a
    non-empty one needs --resume or --force, and --force removes only the live state and the runs' files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if entries and not (resume or force):
        raise UserError(f"{out} is not empty: pass --resume to continue it or --force to replace it")
    others = sorted(p.name for p in entries if p.name != state_file and not p.name.startswith("layer_"))
    if force and not resume and others:
        raise UserError(f"--force replaces only a live-training run; {out} holds other files "
                        f"({', '.join(others[:3])}): give a new or empty folder")
    if force and not resume:
        (out / state_file).unlink(missing_ok=True)
        for layer_dir in sorted(out.glob("layer_*")):
            if layer_dir.is_dir():
                prepare_run_dir(layer_dir, resume=False, force=True)
    out.mkdir(parents=True, exist_ok=True)


TOKENS_DEFAULT = 524_288    # TrainOptions' default --tokens: a resume that does not give --tokens keeps the run's

# options that decide what a run computes: a resumed run must be given the values it started with
RESULT_OPTIONS = ("tokens", "batch_size", "lr", "lr_warmup", "lr_decay", "beta1", "beta2", "eps", "sparsity_warmup",
                  "seed", "noise_std", "mask_prob", "dead_after_tokens", "revive_every", "init_rows", "grad_clip")


def check_resumed_options(saved_training: dict, options, run_dir) -> int | None:
    """--resume with a different --tokens, --lr, --batch-size, ... is refused in one line, never ignored.
    (Options left unset, such as --lr or --noise-std, take the run's own values.) A larger --tokens extends
    the run on purpose: returns the new budget (and says so on stderr); a smaller one is refused."""
    extended = None
    for name in RESULT_OPTIONS:
        given, started = getattr(options, name), saved_training.get(name)
        if given is None:
            continue
        if name == "tokens" and started is not None and given > started and given != TOKENS_DEFAULT:
            import sys
            print(f"--resume with --tokens {given:,} (the run started with {started:,}): extending the run; "
                  f"the learning-rate schedule is recomputed for the new budget", file=sys.stderr)
            extended = given
            continue
        if name in saved_training and given != started:
            raise UserError(f"cannot resume {run_dir}: it was started with --{name.replace('_', '-')} {started}, "
                            f"not {given}: give the options it started with (or train a new run)"
                            + (" — a larger --tokens extends it" if name == "tokens" else ""))
    return extended


def check_resumable(saved: dict, run_dir, variant, store, layer, d_sae, knobs) -> None:
    """A resumed run must train the same thing it started: same variant, store width, layer, width, knobs."""
    if saved.get("variant") != variant:
        raise UserError(f"cannot resume {run_dir}: it trains variant {saved.get('variant')}, not {variant}")
    if saved.get("d_in") != store.d_model:
        raise UserError(f"cannot resume {run_dir}: its d_in is {saved.get('d_in')}, the store's is {store.d_model}")
    if str(saved.get("layer")) != str(layer):
        raise UserError(f"cannot resume {run_dir}: it was trained on layer {saved.get('layer')}, not {layer}")
    if d_sae is not None and int(d_sae) != saved.get("d_sae"):
        raise UserError(f"cannot resume {run_dir}: its d_sae is {saved.get('d_sae')}, not {d_sae}")
    for name, value in knobs.items():
        if saved.get("knobs", {}).get(name) != value:
            raise UserError(f"cannot resume {run_dir}: it was trained with --{name.replace('_', '-')} "
                            f"{saved.get('knobs', {}).get(name)}, not {value}")
    if saved.get("store_digest") not in (None, store.digest):
        raise UserError(f"cannot resume {run_dir}: it was trained on a different store "
                        f"(digest {saved.get('store_digest')}, this store's is {store.digest})")
