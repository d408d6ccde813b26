"""HTML rendering helpers shared by the static export and the dashboard.

Every data string (token text, labels, feature names) is HTML-escaped FIRST, then wrapped in markup
that this module writes itself, so a token such as `<script>` shows as text and never runs.

    from sae.analyze.render import escape, shade_tokens
    html = shade_tokens(tokens, acts, max_act, center=10)
"""
from __future__ import annotations

import html
import math
from typing import Sequence

# shading colours (r, g, b): positive codes orange, negative codes blue (signed variants)
POSITIVE_RGB = (255, 120, 0)
NEGATIVE_RGB = (40, 110, 255)
ACTIVATION_PALETTE = (POSITIVE_RGB, NEGATIVE_RGB)
# the loss effect of removing a feature: green where the feature helped (loss rises without it), purple
# where it hurt; never the activation colours, so the two shadings cannot be confused
LOSS_PALETTE = ((0, 160, 80), (150, 60, 210))

TOKEN_CSS = """
.tok{white-space:pre;border-radius:2px;padding:0 1px;font-family:ui-monospace,Menlo,Consolas,monospace}
.tok.center{outline:1.5px solid #222;font-weight:bold}
.ctx{line-height:1.9;margin:2px 0;overflow-wrap:anywhere}
"""


def escape(text) -> str:
    """HTML-escape any value (quotes included), for element text and attribute values alike."""
    return html.escape("" if text is None else str(text), quote=True)


def visible_token(token) -> str:
    """A token's text with line breaks and tabs made visible, escaped."""
    text = "" if token is None else str(token)
    text = text.replace("\r", "\\r").replace("\n", "\u21b5").replace("\t", "\u21e5")
    return escape(text)


def token_label(token) -> str:
    """A token shown on its own (a chip, a list): spaces as ␣, line breaks and tabs as arrows, the empty
    token as ∅, so that ' the', 'the' and a whitespace-only token look different; escaped."""
    text = "" if token is None else str(token)
    if text == "":
        return "∅"
    text = text.replace(" ", "␣").replace("\r", "\\r").replace("\n", "↵").replace("\t", "⇥")
    return escape(text)


def finite(value) -> float:
    """float(value), or 0.0 where it is not a finite number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def shade_colour(act: float, max_act: float, palette=ACTIVATION_PALETTE) -> str:
    """CSS background colour for one value: opacity |act| / max_act, palette[0] above 0, palette[1] below
    (activations: orange / blue; LOSS_PALETTE for loss effects)."""
    act, max_act = finite(act), abs(finite(max_act))
    strength = 0.0 if max_act <= 0 else min(1.0, abs(act) / max_act)
    r, g, b = palette[0] if act >= 0 else palette[1]
    return f"rgba({r},{g},{b},{strength:.2f})"


def shade_tokens(tokens: Sequence, acts: Sequence, max_act: float, center: int | None = None,
                 show_values: bool = True, css_class: str = "tok", titles: Sequence | None = None,
                 palette=ACTIVATION_PALETTE) -> str:
    """Tokens as <span>s shaded by activation. tokens and acts have the same length.

    tokens: decoded token strings (escaped here); acts: this feature's code on each token;
    max_act: the activation that gets full colour (the feature's max); center: index to outline.
    show_values adds a hover title with the code; titles (escaped here) replace those hover texts.
    """
    if len(tokens) != len(acts):
        raise ValueError(f"{len(tokens)} tokens but {len(acts)} activations")
    pieces = []
    for i, (token, act) in enumerate(zip(tokens, acts)):
        value = finite(act)
        classes = css_class + (" center" if center is not None and i == center else "")
        title = f' title="{escape(titles[i])}"' if titles is not None else \
            (f' title="{value:.3g}"' if show_values else "")
        pieces.append(f'<span class="{classes}" style="background:{shade_colour(value, max_act, palette)}"{title}>'
                      f"{visible_token(token)}</span>")
    return "".join(pieces)


def histogram_svg(counts: Sequence[int], edges: Sequence[float], width: int = 420, height: int = 110,
                  colour: str = "#e8772e") -> str:
    """An inline SVG bar chart of counts over log-spaced bins (edges has len(counts) + 1 values).

    Empty leading and trailing bins are trimmed; the x axis is labelled with the edge values."""
    counts = [int(c) for c in counts]
    nonzero = [i for i, c in enumerate(counts) if c > 0]
    if not nonzero:
        return '<p class="muted">no non-zero activations</p>'
    lo, hi = nonzero[0], nonzero[-1] + 1
    shown, peak = counts[lo:hi], max(counts[lo:hi])
    bar_w = width / len(shown)
    plot_h = height - 18
    bars = []
    for i, count in enumerate(shown):
        bar_h = plot_h * count / peak
        left, right = float(edges[lo + i]), float(edges[lo + i + 1])
        bars.append(f'<rect x="{i * bar_w:.1f}" y="{plot_h - bar_h:.1f}" width="{max(bar_w - 1, 0.5):.1f}" '
                    f'height="{bar_h:.1f}" fill="{escape(colour)}"><title>{left:.3g}\u2013{right:.3g}: {count}'
                    f"</title></rect>")
    labels = (f'<text x="0" y="{height - 3}" font-size="10">{float(edges[lo]):.3g}</text>'
              f'<text x="{width}" y="{height - 3}" font-size="10" text-anchor="end">{float(edges[hi]):.3g}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="activation histogram">{"".join(bars)}{labels}</svg>')


def value_table(tokens: Sequence, values: Sequence[float], positive: bool = True) -> str:
    """A two-column table of (token, value), e.g. promoted or suppressed logits; all text escaped."""
    colour = "#1a7f37" if positive else "#c4302b"          # one rule for the table, not a style per cell
    rows = "".join(f'<tr><td><code class="tok">{token_label(t)}</code></td><td>{finite(v):+.3f}</td></tr>'
                   for t, v in zip(tokens, values))
    return f'<table class="vals" style="--v:{colour}">{rows}</table>'
