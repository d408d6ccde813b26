"""Static, self-contained HTML pages of an analysed run (`sae export RUN --format html OUT`).

    from sae.analyze.html_export import write_html
    write_html(RUN, OUT)      # OUT/index.html, OUT/style.css, OUT/features/<N>.html, from RUN/analysis/

No server and nothing outside OUT: one shared stylesheet (style.css), inline SVG; feature pages have no
JavaScript, the index one small fixed script (filter and sort its table). Pages stay small: a context
token that does not fire is bare text, a firing one a span whose shade is one of ten shared classes
(not an inline style), so 4,608 features take tens of MB, not hundreds. Every string from the data
(tokens, labels, names) is escaped by sae.analyze.render before it is wrapped in markup.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sae.errors import UserError
from sae.analyze.render import (ACTIVATION_PALETTE, TOKEN_CSS, escape, finite, histogram_svg, token_label,
                                value_table, visible_token)
from sae.files import read_json
from sae.progress import progress_bar

LEVELS = 10          # shading steps: |act| / max rounded to tenths
STYLESHEET = "style.css"
PAGE_CSS = TOKEN_CSS + """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:1.5rem auto;padding:0 1rem;
color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #eee;font-size:.9rem}
.muted{color:#777}.val{display:inline-block;min-width:4.5rem;color:#555;font:12px ui-monospace,monospace}
.cols{display:flex;gap:2rem;flex-wrap:wrap}.stat td:first-child{color:#666}
.ctx{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem}
.ctx span{border-radius:2px}.ctx .c{outline:1.5px solid #222;font-weight:bold}
th{cursor:pointer;user-select:none}#q{width:22rem;padding:4px 6px;margin:.5rem 0}
.vals td:last-child{color:var(--v);text-align:right}
""" + "".join(f".p{i}{{background:rgba({ACTIVATION_PALETTE[0][0]},{ACTIVATION_PALETTE[0][1]},{ACTIVATION_PALETTE[0][2]},"
              f"{i / LEVELS:.1f})}}.q{i}{{background:rgba({ACTIVATION_PALETTE[1][0]},{ACTIVATION_PALETTE[1][1]},"
              f"{ACTIVATION_PALETTE[1][2]},{i / LEVELS:.1f})}}" for i in range(1, LEVELS + 1)) + "\n"

# the index's one script: filter rows by the text box, sort by a clicked header (numbers by data-v)
INDEX_JS = """
const q=document.getElementById('q'),t=document.getElementById('f'),b=t.tBodies[0],n=document.getElementById('n');
function count(){n.textContent=[...b.rows].filter(r=>!r.hidden).length+' shown';}
q.addEventListener('input',()=>{const s=q.value.toLowerCase();
  for(const r of b.rows)r.hidden=!!s&&!r.textContent.toLowerCase().includes(s);count();});
t.tHead.addEventListener('click',e=>{const h=e.target.closest('th');if(!h)return;
  const i=h.cellIndex,num='v'in h.dataset,d=h.dataset.d=h.dataset.d==='1'?'-1':'1';
  const key=c=>num?parseFloat(c.dataset.v):c.textContent;
  const rows=[...b.rows].sort((x,y)=>{const a=key(x.cells[i]),c=key(y.cells[i]);
    return (num?a-c:a.localeCompare(c))*d;});b.append(...rows);});
count();
"""


def _page(title: str, body: str, css: str = STYLESHEET, script: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{escape(title)}</title><link rel="stylesheet" href="{css}"></head>'
            f"<body>{body}{f'<script>{script}</script>' if script else ''}</body></html>\n")


def compact_tokens(tokens, acts, max_act: float, center=None) -> str:
    """An example's tokens: bare escaped text where the code is 0, else a span with a shared shade class
    (p1..p10 above 0, q1..q10 below) and the value on hover; the ranked token outlined (class c)."""
    top = abs(finite(max_act))
    parts = []
    for i, (token, act) in enumerate(zip(tokens, acts)):
        value, text = finite(act), visible_token(token)
        level = 0 if top <= 0 else min(LEVELS, int(round(abs(value) / top * LEVELS)))
        classes = ([("p" if value >= 0 else "q") + str(level)] if level else []) + (["c"] if i == center else [])
        if value == 0 and not classes:
            parts.append(text)
            continue
        title = f' title="{value:.3g}"' if value != 0 else ""
        parts.append(f'<span class="{" ".join(classes)}"{title}>{text}</span>')
    return "".join(parts)


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
    body = compact_tokens(tokens, acts, max_act, center=row.get("center")) if tokens else \
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
    parts = ['<p><a href="../index.html">&larr; all features</a></p>',
             f"<h1>Feature {f}{' — ' + escape(label) if label else ''}</h1>",
             f'<p class="muted">{summary}</p>']
    stats = [("density", _fmt(feature.get("density"), ".3e")), ("max activation", _fmt(max_act)),
             ("mean activation", _fmt(feature.get("mean_activation"))), ("tokens fired", _fmt(feature.get("n_fired"), "d")),
             ("top tokens", " \u00b7 ".join(token_label(t) for t in json.loads(feature.get("top_tokens") or "[]")))]
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
    return _page(f"Feature {f}", "".join(parts), css=f"../{STYLESHEET}")


def _number_cell(value, spec: str) -> str:
    number = finite(value)
    return f'<td data-v="{number!r}">{_fmt(value, spec)}</td>'


def index_body(feature_rows: list, summary: str, notes: list) -> str:
    """The index: a filter box and a table (densest first) that sorts on a header click; all data escaped."""
    order = sorted(feature_rows, key=lambda r: -(r.get("density") or 0.0))
    rows = "".join(
        f'<tr><td data-v="{int(r["feature"])}"><a href="features/{int(r["feature"])}.html">{int(r["feature"])}</a></td>'
        f'<td>{escape(r.get("auto_label") or "")}</td>'
        f'<td>{" ".join(token_label(t) for t in json.loads(r.get("top_tokens") or "[]"))}</td>'
        + _number_cell(r.get("density"), ".2e") + _number_cell(r.get("max_activation"), ".3g")
        + f'<td>{escape(r.get("best_label") or "")}</td></tr>' for r in order)
    notes_html = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return (f"<h1>SAE features</h1><p class=\"muted\">{summary}</p>"
            + (f"<ul class=\"muted\">{notes_html}</ul>" if notes_html else "")
            + '<input id="q" type="search" placeholder="filter by label or token…" aria-label="filter">'
            + ' <span id="n" class="muted"></span>'
            + '<table id="f"><thead><tr><th data-v>feature</th><th>auto label</th><th>top tokens</th>'
            + "<th data-v>density</th><th data-v>max</th><th>best label</th></tr></thead><tbody>"
            + rows + "</tbody></table><p class=\"muted\">Click a header to sort.</p>")


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
    for feature in progress_bar(iterable=feature_rows, desc="html", unit="page"):
        f = int(feature["feature"])
        page = feature_page(feature, meta, top.get(f, []), interval.get(f, []), hists.get(f), logits.get(f), summary)
        (out_dir / "features" / f"{f}.html").write_text(page, encoding="utf-8")
    (out_dir / STYLESHEET).write_text(PAGE_CSS, encoding="utf-8")
    body = index_body(feature_rows, summary, meta.get("notes") or [])
    index = out_dir / "index.html"
    index.write_text(_page("SAE features", body, script=INDEX_JS), encoding="utf-8")
    if log is not None:
        log(f"wrote {index} and {len(feature_rows)} feature pages")
    return index
