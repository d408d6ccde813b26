"""Targeted probe perturbation (TPP; SAEBench, after Karvonen et al. 2024's SHIFT evaluation).

Does ablating the latents that are most selective for one label remove that label's information, and only
that one? On the store's labelled documents (mean-pooled per document, the fixed doc_id split of sparse
probing), for each label i:
  - a linear probe P_i (one vs rest, balanced) is fitted on the model's raw pooled activations;
  - the n latents with the largest mean-code gap (label-i documents minus the rest, training documents) are
    ablated: their contribution Σ_j code_j · W_dec[j] is subtracted from each test document's activation
    (the SAE's error term stays: only those latents' parts go);
  - every probe P_j is scored (balanced accuracy) on the ablated test documents.
With A_j the clean accuracy of P_j and A_j|i its accuracy after ablating label i's latents, SAEBench's score is
  tpp_raw = mean_i (A_i − A_i|i) − mean_{i≠j} (A_j − A_j|i),
the targeted drop minus the collateral one. A balanced probe can only fall to chance (0.5), so tpp_raw is at
most about 0.5; `tpp` divides each drop by the probe's margin over chance (A_j − 0.5), so that a perfect
targeted ablation scores 1 and one without effect 0.
"""
from __future__ import annotations

import numpy as np
import torch

from sae.evaluate.probing import balanced_probe, balanced_score, fitted_once, is_probe_test

N_LATENTS = 20


def tpp_score(doc_ids: np.ndarray, labels: np.ndarray, codes: np.ndarray, raw: np.ndarray, W_dec: torch.Tensor,
              n_latents: int = N_LATENTS, seed: int = 0) -> dict | None:
    """doc_ids [docs], labels [docs] (< 0: unlabelled), codes [docs, d_sae] and raw [docs, d_in] per-document
    means, W_dec [d_sae, d_in] decoder rows in raw units. None when fewer than two labels can be probed."""
    labelled = labels >= 0
    doc_ids, labels, codes, raw = doc_ids[labelled], labels[labelled], codes[labelled], raw[labelled]
    test = is_probe_test(torch.from_numpy(doc_ids)).numpy()
    train = ~test
    tasks = [label for label in np.unique(labels).tolist()
             if len(np.unique((labels == label)[train])) == 2 and len(np.unique((labels == label)[test])) == 2]
    if len(tasks) < 2:
        return None
    W = W_dec.detach().double().cpu().numpy()                                            # [d_sae, d_in]
    n = max(1, min(int(n_latents), codes.shape[1]))
    probes = {label: fitted_once("balanced", balanced_probe, raw[train], labels[train] == label, seed)
              for label in tasks}                                 # on the raw activations: the same for every SAE
    clean = {label: balanced_score(probes[label], raw[test], labels[test] == label) for label in tasks}
    targeted, collateral, targeted_norm, collateral_norm = [], [], [], []
    for i in tasks:
        positive = labels[train] == i
        gap = codes[train][positive].mean(axis=0) - codes[train][~positive].mean(axis=0)   # [d_sae]
        chosen = np.argsort(-gap, kind="stable")[:n]
        ablated = raw[test] - codes[test][:, chosen] @ W[chosen]                           # [test docs, d_in]
        for j in tasks:
            drop = clean[j] - balanced_score(probes[j], ablated, labels[test] == j)
            margin = max(clean[j] - 0.5, 1e-6)
            (targeted if i == j else collateral).append(drop)
            (targeted_norm if i == j else collateral_norm).append(drop / margin)
    return {"tpp": float(np.mean(targeted_norm) - np.mean(collateral_norm)),
            "tpp_raw": float(np.mean(targeted) - np.mean(collateral)),
            "tpp_targeted_drop": float(np.mean(targeted)), "tpp_collateral_drop": float(np.mean(collateral)),
            "tpp_n_latents": n, "tpp_tasks": len(tasks)}
