"""Static HTML export: an index and one page per feature, all data escaped."""
from __future__ import annotations


import pandas as pd
import pytest

import sae.analyze.tables as tables
from sae.analyze.pipeline import AnalyzeOptions, analyze
from sae.errors import UserError
from sae.analyze.html_export import INDEX_JS, write_html
from test_analyze import make_run, make_window_store
from test_render import parse

EVIL = {0: "<script>alert(1)</script>", 1: '<img src=x onerror="alert(2)">', 2: "</div><b>"}
ALLOWED = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "a", "div", "span", "table",
           "tr", "td", "th", "b", "code", "ul", "li", "svg", "rect", "text", "link", "thead", "tbody", "input"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    store = make_window_store(root / "store", n_shards=1, windows_per_shard=10)
    manifest = store.manifest
    manifest["label_names"] = ['<script>alert("label")</script>', "sport", "tech"]
    (root / "store" / "manifest.json").write_text(__import__("json").dumps(manifest))
    make_run(root / "run", d_sae=12, bias=-0.8)
    patch = pytest.MonkeyPatch()
    patch.setattr(tables, "token_strings",
                  lambda tokenizer, ids: {int(i): EVIL.get(int(i) % 5, f"tok{int(i)}") for i in ids})
    try:
        analyze(root / "run", root / "store", options=AnalyzeOptions(n_top=4, context_radius=3, with_model=False),
                log=None)
    finally:
        patch.undo()
    index = write_html(root / "run", root / "out")
    return root, index


def test_index_and_pages_written(exported):
    root, index = exported
    assert index == root / "out" / "index.html"
    pages = sorted((root / "out" / "features").glob("*.html"))
    assert len(pages) == 12
    links = [value for name, value in parse(index.read_text()).attrs if name == "href"]
    assert sorted(links) == sorted([f"features/{p.name}" for p in pages] + ["style.css"])
    features = pd.read_parquet(root / "run" / "analysis" / "features.parquet")
    alive = int(features[features.n_fired > 0].feature.iloc[0])
    page = (root / "out" / "features" / f"{alive}.html").read_text()
    assert "Top activations" in page and "<svg" in page and page.count('class="ctx"') >= 1


def test_no_unescaped_data(exported):
    root, _ = exported
    seen_evil = set()
    for path in [root / "out" / "index.html", *(root / "out" / "features").glob("*.html")]:
        markup = path.read_text()
        if path.name == "index.html":      # its one script is the fixed filter/sort code, not data
            assert markup.count("<script") == 1 and f"<script>{INDEX_JS}</script>" in markup
            markup = markup.replace(f"<script>{INDEX_JS}</script>", "")
        parsed = parse(markup)
        assert set(parsed.tags) <= ALLOWED, (path, set(parsed.tags) - ALLOWED)
        assert not any(name.startswith("on") for name, _ in parsed.attrs)
        assert "<script" not in markup.lower() and "<img" not in markup.lower()
        text = "".join(parsed.text)
        seen_evil |= {name for name in (*EVIL.values(), '<script>alert("label")</script>') if name in text}
    # the hostile strings are shown as text (so the test really fed them through)
    assert EVIL[0] in seen_evil and EVIL[1] in seen_evil


def test_refuses_non_empty_output_and_missing_analysis(exported, tmp_path):
    root, _ = exported
    with pytest.raises(UserError, match="not empty"):
        write_html(root / "run", root / "out")
    write_html(root / "run", root / "out2", features=[0, 1])
    assert sorted(p.name for p in (root / "out2" / "features").iterdir()) == ["0.html", "1.html"]
    make_run(tmp_path / "bare")
    with pytest.raises(UserError, match="sae analyze"):
        write_html(tmp_path / "bare", tmp_path / "out")
