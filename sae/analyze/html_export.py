"""Static, self-contained HTML pages of an analysed run (`sae export RUN --format html OUT`).

    from sae.analyze.html_export import write_html
    write_html(RUN, OUT)      # OUT/index.html + OUT/features/<N>.html, from RUN/analysis/

No server, no JavaScript, no external resources: inline CSS and SVG only. Every string from the
data (tokens, labels, names) is escaped by sae.render before it is wrapped in markup.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from sae.errors import UserError
from sae.analyze.render import TOKEN_CSS, escape, histogram_svg, shade_tokens, value_table
from sae.files import read_json

PAGE_CSS = TOKEN_CSS + """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:1.5rem auto;padding:0 1rem;
color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #eee;font-size:.9rem}
.muted{color:#777}.val{display:inline-block;min-width:4.5rem;color:#555;font:12px ui-monospace,monospace}
.cols{display:flex;gap:2rem;flex-wrap:wrap}.stat td:first-child{color:#666}
"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{escape(title)}</title><style>{PAGE_CSS}</style></head>"
            f"<body>{body}</body></html>\n")


def _grouped(path: Path, features: set[int] | None) -> dict[int, list[dict]]:
    """A parquet table of per-feature rows as {feature: [row dicts]} (only `features` when given)."""
    if not path.is_file():
        return {}
    table = pq.read_table(path)
    if features is not None:
        mask = np.isin(table.column("feature").to_numpy(), sorted(features))
        table = table.filter(mask)
    if table.num_rows == 0:
        return {}
    order = np.argsort(table.column("feature").to_numpy(), kind="stable")
    table = table.take(order)
    ids = table.column("feature").to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    return {int(ids[s]): table.slice(s, e - s).to_pylist() for s, e in zip(starts, ends)}


def _example(row: dict, max_act: float) -> str:
    tokens, acts = row.get("tokens") or [], row.get("acts") or []
    body = shade_tokens(tokens, acts, max_act, center=row.get("center")) if tokens else \
        '<span class="muted">(no context stored)</span>'
    return f'<div class="ctx"><span class="val">{float(row["activation"]):.3g}</span>{body}</div>'


def _fmt(value, spec=".3g") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return format(value, spec)


def feature_page(feature: dict, meta: dict, top: list, interval: list, hist: dict | None, logits: dict | None,
                 summary: str) -> str:
    f = int(feature["feature"])
    max_act = float(feature.get("max_activation") or 0.0)
    label = feature.get("auto_label") or ""
    parts = [f'<p><a href="../index.html">&larr; all features</a></p>',
             f"<h1>Feature {f}{' — ' + escape(label) if label else ''}</h1>",
             f'<p class="muted">{summary}</p>']
    stats = [("density", _fmt(feature.get("density"), ".3e")), ("max activation", _fmt(max_act)),
             ("mean activation", _fmt(feature.get("mean_activation"))), ("tokens fired", _fmt(feature.get("n_fired"), "d")),
             ("top tokens", escape(", ".join(json.loads(feature.get("top_tokens") or "[]"))))]
    if feature.get("best_label") is not None:
        stats.append(("best-separated label", f'{escape(feature["best_label"])} (F1 {_fmt(feature.get("best_label_f1"), ".2f")})'))
    stat_rows = "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>" for k, v in stats)
    columns = [f'<div><table class="stat">{stat_rows}</table></div>']
    if hist is not None:
        columns.append(f"<div><h2>Activation histogram</h2>{histogram_svg(hist['counts'], meta['hist_bin_edges'])}</div>")
    parts.append(f'<div class="cols">{"".join(columns)}</div>')
    if logits is not None:
        parts.append('<h2>Logit effects</h2><div class="cols">'
                     f"<div><b>promoted</b>{value_table(logits['promoted'], logits['promoted_values'], True)}</div>"
                     f"<div><b>suppressed</b>{value_table(logits['suppressed'], logits['suppressed_values'], False)}"
                     "</div></div>")
    names = meta.get("label_names") or []
    if feature.get("label_means") is not None and names:
        rows = "".join(f"<tr><td>{escape(n)}</td><td>{_fmt(v, '.4g')}</td></tr>" for n, v in zip(names, feature["label_means"]))
        parts.append(f"<h2>Mean activation per label</h2><table>{rows}</table>")
    parts.append("<h2>Top activations</h2>")
    parts.append("".join(_example(r, max_act) for r in sorted(top, key=lambda r: r.get("rank", 0)))
                 or '<p class="muted">never fired</p>')
    if interval:
        parts.append("<h2>Examples by activation band</h2>")
        for band in sorted({int(r["band"]) for r in interval}, reverse=True):
            rows = [r for r in interval if int(r["band"]) == band]
            parts.append(f'<h3 class="muted">{_fmt(rows[0]["band_lo"])} – {_fmt(rows[0]["band_hi"])}</h3>')
            parts.append("".join(_example(r, max_act) for r in rows))
    nearest = feature.get("nearest") or []
    if nearest:
        links = ", ".join(f'<a href="{int(n)}.html">{int(n)}</a> ({_fmt(c, ".2f")})'
                          for n, c in zip(nearest, feature.get("nearest_cos") or []))
        parts.append(f"<h2>Nearest features (decoder cosine)</h2><p>{links}</p>")
    return _page(f"Feature {f}", "".join(parts))


def write_html(run_dir, out_dir, features=None, force: bool = False, log=None) -> Path:
    """Write OUT/index.html and OUT/features/<N>.html for every feature (or only `features`).

    Returns the index path. out_dir must be empty unless force is given."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    analysis = run_dir / "analysis"
    if not (analysis / "meta.json").is_file() or not (analysis / "features.parquet").is_file():
        raise UserError(f"{run_dir} has no analysis: run `sae analyze --run {run_dir} --activations STORE` first")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} is not empty: pass --force to replace it")
    meta = read_json(analysis / "meta.json", "the analysis' meta.json")
    selected = None if features is None else {int(f) for f in features}
    feature_rows = pq.read_table(analysis / "features.parquet").to_pylist()
    if selected is not None:
        feature_rows = [r for r in feature_rows if int(r["feature"]) in selected]
    top = _grouped(analysis / "top_examples.parquet", selected)
    interval = _grouped(analysis / "interval_examples.parquet", selected)
    hists = {f: rows[0] for f, rows in _grouped(analysis / "histograms.parquet", selected).items()}
    logits = {f: rows[0] for f, rows in _grouped(analysis / "logit_effects.parquet", selected).items()}
    summary = escape(f"{meta.get('variant')} SAE · {meta.get('n_features')} features · layer {meta.get('layer')} "
                     f"{meta.get('site') or ''} of {meta.get('model') or 'unknown model'} · "
                     f"{meta.get('n_tokens')} tokens analysed")
    (out_dir / "features").mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "features").glob("*.html"):   # force: pages of an earlier export go
        stale.unlink()
    for feature in tqdm(feature_rows, desc="html", unit="page", disable=None):
        f = int(feature["feature"])
        page = feature_page(feature, meta, top.get(f, []), interval.get(f, []), hists.get(f), logits.get(f), summary)
        (out_dir / "features" / f"{f}.html").write_text(page, encoding="utf-8")
    order = sorted(feature_rows, key=lambda r: -(r.get("density") or 0.0))
    rows = "".join(
        f'<tr><td><a href="features/{int(r["feature"])}.html">{int(r["feature"])}</a></td>'
        f'<td>{escape(r.get("auto_label") or "")}</td><td>{_fmt(r.get("density"), ".2e")}</td>'
        f'<td>{_fmt(r.get("max_activation"))}</td><td>{escape(r.get("best_label") or "")}</td></tr>' for r in order)
    notes = "".join(f"<li>{escape(n)}</li>" for n in meta.get("notes") or [])
    body = (f"<h1>SAE features</h1><p class=\"muted\">{summary}</p>"
            + (f"<ul class=\"muted\">{notes}</ul>" if notes else "")
            + "<table><tr><th>feature</th><th>auto label</th><th>density</th><th>max</th><th>best label</th></tr>"
            + rows + "</table>")
    index = out_dir / "index.html"
    index.write_text(_page("SAE features", body), encoding="utf-8")
    if log is not None:
        log(f"wrote {index} and {len(feature_rows)} feature pages")
    return index
