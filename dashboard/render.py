"""HTML for shaded text: every string from the data is escaped first, then wrapped in spans.

Nothing here trusts its input: token strings, labels and typed text all go through `escape`, so a
corpus holding `<script>` or `<img onerror=…>` shows them as text. The result is passed to st.html
(which sanitises again with DOMPurify); no JavaScript is ever emitted.
"""
from __future__ import annotations

import re
from typing import Sequence

from sae.analyze import render as shared
from sae.analyze.render import escape  # noqa: F401 - the one escaping function, shared with the HTML export

STYLE = "<style>" + shared.TOKEN_CSS + """
.sae-ex {font-size: 0.85rem; margin: 0 0 0.3rem 0; padding: 0.1rem 0.4rem; border-left: 3px solid #ddd;}
.sae-val {display: inline-block; min-width: 4.2rem; color: #666; font-size: 0.75rem;
          font-family: ui-monospace, Menlo, monospace;}
.sae-chip {display: inline-block; font-family: ui-monospace, monospace; font-size: 0.8rem; margin: 2px;
           padding: 1px 6px; border-radius: 4px; white-space: pre;}
.sae-chip-val {margin-left: 0.35rem; color: #333; font-size: 0.7rem;}
.sae-links a {margin-right: 0.8rem;}
</style>"""


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def md(text) -> str:
    """Data text for Streamlit's markdown (titles, captions): every markdown character backslash-escaped,
    so a label such as `[x](javascript:…)` or `**` shows literally."""
    return _MARKDOWN.sub(r"\\\1", "" if text is None else str(text)).replace("\n", " ")


def shade_tokens(tokens: Sequence[str], values: Sequence[float], scale: float | None = None,
                 center: int | None = None, titles: Sequence[str] | None = None,
                 prefix: str | None = None, palette=shared.ACTIVATION_PALETTE) -> str:
    """One example as a <div class="ctx sae-ex">: each token escaped (sae.render), shaded by its value,
    with a hover title (the value, or titles[i]).

    tokens: decoded token strings; values: one number per token; scale: the value at full colour
    (default: max |value|); center: index of the token the example is about (outlined);
    prefix: plain text shown before the tokens (e.g. the example's activation); palette: the colours
    (shared.LOSS_PALETTE for loss effects).
    """
    values = [shared.finite(v) for v in values]
    if len(values) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} values")
    if scale is None or not scale > 0:
        scale = max((abs(v) for v in values), default=0.0)
    head = f'<span class="sae-val">{escape(prefix)}</span>' if prefix is not None else ""
    body = shared.shade_tokens(tokens, values, scale, center=center, titles=titles, palette=palette)
    return f'<div class="ctx sae-ex">{head}{body}</div>'


def chips(tokens: Sequence[str], values: Sequence[float], positive: bool = True) -> str:
    """Promoted (green) or suppressed (red) tokens, each followed by its logit effect; spaces, line breaks
    and whitespace-only tokens made visible (shared.token_label)."""
    rgb = "0,160,60" if positive else "220,40,40"
    values = [shared.finite(v) for v in values]
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    spans = [f'<span class="sae-chip" style="background:rgba({rgb},{0.15 + 0.6 * abs(v) / scale:.3f})" '
             f'title="{escape(repr(str(t)))} {v:+.4g}">{shared.token_label(t)}'
             f'<span class="sae-chip-val">{v:+.3g}</span></span>' for t, v in zip(tokens, values)]
    return "<div>" + "".join(spans) + "</div>"


def token_list(value) -> str:
    """features.parquet's top_tokens (a JSON list of strings) as plain text: `␣the · ␣a · ↵`."""
    import html
    import json
    try:
        tokens = json.loads(value) if isinstance(value, str) else list(value or [])
    except ValueError:
        return str(value)
    if not isinstance(tokens, list):
        return str(value)
    return " \u00b7 ".join(html.unescape(shared.token_label(t)) for t in tokens)


def number(value) -> str:
    """A figure for a table: 4 significant digits, thousands separated; text stays text; None is blank."""
    if value is None or isinstance(value, bool):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return ""
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def feature_href(feature: int, run: int = 0, page: str | None = None) -> str:
    """A relative link that opens a feature (same tab, shareable)."""
    query = f"?feature={int(feature)}"
    if run:
        query += f"&run={int(run)}"
    if page:
        query += f"&page={page}"
    return query


def feature_links(features: Sequence[int], labels: Sequence[str], run: int = 0) -> str:
    """Links to features, each followed by an (escaped) label, e.g. the decoder cosine."""
    links = [f'<div><a href="{feature_href(f, run)}" target="_self">#{int(f)}</a>'
             f'<span style="color:#666"> {escape(label)}</span></div>' for f, label in zip(features, labels)]
    return '<div class="sae-links">' + "".join(links) + "</div>"
