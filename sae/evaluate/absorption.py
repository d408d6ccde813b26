"""Feature absorption, first-letter version (Chanin et al. 2024, "A is for Absorption"; SAEBench's absorption eval).

Does the SAE have a latent for "the token starts with L", and does it fire wherever that is true? Absorption is
when it does not: a token-specific latent (say for " short") carries the "starts with s" direction itself, and
the general latent stays silent on that token. Steps, on the store's rows whose token is a plain word:

1. A linear probe (logistic regression, all letters at once) predicts the token's first letter from the model's
   activations, fitted on the probe-train documents (sae.evaluate.probing's fixed doc_id split); p_L is
   letter L's probe direction (unit norm, raw units).
2. Main latents of L, by k-sparse probing on the training tokens: the latent whose mean code differs most
   between L-tokens and the rest, then the next ones while each raises a k-sparse probe's F1 by more than
   τ_fs = 0.03 (at most 5). A letter with more than one main latent is a *split* feature.
3. On the test tokens the probe gets right, each token's absorption fraction: with contrib_a = code_a ·
   (W_dec[a] · p_L) for the firing latents whose decoder has cosine ≥ 0.025 with p_L, P = Σ positive
   contributions and M = the main latents' share of it, fraction = (P − M) / P (0 where P = 0). A token is
   *fully absorbed* where no main latent fires and P > 0.

Reported: `absorption` (the mean over letters of the mean fraction), `absorption_full_rate` (the mean over
letters of the fully absorbed share), `absorption_split_features` (letters with split features), and per letter.
Caveat (SAEBench's own): absorption is most meaningful for wide SAEs (16k+ latents) on models of 1B+ parameters;
on a 135M model with 4,608 latents, read the figure as a comparison between SAEs on the same store.
"""
from __future__ import annotations

import numpy as np
import torch

from sae.evaluate.probing import fitted_once, is_probe_test

COSINE_THRESHOLD = 0.025     # an absorbing latent's decoder must point this much along the probe (SAEBench)
SPLIT_F1_GAIN = 0.03         # τ_fs: a further main latent must raise the k-sparse probe's F1 this much
MAX_MAIN = 5
MIN_TOKENS = 10              # a letter needs this many training and test tokens to be scored
MAX_ROWS = 20_000
_LETTERS: dict = {}          # {(model, vocabulary size): {token id: first letter}}, one tokenizer pass per process


def first_letter(token: str) -> str | None:
    """The lowercase first letter of a token that is a plain word (after a leading space marker), else None."""
    text = token.lstrip(" Ġ▁").strip()
    return text[0].lower() if text.isascii() and text.isalpha() else None


def token_letters(vocab) -> dict[int, str]:
    """{token id: first letter} from a list of token strings or a Hugging Face tokenizer."""
    if hasattr(vocab, "convert_ids_to_tokens"):         # byte-level pieces (Ġ, ▁ markers), no decode per id
        strings = [str(t) for t in vocab.convert_ids_to_tokens(list(range(len(vocab))))]
    else:
        strings = list(vocab)
    return {i: letter for i, s in enumerate(strings) if (letter := first_letter(str(s))) is not None}


def _f1(scores: np.ndarray, target: np.ndarray) -> float:
    from sklearn.metrics import f1_score
    return float(f1_score(target, scores > 0))


def _sparse_probe_f1(codes: np.ndarray, target: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    probe = LogisticRegression(class_weight="balanced", max_iter=1000, random_state=seed)
    probe.fit(codes, target)
    return _f1(probe.decision_function(codes), target)


@torch.no_grad()
def absorption_score(sae, activations: torch.Tensor, token_ids: torch.Tensor, doc_ids: torch.Tensor, vocab,
                     batch_size: int = 4096, seed: int = 0) -> dict | None:
    """activations [n, d_in] raw, token_ids [n], doc_ids [n]; vocab: token strings or a tokenizer.
    Returns the figures above, or None when fewer than two letters have enough tokens."""
    letters = token_letters(vocab)
    letter_of = np.array([letters.get(int(t), "") for t in token_ids.tolist()])
    usable = letter_of != ""
    x = activations[torch.from_numpy(usable)].float().cpu()                 # [m, d_in]
    letter_of, doc_ids = letter_of[usable], torch.as_tensor(doc_ids)[torch.from_numpy(usable)]
    test = is_probe_test(doc_ids).numpy()
    train = ~test
    names, counts_train = np.unique(letter_of[train], return_counts=True)
    kept = [n for n, c in zip(names, counts_train) if c >= MIN_TOKENS and (letter_of[test] == n).sum() >= MIN_TOKENS]
    if len(kept) < 2:
        return None
    keep = np.isin(letter_of, kept)
    x, letter_of, test, train = x[torch.from_numpy(keep)], letter_of[keep], test[keep], train[keep]
    x_np = x.double().numpy()
    centre = x_np[train].mean(axis=0)
    probe = fitted_once("first letter", _letter_probe, x_np[train] - centre, letter_of[train], seed)   # not the SAE's
    predicted = probe.predict(x_np - centre)
    directions = torch.from_numpy(probe.coef_ / np.linalg.norm(probe.coef_, axis=1, keepdims=True))  # [L, d_in]
    classes = list(probe.classes_)
    if len(classes) == 2:        # sklearn's binary form: one direction for the second class
        directions = torch.cat([-directions, directions])

    device = next(iter(sae.parameters()), torch.zeros(())).device
    codes = torch.cat([sae.encode(x[i:i + batch_size].to(device)).float().cpu()
                       for i in range(0, len(x), batch_size)])                          # [m, d_sae]
    tau = float(getattr(sae, "fire_threshold", 0.0) or 0.0)
    W_dec = sae.W_dec_raw.detach().float().cpu() if hasattr(sae, "W_dec_raw") else sae.W_dec.detach().float().cpu()
    dec_unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)                  # [d_sae, d_in]
    per_letter, split = {}, 0
    codes_train = codes[torch.from_numpy(train)].numpy()                                 # [m_train, d_sae]
    gaps = mean_gaps(codes_train, letter_of[train], classes)                             # [letters, d_sae]
    for row, letter in enumerate(classes):
        p = directions[row].float()                                                      # [d_in] unit
        target = letter_of[train] == letter
        main = _main_latents(codes_train, target, seed, gaps[row])
        split += len(main) > 1
        rows = np.nonzero(test & (letter_of == letter) & (predicted == letter))[0]
        if len(rows) == 0:
            continue
        c = codes[torch.from_numpy(rows)]                                                # [r, d_sae]
        aligned = (dec_unit @ p) >= COSINE_THRESHOLD                                     # [d_sae]
        contrib = (c * (c > tau)) * (W_dec @ p)                                           # [r, d_sae]
        contrib = contrib.clamp_min(0) * aligned
        total = contrib.sum(dim=1)                                                       # [r]
        main_part = contrib[:, main].sum(dim=1)
        fraction = torch.where(total > 0, (total - main_part) / total.clamp_min(1e-12), torch.zeros_like(total))
        main_silent = ~(c[:, main] > tau).any(dim=1)
        per_letter[letter] = {"absorption": float(fraction.clamp(0, 1).mean()),
                              "full_rate": float((main_silent & (total > 0)).double().mean()),
                              "main_latents": [int(m) for m in main], "test_tokens": int(len(rows))}
    if not per_letter:
        return None
    return {"absorption": float(np.mean([v["absorption"] for v in per_letter.values()])),
            "absorption_full_rate": float(np.mean([v["full_rate"] for v in per_letter.values()])),
            "absorption_split_features": int(split), "absorption_letters": len(per_letter),
            "absorption_probe_accuracy": float((predicted[test] == letter_of[test]).mean()),
            "absorption_per_letter": per_letter}


def _letter_probe(x: np.ndarray, letters: np.ndarray, seed: int):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(max_iter=2000, random_state=seed, C=1.0).fit(x, letters)


def mean_gaps(codes: np.ndarray, groups: np.ndarray, names: list) -> np.ndarray:
    """[len(names), d_sae]: for each name, the mean code of the rows of that group minus that of the other rows,
    from one product with the one-hot groups (no per-group copies of the [rows, d_sae] codes)."""
    onehot = (groups[:, None] == np.asarray(names)[None, :]).astype(codes.dtype)     # [rows, groups]
    sums = onehot.T @ codes                                                           # [groups, d_sae]
    sizes = onehot.sum(axis=0)[:, None]                                               # [groups, 1]
    return sums / np.maximum(sizes, 1) - (codes.sum(axis=0) - sums) / np.maximum(len(codes) - sizes, 1)


def _main_latents(codes: np.ndarray, target: np.ndarray, seed: int, gap: np.ndarray) -> list[int]:
    """k-sparse probing: the latents ranked by mean-code gap [d_sae], kept while each raises the F1 by > τ_fs."""
    ranked = np.argsort(-gap, kind="stable")[:MAX_MAIN]
    main = [int(ranked[0])]
    best = _sparse_probe_f1(codes[:, main], target, seed)
    for latent in ranked[1:]:
        if gap[latent] <= 0:
            break
        f1 = _sparse_probe_f1(codes[:, main + [int(latent)]], target, seed)
        if f1 - best <= SPLIT_F1_GAIN:
            break
        main.append(int(latent))
        best = f1
    return main


def store_absorption(sae, store, layer, special_ids: set[int], vocab=None, device="cpu", seed: int = 0,
                     max_rows: int = MAX_ROWS) -> tuple[dict | None, str | None]:
    """(figures, None) on up to max_rows of the store's word-token rows, or (None, why not)."""
    from sae.evaluate.scores import is_special
    if "token_ids" not in store.tensor_names(0):
        return None, "the store has no token_ids"
    if vocab is None:
        name = store.manifest.get("model")
        try:
            from sae.lm import load_tokenizer
            vocab = load_tokenizer(name, local_only=True)   # never the hub: eval --no-model promises it
        except Exception as error:   # noqa: BLE001 - any failure to load means: no vocabulary here
            return None, f"the store's tokenizer ({name}) could not be loaded: {type(error).__name__}"
    token_ids = store.column("token_ids")
    key = (store.manifest.get("model"), len(vocab)) if hasattr(vocab, "convert_ids_to_tokens") else None
    letters = _LETTERS.get(key) if key else None
    if letters is None:
        letters = token_letters(vocab)
        if key:
            _LETTERS[key] = letters
    wanted = torch.zeros(int(token_ids.max()) + 1, dtype=torch.bool)
    ids = torch.tensor([i for i in letters if i < len(wanted)], dtype=torch.long)
    wanted[ids] = True
    rows = (wanted[token_ids.long()] & ~is_special(token_ids, special_ids)).nonzero().squeeze(1)
    if len(rows) > max_rows:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:max_rows]].sort().values
    if len(rows) == 0:
        return None, "no store row holds a plain-word token"
    x = store.rows(layer, rows)                                                          # [n, d_in]
    result = absorption_score(sae.to(device), x, token_ids[rows], store.column("doc_id")[rows],
                              _strings(letters), seed=seed)
    return (result, None) if result is not None else (None, "fewer than two first letters with enough tokens")


def _strings(letters: dict[int, str]) -> list[str]:
    """Token strings indexed by id, enough for first_letter (letters already resolved)."""
    size = max(letters) + 1 if letters else 0
    return [letters.get(i, "") for i in range(size)]
