"""Data behind the Search, Map and latent-space pages: the tables `sae analyze` and `sae explain` wrote
(explanations, token_features, anomalies, window_codes, feature_map), cached per file version, and the
small computations on them. Plain functions (no Streamlit in the computations) so that tests can check
them; the model-dependent ones (contrast, prompt, interpolate) take a LoadedModel and an SAE."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import streamlit as st

from dashboard.runs import _analysis_file, _load


# ---- tables (cached across sessions, read-only) -----------------------------------------------------------
@st.cache_resource(show_spinner="Loading…", max_entries=16)
def _frame(path: str, stamp: tuple) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def table(run, name: str, required: bool = False) -> pd.DataFrame | None:
    """RUN/analysis/NAME.parquet as a DataFrame (None when absent and not required)."""
    path = _analysis_file(run, f"{name}.parquet", required)
    return None if path is None else _load(_frame, path)


def explanations(run) -> pd.DataFrame | None:
    frame = table(run, "explanations")
    return None if frame is None else frame.set_index("feature", drop=False)


# ---- search by explanation text ----------------------------------------------------------------------------
@dataclass
class TextIndex:
    vectorizer: object
    matrix: object                 # [n_explanations, vocab] sparse, rows of unit norm
    features: np.ndarray


@st.cache_resource(show_spinner=False, max_entries=8)
def _text_index(path: str, stamp: tuple) -> TextIndex:
    return build_text_index(pq.read_table(path, columns=["feature", "explanation"]).to_pandas())


def build_text_index(frame: pd.DataFrame) -> TextIndex:
    from sklearn.feature_extraction.text import TfidfVectorizer
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 4), sublinear_tf=True)
    texts = frame["explanation"].fillna("").astype(str).tolist()
    matrix = vectorizer.fit_transform(texts if any(texts) else ["-"])
    return TextIndex(vectorizer, matrix, frame["feature"].to_numpy())


def text_index(run) -> TextIndex | None:
    path = _analysis_file(run, "explanations.parquet", required=False)
    return None if path is None else _load(_text_index, path)


def search_text(index: TextIndex, query: str, k: int = 50) -> pd.DataFrame:
    """Features ranked by the TF-IDF (character n-gram) cosine of their explanation with the query."""
    if not query.strip() or index.matrix.shape[0] == 0:
        return pd.DataFrame({"feature": [], "similarity": []})
    similarity = (index.matrix @ index.vectorizer.transform([query]).T).toarray().ravel()
    order = np.argsort(-similarity, kind="stable")[:k]
    order = order[similarity[order] > 0]
    return pd.DataFrame({"feature": index.features[order], "similarity": similarity[order]})


# ---- search by token ----------------------------------------------------------------------------------------
def search_token(tokens: pd.DataFrame, text: str, k: int = 30) -> pd.DataFrame:
    """The features that fire most on the stored tokens spelled `text` (case and surrounding spaces ignored),
    best first: each feature's best score (mean code on the token / its largest code) over those tokens."""
    wanted = text.strip().lower()
    if tokens is None or not wanted:
        return pd.DataFrame(columns=["feature", "score", "mean_activation", "fire_rate", "token", "count"])
    match = tokens[tokens["token"].str.strip().str.lower() == wanted]
    rows = []
    for record in match.itertuples():
        for f, s, m, r in zip(record.features, record.score, record.mean_activation, record.fire_rate):
            rows.append((int(f), float(s), float(m), float(r), record.token, int(record.count)))
    frame = pd.DataFrame(rows, columns=["feature", "score", "mean_activation", "fire_rate", "token", "count"])
    return frame.sort_values("score", ascending=False).drop_duplicates("feature").head(k).reset_index(drop=True)


# ---- search by prompt and by contrast (the model runs) --------------------------------------------------------
def text_codes(loaded, sae_model, site: str, layer, text: str):
    """(token strings, codes [seq, d_sae] with special tokens zeroed) of one text."""
    from dashboard import live
    from sae.analyze.extras import token_strings
    ids = live.encode_text(loaded, text)
    codes = live.codes_for(sae_model, live.site_activations(loaded, site, layer, ids)).numpy()
    special = np.array([i in loaded.special_ids for i in ids])
    codes[special] = 0.0
    strings = token_strings(loaded.tokenizer, ids)
    return [strings[i] for i in ids], codes


def contrast(codes_a: list, codes_b: list, k: int = 30) -> pd.DataFrame:
    """Features that fire on the texts of set A and not on those of set B: score = share of A's texts where
    the feature fires minus share of B's; ties broken by the mean of its largest code over A's texts."""
    def summary(codes):
        peaks = np.stack([c.max(axis=0) if len(c) else np.zeros(c.shape[1]) for c in codes])   # [texts, d_sae]
        return (peaks > 0).mean(axis=0), peaks.mean(axis=0)
    share_a, peak_a = summary(codes_a)
    share_b, peak_b = summary(codes_b)
    score = share_a - share_b
    order = np.lexsort((-peak_a, -score))[:k]
    return pd.DataFrame({"feature": order, "score": score[order], "fires_in_A": share_a[order],
                         "fires_in_B": share_b[order], "mean_peak_A": peak_a[order], "mean_peak_B": peak_b[order]})


# ---- similar contexts (retrieval in code space) ----------------------------------------------------------------
@dataclass
class WindowIndex:
    keys: pd.DataFrame             # shard, window_index, doc_id per row
    matrix: object                 # [windows, d_sae] sparse CSR: mean codes × idf, rows of unit norm


@st.cache_resource(show_spinner="Indexing contexts…", max_entries=4)
def _window_index(path: str, stamp: tuple) -> WindowIndex:
    return build_window_index(pq.read_table(path))


def build_window_index(arrow_table, d_sae: int | None = None) -> WindowIndex:
    from scipy.sparse import csr_matrix
    latents = arrow_table.column("latents").combine_chunks()
    values = arrow_table.column("values").combine_chunks()
    offsets = latents.offsets.to_numpy()
    columns = latents.values.to_numpy().astype(np.int64)
    data = values.values.to_numpy().astype(np.float32)
    width = d_sae or (int(columns.max()) + 1 if len(columns) else 1)
    matrix = csr_matrix((data, columns, offsets), shape=(len(offsets) - 1, width))
    from scipy.sparse import diags
    # idf weights: a latent among the strongest of every window (position, BOS-like) tells windows apart
    # no better than a stop word, and would otherwise make every window look alike
    present = np.bincount(columns, minlength=width)
    matrix = matrix @ diags(np.log((matrix.shape[0] + 1) / (present + 1)).astype(np.float32))
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    matrix = diags(1.0 / np.maximum(norms, 1e-12)) @ matrix
    keys = arrow_table.select(["shard", "window_index", "doc_id"]).to_pandas()
    return WindowIndex(keys, matrix.tocsr())


def window_index(run) -> WindowIndex | None:
    path = _analysis_file(run, "window_codes.parquet", required=False)
    return None if path is None else _load(_window_index, path)


def similar_windows(index: WindowIndex, row: int, k: int = 10) -> pd.DataFrame:
    """The k stored windows whose idf-weighted mean codes are nearest (cosine) to window `row`'s, itself excluded."""
    similarity = (index.matrix @ index.matrix[row].T).toarray().ravel()
    similarity[row] = -np.inf
    order = np.argsort(-similarity, kind="stable")[:k]
    out = index.keys.iloc[order].copy()
    out["cosine"] = similarity[order]
    return out.reset_index(drop=True)


# ---- interpolation through the spliced model -------------------------------------------------------------------
def interpolate(loaded, sae_model, site: str, layer, ids_a: list[int], ids_b: list[int], ts, k: int = 5):
    """Codes z_a, z_b of the last tokens of contexts a and b; for each t, context a is run with the SAE's
    reconstruction spliced in at every position and, at its last position, decode((1 − t)·z_a + t·z_b).
    Returns a DataFrame (t, rank, token, probability) of the top-k next tokens."""
    import torch
    from dashboard import live
    from sae.analyze.extras import token_strings
    from sae.evaluate.splice import replace
    z_a = live.codes_for(sae_model, live.site_activations(loaded, site, layer, ids_a)[-1:])       # [1, d_sae]
    z_b = live.codes_for(sae_model, live.site_activations(loaded, site, layer, ids_b)[-1:])       # [1, d_sae]
    ts = torch.tensor([float(t) for t in ts])
    mixes = (1 - ts)[:, None] * z_a + ts[:, None] * z_b                                            # [T, d_sae]
    param = next(sae_model.parameters())

    def fn(activation):                                                                           # [T, seq, d]
        with torch.no_grad():
            flat = activation.reshape(-1, activation.shape[-1]).to(param.device, param.dtype)
            out = sae_model.decode(sae_model.encode(flat)).reshape(activation.shape).clone()
            out[:, -1] = sae_model.decode(mixes.to(param.device, param.dtype))
        return out.to(activation.device, activation.dtype)

    device = next(loaded.model.parameters()).device
    input_ids = torch.tensor([ids_a] * len(ts), device=device)                                    # [T, seq]
    with torch.no_grad(), replace(loaded.model, site, layer, fn):
        logits = loaded.model(input_ids=input_ids).logits[:, -1].float().cpu()                   # [T, vocab]
    probs = logits.softmax(-1)
    top = probs.topk(k, dim=-1)
    strings = token_strings(loaded.tokenizer, top.indices.reshape(-1).tolist())
    rows = [(float(t), r, strings[int(i)], float(p)) for t, ids, ps in zip(ts.tolist(), top.indices, top.values)
            for r, (i, p) in enumerate(zip(ids.tolist(), ps.tolist()))]
    return pd.DataFrame(rows, columns=["t", "rank", "token", "probability"])


# ---- stored windows as text (the store named in analysis/meta.json) ---------------------------------------
@st.cache_resource(show_spinner=False, max_entries=4)
def _store(path: str):
    from sae.store import ActivationStore
    return ActivationStore(path)


@st.cache_resource(show_spinner=False, max_entries=4)
def _tokenizer(model: str):
    from sae.analyze.extras import try_load_tokenizer
    return try_load_tokenizer(model)[0]


def window_tokens(run, meta: dict, shard: str, window: int) -> tuple[list[int], list[str]]:
    """(token ids, token strings) of a stored context window, read from the store the analysis was made on."""
    from sae.analyze.extras import token_strings
    from dashboard.runs import DataProblem
    try:
        store = _store(str(meta.get("store")))
    except Exception as error:  # noqa: BLE001 - moved or deleted store: one line
        raise DataProblem(f"the store {meta.get('store')} that {run.name} was analysed on cannot be opened: "
                          f"{error}") from None
    names = [s.name for s in store.shards]
    if shard not in names:
        raise DataProblem(f"{shard} is not a shard of {store.path}")
    ids = store.read_shard(names.index(shard), "window_tokens")[int(window)].tolist()
    strings = token_strings(_tokenizer(str(meta.get("model"))), ids)
    return ids, [strings[i] for i in ids]
