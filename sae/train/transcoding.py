"""What training a transcoder adds to training an SAE (`sae train --transcoder [--skip]`): the checks, the
module (sae.variants.transcoder.make_transcoder), and what its run's config.json records. The trainer feeds it
(input, target) pairs: Trainer.step(x_raw, y_raw), Trainer.init_from_sample(x_raw, y_raw)."""
from __future__ import annotations

from sae.errors import UserError


def check_options(transcoder: bool, skip: bool) -> None:
    if skip and not transcoder:
        raise UserError("--skip adds the skip connection of a skip transcoder: it needs --transcoder")


def check_store(store, transcoder: bool) -> None:
    """A transcoder trains on (input, target) rows: the store must hold a target site."""
    if transcoder and store.manifest.get("target_site") is None:
        raise UserError(f"--transcoder needs a store with a target site, and {store.path} has none: collect it "
                        f"with --site mlp_in --target-site mlp_out")


def check_resume(saved: dict, run_dir, transcoder: bool, skip: bool) -> None:
    """--resume continues the same kind of module: a transcoder (with or without skip) or an SAE."""
    was = (bool(saved.get("transcoder")), bool(saved.get("skip")))
    if was != (transcoder, skip):
        def kind(t, s):
            return ("a skip transcoder" if s else "a transcoder") if t else "an SAE"
        raise UserError(f"cannot resume {run_dir}: it trains {kind(*was)}, not {kind(transcoder, skip)} "
                        f"(give the same --transcoder / --skip)")


def create(cls, d_in: int, d_sae: int | None, expansion: float | None, knobs: dict, transcoder: bool, skip: bool):
    """The module to train: the variant itself, or its transcoder."""
    if not transcoder:
        return cls.create(d_in, d_sae, 8.0 if expansion is None else expansion, **knobs)
    from sae.variants.transcoder import make_transcoder
    d_sae = cls.default_d_sae(d_in, 8.0 if expansion is None else expansion) if d_sae is None else d_sae
    return make_transcoder(cls.name, d_in, d_sae, skip=skip, **knobs)


def config_extra(target_site: str | None, transcoder: bool) -> dict:
    """What a transcoder run's config.json adds to an SAE's (the module's config() adds transcoder and skip)."""
    return {"target_site": target_site} if transcoder else {}


def pair(batch) -> tuple:
    """A store batch as Trainer.step()'s arguments: (x_raw,) or a transcoder's (x_raw, y_raw)."""
    return batch if isinstance(batch, tuple) else (batch,)


def check_live(target_site: str | None, transcoder: bool, skip: bool) -> str | None:
    """Live training's checks; returns the target site to capture (None for plain SAEs)."""
    check_options(transcoder, skip)
    if transcoder and target_site is None:
        raise UserError("live --transcoder needs --target-site (e.g. --site mlp_in --target-site mlp_out)")
    if target_site is not None and not transcoder:
        raise UserError("--target-site in live training is what a transcoder predicts: add --transcoder")
    return target_site


def row_keys(layer, target_site: str | None) -> tuple:
    """The keys of a live generation's rows one layer's trainer steps on: (layer,) or (layer, "targets.<layer>")."""
    return (layer,) if target_site is None else (layer, f"targets.{layer}")
