"""feature_map.parquet: a 2-D layout of the decoder directions (the dashboard's map) and a clustering.

Unit-norm decoder rows are reduced by PCA (to 50 dimensions) and laid out by t-SNE (scikit-learn, cosine
neighbourhoods); below `min_tsne` or past `max_tsne` latents the layout is the first two principal components. Clusters: k-means
on the unit directions. Each point carries its feature id, so a click on the map opens the feature.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def layout(W_dec: np.ndarray, seed: int = 0, min_tsne: int = 256, max_tsne: int = 20_000,
           n_clusters: int | None = None):
    """(xy [d_sae, 2] float32, cluster [d_sae] int64, method) for decoder rows W_dec [d_sae, d_in]."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    directions = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), 1e-12)    # [d_sae, d_in]
    n = len(directions)
    if n < 4:
        return np.zeros((n, 2), np.float32), np.zeros(n, np.int64), "none"
    reduced = PCA(n_components=min(50, n - 1, directions.shape[1]), random_state=seed).fit_transform(directions)
    if min_tsne <= n <= max_tsne:
        xy = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", metric="cosine",
                  random_state=seed, max_iter=300).fit_transform(reduced)
        method = "t-SNE of the unit decoder directions (cosine), after PCA to 50 dimensions"
    else:
        xy = reduced[:, :2]
        method = "first two principal components of the unit decoder directions"
    k = n_clusters or int(min(32, max(2, n // 16)))
    cluster = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1).fit_predict(directions)
    return xy.astype(np.float32), cluster.astype(np.int64), method


def write_feature_map(out_dir, W_dec, seed: int = 0) -> str:
    xy, cluster, method = layout(np.asarray(W_dec, dtype=np.float32), seed=seed)
    pq.write_table(pa.table({"feature": pa.array(np.arange(len(xy), dtype=np.int64)),
                             "x": pa.array(xy[:, 0]), "y": pa.array(xy[:, 1]), "cluster": pa.array(cluster)}),
                   out_dir / "feature_map.parquet")
    return method
