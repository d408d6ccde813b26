"""Sparse probing, as SAEBench does it: do single latents find the labels?

Each document's codes are mean-pooled over its tokens. For each label in turn (one-vs-rest, balanced),
the k latents with the largest |mean(positive) − mean(negative)| on the training documents are chosen,
a logistic regression is fitted on them, and its balanced accuracy is measured on the test documents.
The same probe on the raw activations (all dimensions) is the ceiling ("full").
Documents are split by a fixed function of doc_id: one in five is a test document.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

K_VALUES = (1, 2, 5)
TEST_MODULUS = 5


def is_probe_test(doc_ids: torch.Tensor) -> torch.Tensor:
    """The fixed probe split: [n] int64 doc ids -> [n] bool, about one document in five is a test one.
    (A different hash from the store's held-out rule, so the two splits are independent.)"""
    doc_ids = torch.as_tensor(doc_ids, dtype=torch.int64)
    return ((doc_ids * 2246822519 + 3266489917) % (2**32)) % TEST_MODULUS == 0


class DocumentPool:
    """Accumulates per-document sums of feature vectors: add(doc_ids [n], features [n, d])."""

    def __init__(self):
        self.counts: dict[int, int] = {}
        self._index: dict[int, int] = {}
        self._sum_rows: list[torch.Tensor] = []

    def add(self, doc_ids: torch.Tensor, features: torch.Tensor) -> None:
        features = features.detach().double().cpu()
        unique, inverse = torch.unique(doc_ids.cpu(), return_inverse=True)
        block = torch.zeros(len(unique), features.shape[1], dtype=torch.float64)  # [docs, d]
        block.index_add_(0, inverse, features)
        counts = torch.bincount(inverse, minlength=len(unique))
        for i, doc in enumerate(unique.tolist()):
            if doc in self._index:
                self._sum_rows[self._index[doc]] += block[i]
            else:
                self._index[doc] = len(self._sum_rows)
                self._sum_rows.append(block[i].clone())
            self.counts[doc] = self.counts.get(doc, 0) + int(counts[i])

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """(doc_ids [docs], mean features [docs, d]) in the order documents were first seen."""
        docs = np.array(list(self._index), dtype=np.int64)
        if len(docs) == 0:
            return docs, np.zeros((0, 0))
        sums = torch.stack(self._sum_rows).numpy()
        counts = np.array([self.counts[d] for d in docs], dtype=np.float64)
        return docs, sums / counts[:, None]


_FITTED: dict = {}      # fitted probes by (kind, digest of the training data, seed), for fitted_once


def fitted_once(kind: str, fit, x: np.ndarray, y: np.ndarray, seed: int):
    """fit(x, y, seed), once per process for the same data and seed. A probe on the model's own activations does
    not depend on the SAE, and a sweep scores many SAEs on the same store (kind names the fit)."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (x, y):
        digest.update(repr((array.shape, array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(array))         # the buffer itself: no copy of a contiguous array
    key = (kind, digest.hexdigest(), seed)
    if key not in _FITTED:
        if len(_FITTED) >= 64:
            _FITTED.pop(next(iter(_FITTED)))
        _FITTED[key] = fit(x, y, seed)
    return _FITTED[key]


def balanced_probe(train_x, train_y, seed: int):
    """A standardised, class-balanced logistic-regression probe, fitted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000,
                                                               random_state=seed))
    return probe.fit(train_x, train_y)


def balanced_score(probe, x, y) -> float:
    """A fitted probe's balanced accuracy on x, y."""
    from sklearn.metrics import balanced_accuracy_score
    return float(balanced_accuracy_score(y, probe.predict(x)))


def top_k_latents(codes: np.ndarray, positive: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k latents with the largest |mean(positive) − mean(negative)|. codes [docs, d_sae]."""
    gap = np.abs(codes[positive].mean(axis=0) - codes[~positive].mean(axis=0))  # [d_sae]
    return np.argsort(-gap, kind="stable")[:k]


def sparse_probing(doc_ids: np.ndarray, labels: np.ndarray, codes: np.ndarray, raw: np.ndarray,
                   k_values=K_VALUES, seed: int = 0) -> dict | None:
    """Mean balanced accuracy over the one-vs-rest tasks, per k and for the raw activations ("full").

    doc_ids [docs], labels [docs] (int, < 0 = unlabelled), codes [docs, d_sae] and raw [docs, d_in]
    are per-document means. Returns None when there is nothing to probe (fewer than two labels, or a
    split without both classes for every label)."""
    labelled = labels >= 0
    doc_ids, labels, codes, raw = doc_ids[labelled], labels[labelled], codes[labelled], raw[labelled]
    test = is_probe_test(torch.from_numpy(doc_ids)).numpy()
    train = ~test
    classes = np.unique(labels)
    if len(classes) < 2 or not test.any() or not train.any():
        return None
    scores: dict[str, list[float]] = {str(k): [] for k in k_values}
    scores["full"] = []
    tasks = []
    for label in classes.tolist():
        target = labels == label
        if len(np.unique(target[train])) < 2 or len(np.unique(target[test])) < 2:
            continue
        tasks.append(label)
        for k in k_values:
            chosen = top_k_latents(codes[train], target[train], min(k, codes.shape[1]))
            probe = balanced_probe(codes[train][:, chosen], target[train], seed)
            scores[str(k)].append(balanced_score(probe, codes[test][:, chosen], target[test]))
        full = fitted_once("balanced", balanced_probe, raw[train], target[train], seed)   # the same for every SAE
        scores["full"].append(balanced_score(full, raw[test], target[test]))
    if not tasks:
        return None
    result = {key: float(np.mean(values)) for key, values in scores.items()}
    result["n_tasks"] = len(tasks)
    result["n_train_docs"] = int(train.sum())
    result["n_test_docs"] = int(test.sum())
    return result
