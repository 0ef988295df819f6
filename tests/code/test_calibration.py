"""The calibration rule: thresholds whose recall promise holds on scores they were not fitted on."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from brainscan import calibration
from brainscan.labels import CLASSES


def _population(rng, n):
    """Tumor P(tumor) scores with a long low tail, like a real model's: logits ~ N(4, 2.5)."""
    return 1 / (1 + np.exp(-rng.normal(4.0, 2.5, n)))


def _true_recall(threshold):
    """Recall of a threshold on the population above, exactly."""
    logit = np.log(threshold) - np.log1p(-threshold)
    return float(stats.norm.sf(logit, loc=4.0, scale=2.5))


def test_min_tumors_is_where_the_lowest_score_starts_to_keep_the_promise():
    assert calibration.min_tumors(0.95) == 59 and calibration.min_tumors(0.97) == 99
    assert calibration.min_tumors(0.99) == 299
    for target in (0.95, 0.97):
        n = calibration.min_tumors(target)
        assert 1 - target ** n >= 0.95 > 1 - target ** (n - 1)


@pytest.mark.parametrize("n, target", [(300, 0.97), (120, 0.95)])
def test_order_statistic_threshold_keeps_its_promise_in_95_percent_of_calibration_sets(n, target):
    rng = np.random.default_rng(0)
    kept, ranks = [], set()
    for _ in range(600):
        chosen = calibration.recall_threshold(_population(rng, n), target)
        assert chosen.method == "order statistic" and chosen.rank >= 1
        ranks.add(chosen.rank)
        kept.append(_true_recall(chosen.threshold) >= target)
    assert len(ranks) == 1  # the rank depends on n and the target only
    assert np.mean(kept) >= 0.93, np.mean(kept)  # 0.95 promised; 600 draws leave ~0.01 of noise


def test_too_few_tumors_go_below_the_lowest_score_and_still_mostly_keep_the_promise():
    rng = np.random.default_rng(1)
    kept = []
    for _ in range(300):
        scores = _population(rng, 75)
        chosen = calibration.recall_threshold(scores, 0.97)
        assert chosen.rank == 0 and chosen.threshold <= scores.min() and "bootstrap" in chosen.method
        kept.append(_true_recall(chosen.threshold) >= 0.97)
    assert np.mean(kept) >= 0.9, np.mean(kept)  # an extrapolation: smoothness is assumed, hence less than exact


def test_the_old_rule_does_not_keep_the_promise_on_small_samples():
    """What the rule replaces: the highest threshold reaching the target on 75 scores holds far less often."""
    rng = np.random.default_rng(2)
    kept = [_true_recall(calibration.highest_threshold_reaching(_population(rng, 75), 0.97)) >= 0.97
            for _ in range(300)]
    assert np.mean(kept) < 0.8


def _validation(rng, ct_tumors, ct_healthy, mri_tumors, mri_healthy):
    rows, truth, modality = [], [], []
    for name, count, tumor, mod in (("ct_tumor", ct_tumors, True, "ct"), ("ct_healthy", ct_healthy, False, "ct"),
                                    ("mri_glioma", mri_tumors, True, "mri"),
                                    ("mri_healthy", mri_healthy, False, "mri")):
        for _ in range(count):
            p = np.full(len(CLASSES), 0.01)
            p[CLASSES.index(name)] = rng.uniform(0.5, 0.9)
            rows.append(p / p.sum())
            truth.append(tumor)
            modality.append(mod)
    return np.array(rows), np.array(truth), np.array(modality, dtype=object)


def test_a_modality_gets_its_own_threshold_only_with_enough_validation_scans():
    rng = np.random.default_rng(3)
    probabilities, truth, modality = _validation(rng, ct_tumors=120, ct_healthy=40, mri_tumors=20, mri_healthy=10)
    result = calibration.calibrate(probabilities, truth, modality, target=0.95)
    assert set(result.policy.thresholds) == {"ct"} and set(result.per_modality) == {"ct"}
    assert "20 tumor and 10 healthy" in result.pooled_only["mri"] and "59" in result.pooled_only["mri"]
    report = result.report()
    assert report["min_tumors"] == 59 and report["pooled"]["tumors"] == 140
    few = calibration.calibrate(*_validation(rng, 50, 100, 50, 100), target=0.95)
    assert few.policy.thresholds == {} and set(few.pooled_only) == {"ct", "mri"}


def test_promise_in_words_and_numbers():
    said = calibration.promise(tumors=75, caught=75, healthy=30, flagged_healthy=6)
    assert said["recall_lower_bound"] == pytest.approx(0.05 ** (1 / 75), rel=1e-6)
    assert said["false_alarms_per_100_healthy"] == pytest.approx(20.0)
    low, high = said["false_alarms_interval_per_100"]
    assert low < 20 < high
    assert said["statement"].startswith("At this threshold, recall is at least 0.961 with 95% confidence")
    assert "about 20 of 100 healthy scans are flagged" in said["statement"]
    assert calibration.recall_lower_bound(0, 10) == 0.0
    assert calibration.recall_lower_bound(74, 75) < calibration.recall_lower_bound(75, 75)
