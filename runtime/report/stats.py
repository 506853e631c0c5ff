"""Statistics over plain per-item data: paired differences between two conditions, and answer priors.

Two conditions measured on the same items are compared item by item: the difference in accuracy with a paired
bootstrap 95% confidence interval (items resampled, so each item keeps its pair of verdicts) and the exact McNemar
p-value on the items where exactly one condition was right.

Code items sampled n times are scored with the unbiased pass@k estimator of Chen et al. (2021).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# 0.25 is a guess, not a calibrated level: answering one letter on 60% of 3-option items whose gold is uniform
# (the other two 20% each) gives 0.27, a bias a reader should see; sampling noise on a few hundred items stays
# well under 0.1.
PRIOR_SHIFT_THRESHOLD = 0.25


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: a binomial test of ``b`` against ``c`` discordant pairs, X ~ Bin(b+c, 1/2).

    >>> mcnemar_exact(0, 10)
    0.001953125
    >>> mcnemar_exact(5, 5), mcnemar_exact(0, 0)
    (1.0, 1.0)
    """
    m = b + c
    if m == 0:
        return 1.0
    term = tail = 1  # C(m, 0); each next binomial coefficient from the last, in exact integers
    for i in range(1, min(b, c) + 1):
        term = term * (m - i + 1) // i
        tail += term
    return min(1.0, 2 * tail / (1 << m))  # exact integers, one rounding at the end (no overflow at any m)


@dataclass(frozen=True)
class PairedDiff:
    """Condition B against condition A on the same ``n`` items."""

    n: int
    acc_a: float
    acc_b: float
    diff: float  # acc_b - acc_a
    ci_low: float  # paired bootstrap 95% percentile interval of diff
    ci_high: float
    a_only: int  # items A got right and B wrong
    b_only: int  # items B got right and A wrong
    p_mcnemar: float


def paired_difference(a: Sequence[bool], b: Sequence[bool], *, resamples: int = 10_000, seed: int = 0) -> PairedDiff:
    """B's accuracy minus A's, item by item: ``a[i]`` and ``b[i]`` are the two verdicts on item ``i``.

    >>> d = paired_difference([False] * 10 + [True] * 10, [True] * 20)
    >>> d.n, d.acc_a, d.acc_b, d.diff, d.a_only, d.b_only, round(d.p_mcnemar, 6)
    (20, 0.5, 1.0, 0.5, 0, 10, 0.001953)
    >>> d.ci_low < d.diff < d.ci_high <= 1.0
    True
    """
    if len(a) != len(b):
        raise ValueError(f"paired verdicts need the same items: {len(a)} verdicts against {len(b)}")
    if not a:
        raise ValueError("paired verdicts need at least one item")
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n, a_only, b_only = len(x), int(np.sum(x & ~y)), int(np.sum(y & ~x))
    # Resampling n items with replacement only matters through how many of each kind (B only, A only, tied) are
    # drawn: a multinomial draw of those counts is the item bootstrap exactly, in O(resamples) memory.
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [b_only / n, a_only / n, (n - a_only - b_only) / n], size=resamples)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    low, high = np.percentile(diffs, [2.5, 97.5])
    acc_a, acc_b = float(x.mean()), float(y.mean())
    return PairedDiff(
        n=n,
        acc_a=acc_a,
        acc_b=acc_b,
        diff=(b_only - a_only) / n,
        ci_low=float(low),
        ci_high=float(high),
        a_only=a_only,
        b_only=b_only,
        p_mcnemar=mcnemar_exact(a_only, b_only),
    )


def pair_by_id(a: Mapping[str, bool], b: Mapping[str, bool]) -> tuple[list[bool], list[bool]]:
    """Two conditions' verdicts (item id -> right) as aligned lists, by id and never by position.

    >>> pair_by_id({"x": True, "y": False}, {"y": True, "x": True})
    ([True, False], [True, True])
    """
    if a.keys() != b.keys():
        missing = sorted(a.keys() ^ b.keys())
        raise ValueError(f"the two conditions were not measured on the same items (e.g. {missing[:3]})")
    ids = sorted(a)
    return [a[i] for i in ids], [b[i] for i in ids]


def answer_distribution(answers: Sequence[str | None]) -> dict[str, int]:
    """How often each answer was given, most common first; no answer counts as ``"none"``.

    >>> answer_distribution(["(A)", None, "(A)", "(B)"])
    {'(A)': 2, '(B)': 1, 'none': 1}
    """
    counts = Counter("none" if answer is None else answer for answer in answers)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def prior_shift(pred: Mapping[str, int], gold: Mapping[str, int]) -> float:
    """Total variation distance between two answer distributions (counts, normalised here); 0.0 if either is empty.

    >>> prior_shift({"(A)": 6, "(B)": 2, "(C)": 2}, {"(A)": 1, "(B)": 1, "(C)": 1})
    0.2667
    """
    p_total, q_total = sum(pred.values()), sum(gold.values())
    if not p_total or not q_total:
        return 0.0
    keys = pred.keys() | gold.keys()
    return round(sum(abs(pred.get(k, 0) / p_total - gold.get(k, 0) / q_total) for k in keys) / 2, 4)


def flag_prior_shift(
    pred: Mapping[str, int], gold: Mapping[str, int], threshold: float = PRIOR_SHIFT_THRESHOLD
) -> bool:
    """Whether the predicted answers lean away from the gold answers by more than ``threshold``.

    >>> flag_prior_shift({"(A)": 10}, {"(A)": 4, "(B)": 3, "(C)": 3})
    True
    """
    return prior_shift(pred, gold) > threshold


def verdict(d: PairedDiff, majority_gold: float | None, shifted: bool) -> str:
    """One plain-language reading of a trained model against its base on the same items.

    A gain whose CI excludes zero counts as learning only if the model now beats always answering the commonest
    gold and its answers do not lean away from the gold distribution; otherwise it moved its answer prior.

    >>> gain = PairedDiff(66, 0.258, 0.455, 0.197, 0.015, 0.379, 2, 15, 0.05)
    >>> verdict(gain, 0.394, shifted=True), verdict(gain, 0.394, shifted=False), verdict(gain, 0.5, shifted=False)
    ('shifted its answer prior', 'learned beyond the answer prior', 'shifted its answer prior')
    >>> verdict(PairedDiff(66, 0.3, 0.32, 0.02, -0.05, 0.09, 4, 5, 1.0), 0.4, shifted=False)
    'no change shown'
    """
    if d.ci_high < 0:
        return "got worse"
    if d.ci_low <= 0:
        return "no change shown"
    if shifted or (majority_gold is not None and d.acc_b <= majority_gold):
        return "shifted its answer prior"
    return "learned beyond the answer prior"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"): ``1 - C(n-c, k) / C(n, k)``, as a stable product.

    >>> pass_at_k(10, 0, 1), pass_at_k(10, 10, 5), pass_at_k(10, 3, 1)
    (0.0, 1.0, 0.3)
    >>> round(pass_at_k(10, 3, 5), 4)  # 1 - C(7,5)/C(10,5) = 1 - 21/252
    0.9167
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return round(1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1))), 10)


def pass_at_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 10, 100 up to n, and n itself.

    >>> pass_at_ks(1), pass_at_ks(5), pass_at_ks(20)
    ([1], [1, 5], [1, 10, 20])
    """
    return sorted({k for k in (1, 10, 100) if k <= n} | {n})
