"""`sae sweep`: train a grid of SAEs in one pass over the data, evaluate each, compare them.

Every batch is read once and given to every SAE's Trainer (the activations are the costly part).
Each SAE is an ordinary run folder, DIR/<name>/ (config.json, sae.safetensors, metrics.jsonl,
eval.json); DIR/sweep.parquet and DIR/sweep.csv hold one row per SAE, DIR/sweep.png the L0–FVU
frontier (and CE-loss recovered against L0 when the model is available), DIR/sweep.json the
sweep's own record (grid, budget, wall times).

Under torchrun the SAEs are spread across ranks: every rank reads the same batches and trains its
own subset (any number, any widths; balanced by cost). The ranks meet once, at the end, in a gloo
process group, and rank 0 writes the table. Training itself is rank-local (no process group is
active while it runs, so no gradient or statistic is reduced across ranks).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from sae.errors import UserError
from sae.evaluate import DEFAULT_TOKENS  # the default budget, defined where `sae sweep --help` can read it

MODERN = ("topk", "batchtopk", "gated", "jumprelu", "matryoshka")
CLASSIC = ("linear", "relu", "l1", "kl", "denoising", "contractive", "vae", "vq")
K_GRID = (16, 32, 64)
PENALTY_FACTORS = (4.0, 1.0, 0.25)  # × the variant's default coefficient: sparse → dense
PENALTY_KNOBS = ("l1_coefficient", "l0_coefficient", "sparsity_coefficient")
TABLE_COLUMNS = ["name", "variant", "knobs", "d_sae", "l0", "fvu", "fvu_sparse", "explained_variance", "mse",
                 "dead_fraction", "cosine_similarity", "l2_ratio", "ce_loss_recovered", "kl_div_score",
                 "ce_loss_spliced", "probe_top1", "absorption", "tpp", "train_seconds", "rank"]


@dataclass
class GridPoint:
    variant: str
    knobs: dict = field(default_factory=dict)
    d_sae: int | None = None          # a grid file's own width / learning rate (None: the sweep's)
    expansion: float | None = None
    lr: float | None = None
    label: str | None = None          # a grid file's own name for the entry

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        parts = [self.variant] + [f"{short_knob(k)}{format_value(v)}" for k, v in sorted(self.knobs.items())]
        own = (("d", self.d_sae), ("x", self.expansion), ("lr", self.lr))
        return "_".join(parts + [f"{tag}{format_value(v)}" for tag, v in own if v is not None])


def short_knob(name: str) -> str:
    return {"k": "k", "l1_coefficient": "l1c", "l0_coefficient": "l0c", "kl_coefficient": "klc",
            "sparsity_target": "rho", "contractive_coefficient": "cc", "target_l0": "t"}.get(name, name)


def format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---- the grid --------------------------------------------------------------------------------------
def default_points(variant: str) -> list[GridPoint]:
    """The modern family at k ∈ {16, 32, 64} (or three penalties around the default); classic at defaults."""
    from sae import variants
    knobs = variants.get(variant).KNOBS
    if "k" in knobs or "target_l0" in knobs:   # jumprelu: its target L0 on the same grid as k
        name = "k" if "k" in knobs else "target_l0"
        return [GridPoint(variant, {name: k if name == "k" else float(k)}) for k in K_GRID]
    if variant in MODERN:
        for penalty in PENALTY_KNOBS:
            if penalty in knobs:
                default = float(knobs[penalty].default)
                return [GridPoint(variant, {penalty: default * f}) for f in PENALTY_FACTORS]
    return [GridPoint(variant)]


def parse_grid(spec: str | None) -> list[GridPoint]:
    """`topk,l1` (each variant's default points) or `topk:k=16/32,kl:sparsity_target=0.05:kl_coefficient=1`
    (explicit points; `/` separates values, several knobs give their product). None: the default grid."""
    from sae import variants
    if not spec:
        names = [name for name in MODERN + CLASSIC if name in variants.load_all()]
        return [point for name in names for point in default_points(name)]
    points: list[GridPoint] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, *settings = item.split(":")
        cls = variants.get(name)
        if not settings:
            points.extend(default_points(name))
            continue
        axes = []
        for setting in settings:
            knob, _, values = setting.partition("=")
            knob = knob.strip().replace("-", "_")
            if knob not in cls.KNOBS:
                raise UserError(f"--variants {item}: {name} has no knob {knob!r}"
                                f" (it takes: {', '.join(cls.KNOBS) or 'none'})")
            kind = cls.KNOBS[knob].type
            try:
                axes.append([(knob, kind(v)) for v in values.split("/") if v])
            except ValueError:
                raise UserError(f"--variants {item}: {values!r} is not a list of {kind.__name__} values") from None
            if not axes[-1]:
                raise UserError(f"--variants {item}: no value given for {knob}")
        points.extend(GridPoint(name, dict(combo)) for combo in itertools.product(*axes))
    names = [p.name for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"--variants lists {', '.join(duplicates)} more than once")
    if not points:
        raise UserError("--variants names no variant")
    return points


def widths(points: list[GridPoint], d_in: int, expansion: float) -> dict[str, int]:
    """d_sae of each grid point (the variant's own default at this expansion); k must fit in it."""
    from sae import variants
    result = {}
    for point in points:
        d_sae = point.d_sae or variants.get(point.variant).default_d_sae(d_in, point.expansion or expansion)
        if "k" in point.knobs and point.knobs["k"] >= d_sae:
            raise UserError(f"{point.name}: k={point.knobs['k']} must be smaller than d_sae={d_sae}: "
                            f"raise --expansion or lower k")
        result[point.name] = d_sae
    return result


def point_seed(seed: int, name: str) -> int:
    """Each SAE's initial weights depend only on (seed, its name): not on the grid around it or the rank."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def build_models(points: list[GridPoint], d_in: int, expansion: float, seed: int = 0,
                 only: set[str] | None = None) -> dict[str, torch.nn.Module]:
    """The SAEs of the grid (those named in `only`, when given)."""
    from sae import variants
    d_saes = widths(points, d_in, expansion)
    models = {}
    for point in points:
        if only is not None and point.name not in only:
            continue
        torch.manual_seed(point_seed(seed, point.name))
        models[point.name] = variants.create(point.variant, d_in=d_in, d_sae=d_saes[point.name], **point.knobs)
    return models


def assign_ranks(costs: dict[str, int], world_size: int) -> dict[str, int]:
    """Greedy longest-first assignment by cost (d_sae × d_in), so each rank gets a similar share of work."""
    loads = [0] * world_size
    owner = {}
    for name, cost in sorted(costs.items(), key=lambda item: (-item[1], item[0])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[name] = rank
        loads[rank] += cost
    return owner


# ---- output folder -----------------------------------------------------------------------------------
def is_sweep_folder(out: Path) -> bool:
    """A folder a sweep wrote: its settings file or a run folder with a sweep entry."""
    return (out / SETTINGS).is_file() or any((p / "sweep_entry.json").is_file() for p in out.iterdir() if p.is_dir())


def prepare_out(out: Path, names: list[str], force: bool, resume: bool, store_path=None) -> None:
    """Refuse a non-empty DIR without --force/--resume, and any folder that holds the store or files a sweep did
    not write; --force removes the previous sweep's run folders and tables (and this grid's names), nothing else."""
    from sae.files import check_output_folder
    if resume and out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) \
            and not is_sweep_folder(out):
        raise UserError(f"{out} holds no sweep to resume (no {SETTINGS}): give the sweep's folder")
    check_output_folder(out, "sweep", force or resume, inputs=(store_path,), owned=is_sweep_folder)
    out.mkdir(parents=True, exist_ok=True)
    if force:
        previous = [p.name for p in out.iterdir() if (p / "sweep_entry.json").is_file()]
        for name in set(names) | set(previous):
            shutil.rmtree(out / name, ignore_errors=True)
        for table in ("sweep.parquet", "sweep.csv", "sweep.png", "sweep.json", SETTINGS):
            (out / table).unlink(missing_ok=True)


SETTINGS = "sweep_settings.json"


def check_settings(out: Path, settings: dict, resume: bool) -> None:
    """--resume finishes a sweep with the settings it started with: a different budget, width, learning rate,
    seed, layer or store is refused in one line (the finished SAEs would not be comparable)."""
    from sae.files import read_json, write_json
    path = out / SETTINGS
    old = read_json(path, missing_ok=True) if resume else None
    if old:
        differing = [key for key in settings if key in old and old[key] != settings[key]]
        if differing:
            key = differing[0]
            raise UserError(f"--resume: {out} was swept with {key} {old[key]!r}, not {settings[key]!r}: give the "
                            f"same options, or --force to start the sweep over")
    write_json(path, settings)


def is_done(run_dir: Path) -> bool:
    return (run_dir / "eval.json").is_file() and (run_dir / "sae.safetensors").is_file()


# ---- training and evaluation of one rank's share -------------------------------------------------
def train_all(models, store, layer, options, out: Path, config_extra: dict, progress: bool = True,
              lrs: dict | None = None) -> dict[str, float]:
    """One pass over the store's training batches feeds every model's Trainer (lrs: a grid entry's own
    learning rate by name). Returns seconds per model."""
    from dataclasses import replace

    from sae.train.trainer import Trainer
    if not models:
        return {}
    trainers = {name: Trainer(model, replace(options, lr=(lrs or {}).get(name) or options.lr), out / name,
                              config_extra={**config_extra, "run_name": name})
                for name, model in models.items()}
    train_rows = store.split_indices("train")
    sample_at = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(options.seed))
    sample = store.rows(layer, train_rows[sample_at[:options.init_rows]].sort().values)  # [init_rows, d_in]
    for trainer in trainers.values():
        trainer.init_from_sample(sample)
    seconds = {name: 0.0 for name in trainers}
    batches = store.train_batches(layer, options.batch_size, seed=options.seed,
                                  prefetch=4 if torch.device(options.device).type == "cuda" else 0)
    bar = tqdm(range(options.total_steps), desc=f"sweep ({len(trainers)} SAEs)", unit="step",
               disable=None if progress else True)
    for _ in bar:
        x = next(batches)  # [batch, d_in]: one read, every SAE
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(x)
            seconds[name] += time.perf_counter() - start
    batches.close()
    for name, trainer in trainers.items():
        start = time.perf_counter()
        trainer.finish()
        seconds[name] += time.perf_counter() - start
    return seconds


def evaluate_all(models, store, layer, out: Path, device, loaded, skipped: str | None, site, windows: int,
                 probe_rows: int, seed: int, progress: bool = True) -> dict[str, dict]:
    """evaluate() each model without its downstream part, then one downstream pass for all of them
    (clean and zero-ablated runs are computed once per batch and shared)."""
    from sae.evaluate.metrics import _json_safe, downstream_many, evaluate, held_out_windows, special_token_ids
    from sae.runs import read_config
    from sae.files import write_json
    results = {}
    for name, model in models.items():
        model.run_config = read_config(out / name)
        results[name] = evaluate(model.eval(), store, layer=layer, with_model=False, device=device,
                                 probe_max_rows=probe_rows, seed=seed, write=False, progress=progress)
        results[name].pop("downstream_skipped", None)
    reason = None
    if loaded is None:
        reason = skipped or "the model is not available"
    elif not getattr(loaded, "is_causal", True):
        reason = f"{loaded.family} is an encoder-only model: it has no next-token loss"
    else:
        windows_data = held_out_windows(store, special_token_ids(store, loaded), windows)
        if windows_data is None:
            reason = "no held-out windows in the store"
        else:
            downstream = downstream_many(models, loaded, site, layer, windows_data, device=device, progress=progress)
            for name in models:
                results[name].update(downstream[name])
    for name, result in results.items():
        if reason:
            result["downstream_skipped"] = reason
        results[name] = _json_safe(result)
        write_json(out / name / "eval.json", results[name])
    return results


# ---- the table and the chart -----------------------------------------------------------------------
def table_row(name: str, point: GridPoint, d_sae: int, result: dict, seconds: float | None, rank: int) -> dict:
    probing = result.get("sparse_probing") or {}
    row = {"name": name, "variant": point.variant, "knobs": json.dumps(point.knobs, sort_keys=True),
           "d_sae": int(d_sae), "probe_top1": probing.get("1"), "train_seconds": seconds, "rank": rank}
    for column in TABLE_COLUMNS:
        if column not in row:
            row[column] = result.get(column)
    return row


def write_table(rows: list[dict], out: Path):
    """DIR/sweep.parquet and DIR/sweep.csv (temporary names, then renamed)."""
    import pandas as pd
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    for column in TABLE_COLUMNS[4:]:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    for suffix, write in (("parquet", lambda df, p: df.to_parquet(p, index=False)),
                          ("csv", lambda df, p: df.to_csv(p, index=False))):
        path = out / f"sweep.{suffix}"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        write(table, tmp)
        os.replace(tmp, path)
    return table


def plot_frontier(table, path: Path) -> None:
    """L0 vs FVU, one series per variant (dense signed-code variants as a dashed level), and CE-loss
    recovered vs L0 beside it when the table has it. One legend below, shared by the panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_ce = bool(table["ce_loss_recovered"].notna().any())
    fig, axes = plt.subplots(1, 2 if with_ce else 1, figsize=(12 if with_ce else 7, 5.2), squeeze=False)
    table = table.assign(fvu_shown=table["fvu_sparse"].fillna(table["fvu"]))   # codes > τ only, where not exact zeros
    panels = [("fvu_shown", "FVU (lower is better; ◇ = of the codes above τ)")] + ([("ce_loss_recovered", "CE loss recovered")] if with_ce else [])
    palette = plt.get_cmap("tab20")
    variants = sorted(table["variant"].unique())
    style = {v: (palette(i % 20), "os^Dv<>PXh"[i % 10]) for i, v in enumerate(variants)}
    for ax, (metric, label) in zip(axes[0], panels):
        for variant in variants:
            group = table[table["variant"] == variant]
            color, marker = style[variant]
            sparse = group[group["l0"].notna() & group[metric].notna()].sort_values("l0")
            thresholded = metric == "fvu_shown" and bool(group["fvu_sparse"].notna().any())
            if len(sparse):
                ax.plot(sparse["l0"], sparse[metric], marker="D" if thresholded else marker, color=color,
                        label=f"{variant} (sparse FVU: codes ≤ τ zeroed)" if thresholded else variant)
            for value in group[group["l0"].isna() & group[metric].notna()][metric]:
                ax.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{variant} (dense codes)")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (mean firing latents per token)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_title("L0–FVU frontier")
    if with_ce:
        axes[0][1].set_title("CE loss recovered vs L0")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=min(6, len(unique)), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(unique) - 1) // 6), 1, 1))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def format_table(table) -> str:
    """The sweep's table for the terminal, sorted by variant then L0."""
    shown = table.sort_values(["variant", "l0"], na_position="last")
    columns = ["name", "d_sae", "l0", "fvu", "fvu_sparse", "dead_fraction", "ce_loss_recovered", "kl_div_score",
               "probe_top1", "absorption", "tpp", "train_seconds"]
    columns = [c for c in columns if c in shown and (c in ("name", "d_sae") or shown[c].notna().any())]
    return shown[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="n/a")


# ---- torchrun ---------------------------------------------------------------------------------------
def join_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank). Under torchrun a gloo process group is opened (long timeout: a rank
    may wait for the slowest one); in a plain process (0, 1, 0)."""
    import datetime

    from sae import distributed
    if not distributed.launched_by_torchrun():
        return 0, 1, 0
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def agree(world_size: int, rank: int, decide) -> None:
    """Rank 0 runs decide(); a UserError there is raised on every rank (no rank goes on alone)."""
    from sae import distributed
    verdict = b"ok"
    if rank == 0:
        try:
            decide()
        except UserError as error:
            verdict = b"error:" + str(error).encode()
    if world_size > 1:
        verdict = distributed.broadcast_bytes(verdict)
    if verdict != b"ok":
        raise UserError(verdict.decode().removeprefix("error:"))


def meet(world_size: int) -> None:
    """Wait for every rank: their run folders are then complete."""
    if world_size > 1:
        torch.distributed.barrier()


# ---- the whole command ------------------------------------------------------------------------------
def run_sweep(store_path, out, variants_spec: str | None = None, layer=None, tokens: int = DEFAULT_TOKENS,
              batch_size: int = 1024, expansion: float = 8.0, lr: float | None = None, seed: int = 0,
              device: str = "auto", with_model: bool = True, windows: int = 8, probe_rows: int = 50_000,
              force: bool = False, resume: bool = False, progress: bool = True, model_dtype: str = "auto",
              grid: list[GridPoint] | None = None):
    """Train, evaluate and tabulate a grid (`grid`: a grid file's points, sae.evaluate.grid; else
    variants_spec). Returns the table (pandas DataFrame) on rank 0, else None."""
    from sae.devices import resolve
    from sae.evaluate.metrics import load_store_model
    from sae.files import read_json, write_json
    from sae.train.options import TrainOptions

    from sae import distributed

    started = time.perf_counter()
    rank, world_size, local_rank = join_ranks()
    from sae.interop import open_store
    store = open_store(store_path)
    layer = store.resolve_layer(layer)
    if not bool(store.held_out_mask().any()):
        raise UserError(f"the store {store.path} has no held-out documents: the sweep could not evaluate")
    device = resolve(device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    points = grid or parse_grid(variants_spec)
    if not variants_spec and not grid:  # the default grid leaves out k values wider than a small store's dictionaries
        from sae import variants
        points = [p for p in points
                  if p.knobs.get("k", 0) < variants.get(p.variant).default_d_sae(store.d_model, expansion)]
    out = Path(out)
    d_saes = widths(points, store.d_model, expansion)
    owner = assign_ranks({name: d_sae * store.d_model for name, d_sae in d_saes.items()}, world_size)
    options = TrainOptions(tokens=tokens, batch_size=batch_size, lr=lr, seed=seed, device=str(device),
                           checkpoint_every=0, keep_checkpoints=1)     # bad values refused before the folder
    settings = {"tokens": tokens, "batch_size": batch_size, "expansion": expansion, "lr": lr, "seed": seed,
                "layer": str(layer), "store_digest": store.digest}

    def prepare():
        prepare_out(out, list(d_saes), force, resume, store.path)
        check_settings(out, settings, resume)
    agree(world_size, rank, prepare)
    mine = build_models(points, store.d_model, expansion, seed,
                        only={name for name, r in owner.items() if r == rank and not (resume and is_done(out / name))})
    for name in mine:
        shutil.rmtree(out / name, ignore_errors=True)  # an unfinished run restarts from scratch
        (out / name).mkdir(parents=True)
    config_extra = {"layer": layer, "site": store.manifest.get("site"), "model": store.manifest.get("model"),
                    "dataset": store.manifest.get("dataset"), "store": str(store.path), "store_digest": store.digest,
                    "sweep": str(out), "model_dtype": store.manifest.get("model_dtype")}
    with distributed.local():  # each rank trains its own SAEs: nothing is reduced across ranks
        seconds = train_all(mine, store, layer, options, out, config_extra, progress,
                            lrs={p.name: p.lr for p in points if p.lr})
        train_done = time.perf_counter()
        loaded, reason = None, "skipped (--no-model)"
        if with_model and not store.has_windows:
            reason = "the store has no window_tokens, so there is no model input to replay"
        elif mine and with_model:
            loaded, reason = load_store_model(store, device, model_dtype)
        site = store.manifest.get("site")
        evaluate_all(mine, store, layer, out, device, loaded, reason, site, windows, probe_rows, seed, progress)
    for name in mine:
        write_json(out / name / "sweep_entry.json", {"train_seconds": seconds.get(name), "rank": rank})
    meet(world_size)
    if rank != 0:
        distributed.teardown()
        return None
    rows = []
    for point in points:
        run_dir = out / point.name
        result = read_json(run_dir / "eval.json")
        entry = read_json(run_dir / "sweep_entry.json", missing_ok=True) or {}
        rows.append(table_row(point.name, point, d_saes[point.name], result, entry.get("train_seconds"),
                              entry.get("rank", owner[point.name])))
    table = write_table(rows, out)
    plot_frontier(table, out / "sweep.png")
    finished = time.perf_counter()
    write_json(out / "sweep.json", {
        "store": str(store.path), "store_digest": store.digest, "layer": layer, "site": site,
        "model": store.manifest.get("model"), "grid": [{"name": p.name, "variant": p.variant, "knobs": p.knobs,
                                                        "d_sae": d_saes[p.name], "lr": p.lr} for p in points],
        "tokens": tokens, "batch_size": batch_size, "expansion": expansion, "seed": seed, "world_size": world_size,
        "device": str(device), "wall_seconds": finished - started, "train_wall_seconds": train_done - started,
        "downstream_skipped": None if loaded is not None else reason, "resumed": resume})
    distributed.teardown()
    return table
