"""sae.render: every data string is escaped before it is wrapped in markup."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest

from sae.analyze.render import escape, histogram_svg, shade_colour, shade_tokens, value_table

EVIL = ["<script>alert(1)</script>", '<img src=x onerror="alert(2)">', "\" onmouseover=\"x", "a&b", " plain\n"]


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


def parse(markup: str) -> Collect:
    parser = Collect()
    parser.feed(markup)
    parser.close()
    return parser


def test_escape():
    assert escape("<script>") == "&lt;script&gt;"
    assert escape('a"b\'c&') == "a&quot;b&#x27;c&amp;"
    assert escape(None) == ""


def test_shade_tokens_escapes_and_shades():
    acts = [0.0, 2.0, -1.0, 0.5, 1.0]
    markup = shade_tokens(EVIL, acts, max_act=2.0, center=1)
    parsed = parse(markup)
    assert parsed.tags == ["span"] * len(EVIL)                     # no script, img or other element
    assert not any(name.startswith("on") for name, _ in parsed.attrs)
    # the text round-trips: each token shows exactly as written (line breaks made visible)
    assert "".join(parsed.text) == "".join(EVIL).replace("\n", "\u21b5")
    styles = [value for name, value in parsed.attrs if name == "style"]
    assert styles[0].endswith("0.00)") and styles[1].endswith("1.00)") and styles[3].endswith("0.25)")
    assert "rgba(40,110,255,0.50)" in styles[2]                    # negative codes in blue
    classes = [value for name, value in parsed.attrs if name == "class"]
    assert classes[1] == "tok center" and classes[0] == "tok"
    with pytest.raises(ValueError):
        shade_tokens(["a"], [1.0, 2.0], 1.0)


def test_shade_colour_handles_bad_numbers():
    assert shade_colour(float("nan"), 1.0).endswith("0.00)")
    assert shade_colour(5.0, 0.0).endswith("0.00)")
    assert shade_colour(5.0, 1.0).endswith("1.00)")


def test_histogram_and_value_table():
    edges = [0.1, 1, 10, 100, 1000]
    svg = histogram_svg([0, 3, 1, 0], edges)
    assert parse(svg).tags.count("rect") == 2                      # empty ends trimmed
    assert "no non-zero" in histogram_svg([0, 0, 0, 0], edges)
    table = value_table(EVIL[:2], [1.5, -0.5])
    parsed = parse(table)
    assert set(parsed.tags) <= {"table", "tr", "td", "code"}
    assert EVIL[0] in "".join(parsed.text) and "+1.500" in table
