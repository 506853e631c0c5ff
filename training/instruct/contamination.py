"""Contamination and duplicates: generated samples must not copy evaluation items, nor each other.

For each sample, its closest evaluation items (ID and OOD) by embedding are found first, then the exact ROUGE-L F1
(``rouge-score``) against those: the max over the top candidates, as the paper's case-to-case "max ROUGE-L" (its
Table 5 reports a mean of about 0.30). Pure-Python ROUGE-L over every (sample, item) pair would be millions of LCS
computations; the embedding shortlist makes it a few per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from memory.embed import TextEmbedder
from memory.record import normalise_query

# 8 candidates: a near-copy shares most words, so it is among the nearest few by embedding.
SHORTLIST = 8


@dataclass(frozen=True)
class Overlap:
    rouge_l: float  # max ROUGE-L F1 against the shortlisted evaluation items
    closest_id: str


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 between two texts (rouge-score, stemmed).

    >>> rouge_l("the cat sat on the mat", "the cat sat on the mat")
    1.0
    >>> rouge_l("the cat sat", "dogs bark loudly")
    0.0
    """
    return float(_scorer().score(a, b)["rougeL"].fmeasure)


@cache
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def overlaps(
    samples: Sequence[str], eval_texts: Sequence[str], eval_ids: Sequence[str], embedder: TextEmbedder
) -> list[Overlap]:
    """Each sample's highest ROUGE-L against the evaluation items closest to it."""
    if not samples:
        return []
    if not eval_texts:
        return [Overlap(0.0, "") for _ in samples]
    s, e = embedder.embed(list(samples)), embedder.embed(list(eval_texts))
    nearest = np.argsort(-(s @ e.T), axis=1)[:, :SHORTLIST]
    result = []
    for text, row in zip(samples, nearest, strict=True):
        scores = [(rouge_l(text, eval_texts[j]), eval_ids[j]) for j in row]
        best = max(scores)
        result.append(Overlap(round(best[0], 4), best[1]))
    return result


def distinct(texts: Sequence[str], embedder: TextEmbedder, near: float) -> tuple[list[int], int, int]:
    """Indices of the texts to keep (first of each group), and the counts of exact and near duplicates dropped.

    Exact: the same text after lowercasing and collapsing whitespace. Near: cosine similarity >= ``near`` to a
    text already kept.
    """
    seen: set[str] = set()
    firsts = []
    exact = 0
    for i, text in enumerate(texts):
        key = normalise_query(text)
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        firsts.append(i)
    if not firsts:
        return [], exact, 0
    vectors = embedder.embed([texts[i] for i in firsts])
    kept: list[int] = []
    kept_vectors: list[np.ndarray] = []
    near_dups = 0
    for i, v in zip(firsts, vectors, strict=True):
        if kept_vectors and float(np.max(np.stack(kept_vectors) @ v)) >= near:
            near_dups += 1
            continue
        kept.append(i)
        kept_vectors.append(v)
    return kept, exact, near_dups
