"""Similar contexts: given a stored context window, the stored windows whose codes are nearest (cosine of
the windows' mean SAE codes, each latent weighted by its idf over the windows; analysis/window_codes.parquet):
retrieval in code space, not in raw activations."""
from __future__ import annotations

import streamlit as st

from dashboard import latent_data
from dashboard.render import STYLE, escape, md
from dashboard.runs import DataProblem, read_meta

SHOWN = 10


def show(runs, place) -> None:
    run = runs[place.run]
    st.title("Similar contexts")
    index = latent_data.window_index(run)
    if index is None:
        raise DataProblem(f"{run.name} has no window_codes.parquet: run `sae analyze` again with this version")
    meta = read_meta(run)
    st.caption(md(run.describe()) + f" · {len(index.keys):,} stored windows, compared by the cosine of their "
               "mean codes, each latent weighted by its idf (rare latents count more)")
    shards = sorted(index.keys["shard"].unique().tolist())
    left, right = st.columns(2)
    shard = left.selectbox("Shard", shards, key="similar_shard")
    in_shard = index.keys[index.keys["shard"] == shard]
    windows = in_shard["window_index"].tolist()
    window = right.number_input("Window", int(min(windows)), int(max(windows)), int(min(windows)), step=1,
                                key="similar_window")
    match = in_shard.index[in_shard["window_index"] == int(window)]
    if not len(match):
        st.info("That window holds no stored tokens; pick another.")
        return
    row = int(match[0])
    nearest = latent_data.similar_windows(index, row, SHOWN)
    parts = [STYLE, "<h4>The context</h4>", _text(run, meta, shard, int(window)), "<h4>Nearest in code space</h4>"]
    for record in nearest.itertuples():
        parts.append(f'<div class="sae-val">cos {record.cosine:.3f} · {escape(record.shard)} window '
                     f'{int(record.window_index)} · doc {int(record.doc_id)}</div>'
                     + _text(run, meta, record.shard, int(record.window_index)))
    st.html("".join(parts))


def _text(run, meta, shard: str, window: int) -> str:
    _, tokens = latent_data.window_tokens(run, meta, shard, window)
    return f'<div class="sae-ex">{escape("".join(tokens))}</div>'
