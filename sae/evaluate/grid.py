"""A sweep's grid file (`sae sweep --grid FILE`): one entry per SAE, each with its own variant, knobs,
width and learning rate.

    - {variant: topk, k: 16, expansion: 4}
    - {variant: topk, k: 32, d_sae: 256, lr: 0.001}
    - {variant: l1, l1_coefficient: [1, 3], name: l1_sweep}   # a list: one SAE per value (the product)

YAML or JSON: a list of entries, or a mapping with the list under `grid:`. Reserved keys: `variant`,
`d_sae`, `expansion`, `lr`, `name`; every other key is a knob of the variant (dashes or underscores).
"""
from __future__ import annotations

import difflib
import itertools
import json
from pathlib import Path

from sae.errors import UserError

RESERVED = ("variant", "d_sae", "expansion", "lr", "name")


def read_grid(source) -> list:
    """The points of a grid file (a path) or of its text (JSON or YAML, as `grid:` in a --config file)."""
    import yaml
    text = str(source)
    path = Path(text)
    try:
        if text.lstrip()[:1] not in ("[", "{") and path.is_file():
            data = yaml.safe_load(path.read_text())
        elif text.lstrip()[:1] in ("[", "{"):
            data = json.loads(text) if text.lstrip()[:1] == "[" else yaml.safe_load(text)
        else:
            raise UserError(f"--grid {text}: no such file")
    except (ValueError, yaml.YAMLError) as error:
        raise UserError(f"--grid {text[:60]}: not valid YAML/JSON ({str(error).splitlines()[0]})") from None
    if isinstance(data, dict):
        data = data.get("grid")
    if not isinstance(data, list) or not data or not all(isinstance(e, dict) for e in data):
        raise UserError(f"--grid {text[:60]}: expected a list of entries, each a mapping with at least `variant`")
    return parse_entries(data)


def _positive(entry: int, key: str, value, kind):
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise UserError(f"--grid entry {entry}: {key} must be a {kind.__name__}, got {value!r}") from None
    if not value > 0:
        raise UserError(f"--grid entry {entry}: {key} must be positive, got {value}")
    return value


def parse_entries(entries: list[dict]) -> list:
    from sae import variants
    from sae.evaluate.sweep import GridPoint
    points = []
    for number, raw in enumerate(entries, 1):
        entry = {str(k).replace("-", "_"): v for k, v in raw.items()}
        if "variant" not in entry:
            raise UserError(f"--grid entry {number}: no `variant` (one of: {', '.join(variants.names())})")
        cls = variants.get(str(entry["variant"]))
        if entry.get("d_sae") is not None and entry.get("expansion") is not None:
            raise UserError(f"--grid entry {number}: give d_sae or expansion, not both")
        axes = []
        for key, value in entry.items():
            if key in RESERVED:
                continue
            if key not in cls.KNOBS:
                close = difflib.get_close_matches(key, list(cls.KNOBS) + list(RESERVED), n=3)
                raise UserError(f"--grid entry {number}: {cls.name if hasattr(cls, 'name') else entry['variant']} "
                                f"has no knob {key!r}" + (f" (did you mean: {', '.join(close)}?)" if close else
                                                          f" (it takes: {', '.join(cls.KNOBS) or 'none'})"))
            kind = cls.KNOBS[key].type
            try:
                axes.append([(key, kind(v)) for v in (value if isinstance(value, list) else [value])])
            except (TypeError, ValueError):
                raise UserError(f"--grid entry {number}: {key}={value!r} is not a {kind.__name__}") from None
        own = dict(d_sae=_positive(number, "d_sae", entry["d_sae"], int) if entry.get("d_sae") is not None else None,
                   expansion=_positive(number, "expansion", entry["expansion"], float)
                   if entry.get("expansion") is not None else None,
                   lr=_positive(number, "lr", entry["lr"], float) if entry.get("lr") is not None else None)
        combos = list(itertools.product(*axes))
        for i, combo in enumerate(combos):
            label = entry.get("name")
            if label and len(combos) > 1:
                label = f"{label}_{i}"
            points.append(GridPoint(str(entry["variant"]), dict(combo), label=label, **own))
    names = [p.name for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"--grid lists {', '.join(duplicates)} more than once (give the entries a `name`)")
    return points
