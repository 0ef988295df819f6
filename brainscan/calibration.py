"""Decision thresholds that keep a recall promise on scans the model never saw.

The promise: "recall is at least `target` with `confidence` (95 %)". A threshold t misses the
tumors that score below it; on validation tumor scores X_(1) <= ... <= X_(n), the miss rate
F(X_(k)) of the threshold t = X_(k) (the k-th lowest score) is Beta(k, n - k + 1) distributed
whatever the score distribution, so

    P(recall at X_(k) >= target) = P(Binomial(n, 1 - target) >= k).

The rule takes the largest k whose probability reaches `confidence` (the highest threshold
that keeps the promise). Sample size is part of it: with n tumors even k = 1 (the lowest
tumor score) keeps the promise only when 1 - target^n >= confidence, i.e. n >= MIN_TUMORS
(59 for 0.95, 99 for 0.97, 299 for 0.99 at 95 %). Below that the data cannot place the
threshold; the rule then goes below the lowest tumor score with a smoothed bootstrap (logit
scores plus Gaussian kernel noise, Silverman's bandwidth): the 5th percentile over resamples of
the (1 - target) quantile. That extrapolation leans on the scores' smoothness; the report says
when it was used.

A modality (CT, MRI) gets a threshold of its own only where its validation split alone has at
least MIN_TUMORS tumors and MIN_HEALTHY healthy scans; else the pooled threshold applies to it.

`promise(...)` states what the test split supports, in words a radiologist reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from brainscan.decision import DecisionPolicy, tumor_probability
from brainscan.labels import MODALITIES

CONFIDENCE = 0.95
MIN_HEALTHY = 30  # healthy validation scans a modality needs for a threshold of its own
BOOTSTRAP = 4000
_EPS = 1e-7


def min_tumors(target: float, confidence: float = CONFIDENCE) -> int:
    """Fewest tumors for which the lowest tumor score keeps `target` recall at `confidence`."""
    return math.ceil(math.log(1 - confidence) / math.log(target))


def recall_lower_bound(caught: int, tumors: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower bound of a recall of caught / tumors."""
    if tumors <= 0 or caught <= 0:
        return 0.0
    return float(stats.beta.ppf(1 - confidence, caught, tumors - caught + 1))


def rate_interval(events: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of events / total."""
    if total <= 0:
        return (float("nan"), float("nan"))
    alpha = 1 - confidence
    low = 0.0 if events == 0 else float(stats.beta.ppf(alpha / 2, events, total - events + 1))
    high = 1.0 if events == total else float(stats.beta.ppf(1 - alpha / 2, events + 1, total - events))
    return low, high


def highest_threshold_reaching(tumor_scores, target: float) -> float:
    """The rule brainscan used before: the highest threshold whose recall on these scores reaches
    `target`, with no regard to how many there are (kept to compare against in docs/results)."""
    scores = np.sort(np.asarray(tumor_scores, dtype=np.float64))[::-1]
    if len(scores) == 0:
        raise ValueError("no tumor images in the calibration split: cannot calibrate a threshold")
    needed = math.ceil(target * len(scores) - 1e-9)  # tumors that must score at or above t
    return float(scores[max(needed, 1) - 1])


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: float) -> float:
    return float(1 / (1 + math.exp(-x)))


@dataclass(frozen=True)
class Threshold:
    """One calibrated threshold and how it was found."""

    threshold: float
    tumors: int  # validation tumors it was calibrated on
    rank: int  # k: the threshold is the k-th lowest tumor score; 0 when extrapolated below the lowest
    method: str  # "order statistic" or "smoothed bootstrap below the lowest tumor score"
    confidence_achieved: float | None  # None where extrapolated; P(recall >= target) under the order-statistic argument (rank >= 1)


def recall_threshold(tumor_scores, target: float, confidence: float = CONFIDENCE, seed: int = 0) -> Threshold:
    """The highest threshold whose recall is at least `target` with `confidence` (see the module doc)."""
    scores = np.sort(np.asarray(tumor_scores, dtype=np.float64))
    n = len(scores)
    if n == 0:
        raise ValueError("no tumor images in the calibration split: cannot calibrate a threshold")
    if not 0 < target < 1 or not 0 < confidence < 1:
        raise ValueError(f"target recall and confidence must be in (0, 1), got {target} and {confidence}")
    miss = 1 - target
    # P(Binomial(n, miss) >= k) for k = 1..n; the largest k at or above `confidence` wins.
    survival = stats.binom.sf(np.arange(n), n, miss)  # index k-1 -> P(X >= k)
    ok = np.flatnonzero(survival >= confidence)
    if len(ok):
        k = int(ok[-1]) + 1
        return Threshold(float(scores[k - 1]), n, k, "order statistic", float(survival[k - 1]))
    logits = _logit(scores)
    spread = min(np.std(logits, ddof=1) if n > 1 else 1.0,
                 (np.subtract(*np.percentile(logits, [75, 25])) / 1.34) or np.inf)
    bandwidth = 0.9 * (spread if np.isfinite(spread) and spread > 0 else 1.0) * n ** (-0.2)
    rng = np.random.default_rng(seed)
    resampled = rng.choice(logits, size=(BOOTSTRAP, n)) + rng.normal(0.0, bandwidth, size=(BOOTSTRAP, n))
    quantiles = np.quantile(resampled, miss, axis=1)
    lowered = min(_sigmoid(float(np.quantile(quantiles, 1 - confidence))), float(scores[0]))
    return Threshold(lowered, n, 0, "smoothed bootstrap below the lowest tumor score", None)


@dataclass
class Calibration:
    """The decision policy from validation, with the reasons for each threshold."""

    policy: DecisionPolicy
    target_recall: float
    confidence: float
    pooled: Threshold
    per_modality: dict[str, Threshold] = field(default_factory=dict)
    pooled_only: dict[str, str] = field(default_factory=dict)  # modality -> why it uses the pooled threshold

    def report(self) -> dict:
        return {"target_recall": self.target_recall, "confidence": self.confidence,
                "min_tumors": min_tumors(self.target_recall, self.confidence), "min_healthy": MIN_HEALTHY,
                "pooled": asdict(self.pooled), "per_modality": {m: asdict(t) for m, t in self.per_modality.items()},
                "pooled_only": self.pooled_only}


def calibrate(probabilities, is_tumor, modalities, target: float, confidence: float = CONFIDENCE) -> Calibration:
    """Thresholds from validation softmax rows, their truth (tumor or not) and modalities."""
    scores = tumor_probability(probabilities)
    truth = np.asarray(is_tumor, dtype=bool)
    modalities = np.asarray(modalities, dtype=object)
    pooled = recall_threshold(scores[truth], target, confidence)
    own, pooled_only = {}, {}
    needed = min_tumors(target, confidence)
    for modality in MODALITIES:
        rows = modalities == modality
        tumors, healthy = int((rows & truth).sum()), int((rows & ~truth).sum())
        if tumors >= needed and healthy >= MIN_HEALTHY:
            own[modality] = recall_threshold(scores[rows & truth], target, confidence)
        else:
            pooled_only[modality] = (f"{tumors} tumor and {healthy} healthy validation scans; a threshold of its own "
                                     f"needs at least {needed} and {MIN_HEALTHY}")
    policy = DecisionPolicy(pooled.threshold, {m: t.threshold for m, t in own.items()})
    return Calibration(policy, target, confidence, pooled, own, pooled_only)


def promise(tumors: int, caught: int, healthy: int, flagged_healthy: int, confidence: float = CONFIDENCE) -> dict:
    """What a test split supports, as numbers and as one sentence for a radiologist."""
    lower = recall_lower_bound(caught, tumors, confidence)
    rate = flagged_healthy / healthy if healthy else float("nan")
    low, high = rate_interval(flagged_healthy, healthy, confidence)
    sentence = (f"At this threshold, recall is at least {lower:.3f} with {confidence:.0%} confidence "
                f"({caught} of {tumors} tumors found in the test split); about {100 * rate:.0f} of 100 healthy "
                f"scans are flagged ({flagged_healthy} of {healthy}; {confidence:.0%} interval "
                f"{100 * low:.0f}-{100 * high:.0f}).")
    return {"recall_lower_bound": lower, "confidence": confidence, "tumors": tumors, "caught": caught,
            "healthy": healthy, "flagged_healthy": flagged_healthy, "false_alarms_per_100_healthy": 100 * rate,
            "false_alarms_interval_per_100": [100 * low, 100 * high], "statement": sentence}
