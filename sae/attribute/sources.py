"""From RUN folders to what replaces each layer's MLP: transcoders (site mlp_in, target mlp_out) or SAEs at
mlp_out, one per layer, checked against the model the prompt runs through."""
from __future__ import annotations

from pathlib import Path

from sae.attribute.replacement import Part
from sae.errors import UserError


def run_folders(paths) -> list[Path]:
    """Each RUN given, or its layer_L/ runs (a live-training run of many layers)."""
    folders = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"{path} does not exist")
        if (path / "config.json").is_file():
            folders.append(path)
            continue
        children = sorted((child for child in path.glob("layer_*") if (child / "config.json").is_file()),
                          key=lambda child: child.name)
        if not children:
            raise UserError(f"{path} is not a run folder (no config.json, no layer_L/ runs inside)")
        folders += children
    return folders


def model_of(paths) -> str:
    """The model the runs were trained on (all must agree), for when --model is not given."""
    from sae.runs import read_config
    names = {str(read_config(folder).get("model")) for folder in run_folders(paths)} - {"None"}
    if len(names) != 1:
        raise UserError("the runs do not name one model (" + (", ".join(sorted(names)) or "none recorded") +
                        "): pass --model")
    return names.pop()


def load_parts(paths, loaded, model_name: str | None = None, allow_missing: bool = False,
               device="cpu") -> tuple[dict[int, Part], list[int]]:
    """{layer: Part} for the runs, and the layers left without one (their MLPs become error nodes; refused
    unless allow_missing). Every mismatch with the model is one line naming the run."""
    from sae.runs import check_finished, load, read_config
    model_name = str(model_name or loaded.name)
    parts: dict[int, Part] = {}
    for folder in run_folders(paths):
        config = read_config(folder)
        check_finished(config, str(folder))
        transcoder = bool(config.get("transcoder"))
        site, target_site = config.get("site"), config.get("target_site")
        if transcoder and (site, target_site) != ("mlp_in", "mlp_out"):
            raise UserError(f"{folder} is a transcoder from {site} to {target_site}: attribution takes transcoders "
                            "from mlp_in to mlp_out")
        if not transcoder and site != "mlp_out":
            raise UserError(f"{folder} is an SAE at site {site}: attribution takes transcoders (mlp_in -> mlp_out) "
                            "or SAEs at mlp_out")
        trained_on = config.get("model")
        if trained_on is not None and not _same_model(str(trained_on), model_name):
            raise UserError(f"{folder} was trained on model {trained_on!r}, not {model_name!r} (the prompt's model)")
        if int(config.get("d_in", -1)) != loaded.d_model:
            raise UserError(f"{folder} reads width {config.get('d_in')}, but {model_name} has d_model {loaded.d_model}")
        layer = config.get("layer")
        if not isinstance(layer, int) or not 0 <= layer < loaded.n_layers:
            raise UserError(f"{folder} is for layer {layer!r}, not one of the model's layers 0..{loaded.n_layers - 1}")
        if layer in parts:
            raise UserError(f"two runs are for layer {layer}: {parts[layer].run} and {folder}")
        module = load(folder, device=device)
        if transcoder and not getattr(module, "is_transcoder", False):
            raise UserError(f"{folder} says it is a transcoder but loads as a plain SAE: update the sae package")
        parts[layer] = Part(layer=layer, kind="transcoder" if transcoder else "sae", module=module, run=str(folder))
    missing = [layer for layer in range(loaded.n_layers) if layer not in parts]
    if missing and not allow_missing:
        listed = ", ".join(map(str, missing[:12])) + (", …" if len(missing) > 12 else "")
        raise UserError(f"no transcoder for layer{'s' if len(missing) > 1 else ''} {listed} of {model_name} "
                        f"({loaded.n_layers} layers): give runs for every layer, or pass --allow-missing to keep "
                        "those MLPs whole as error nodes")
    return parts, missing


def _same_model(recorded: str, given: str) -> bool:
    if recorded == given:
        return True
    a, b = Path(recorded).expanduser(), Path(given).expanduser()
    try:
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    except OSError:
        return False
