"""Evaluate a model bundle: recall-first metrics, a validation-calibrated threshold, and a gate.

The tumor decision is brainscan.decision's: P(tumor) = 1 - P(ct_healthy) - P(mri_healthy)
against the threshold of the scan's modality (the model's own CT/MRI call, as the servers
make it) where the model has one, else the pooled one. Thresholds are calibrated on the
VALIDATION split only, by brainscan.calibration's rule: the highest threshold whose recall is
at least the target with 95% confidence, per modality only where that modality has enough
validation scans. The test split only measures, and it measures the decision the servers will
make (`DecisionPolicy.decide`): recall with its one-sided 95% lower bound (what the gate
checks), precision, bootstrap 95% CIs, and the promise in one sentence.

Writes {out}/evaluation.json, confusion_matrix.png, roc_curve.png, pr_curve.png and
explanations/*.png. A failed gate is a result (gate.passed false), not an exception.
"""

from __future__ import annotations

import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.metrics import (average_precision_score, confusion_matrix, precision_recall_curve, roc_auc_score,
                             roc_curve)

from brainscan import calibration
from brainscan import explain as explanations_of
from brainscan import storage
from brainscan.config import CHAMPION_TOLERANCE, DEFAULTS
from brainscan.dataset import read_split, splits_fingerprint
from brainscan.evaluation_report import EvaluationReport, file_uri
from brainscan.labels import CLASSES, MODALITIES, is_tumor
from brainscan.modelstore import BundleError, ModelBundle, load_bundle

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- metrics on score arrays
def binary_metrics(y_true, scores, threshold) -> dict:
    """Recall-first metrics of the decision scores >= threshold (one threshold, or one per image)."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    per_image = np.ndim(threshold) > 0
    pred = scores >= np.asarray(threshold, dtype=np.float64)
    tp = int(np.sum(pred & y_true)); fp = int(np.sum(pred & ~y_true))
    fn = int(np.sum(~pred & y_true)); tn = int(np.sum(~pred & ~y_true))
    recall = tp / (tp + fn) if tp + fn else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    specificity = tn / (tn + fp) if tn + fp else float("nan")
    f2 = (5 * precision * recall / (4 * precision + recall)) if tp else 0.0
    both = 0 < y_true.sum() < len(y_true)
    return {
        "threshold": None if per_image else float(threshold), "n": int(len(y_true)), "tumor": int(y_true.sum()),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "recall": recall, "recall_lower_bound": calibration.recall_lower_bound(tp, tp + fn),
        "precision": precision, "specificity": specificity, "f2": f2,
        "accuracy": (tp + tn) / len(y_true) if len(y_true) else float("nan"),
        "roc_auc": float(roc_auc_score(y_true, scores)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y_true, scores)) if both else float("nan"),
    }


def bootstrap_ci(y_true, scores, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """Percentile 95% intervals of recall and precision at fixed thresholds (resampling images)."""
    y_true = np.asarray(y_true).astype(bool)
    pred = np.asarray(scores, dtype=np.float64) >= np.asarray(threshold, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y_true), size=(n_boot, len(y_true)))
    t, p = y_true[idx], pred[idx]
    tp = (t & p).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / t.sum(axis=1)
        precision = tp / p.sum(axis=1)

    def interval(values):
        values = values[np.isfinite(values)]
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None

    return {"recall_ci95": interval(recall), "precision_ci95": interval(precision), "n_boot": n_boot}


def per_class_metrics(class_idx, probabilities, tumor_flag) -> tuple[dict, list]:
    """Per class: 7-way recall/precision (argmax) and the share flagged as tumor; the 7x7 confusion matrix."""
    class_idx = np.asarray(class_idx)
    predicted = np.argmax(probabilities, axis=1)
    matrix = confusion_matrix(class_idx, predicted, labels=list(range(len(CLASSES))))
    out = {}
    for i, name in enumerate(CLASSES):
        support = int(matrix[i].sum()); predicted_as = int(matrix[:, i].sum())
        members = class_idx == i
        out[name] = {
            "support": support,
            "recall": matrix[i, i] / support if support else None,
            "precision": matrix[i, i] / predicted_as if predicted_as else None,
            # The clinical view: of this class, how many the binary decision calls tumor.
            "flagged_tumor": float(np.mean(tumor_flag[members])) if support else None,
        }
    return out, matrix.tolist()


def roc_points(y_true, scores, max_points: int = 200) -> dict:
    y_true = np.asarray(y_true).astype(bool)
    if not 0 < y_true.sum() < len(y_true):
        return {"roc": [], "pr": []}
    fpr, tpr, thr = roc_curve(y_true, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(max_points, len(fpr))).astype(int))
    prec, rec, pthr = precision_recall_curve(y_true, scores)
    pkeep = np.unique(np.linspace(0, len(pthr) - 1, min(max_points, len(pthr))).astype(int))
    return {
        "roc": [{"fpr": float(fpr[i]), "tpr": float(tpr[i]), "threshold": float(min(thr[i], 1.0))} for i in keep],
        "pr": [{"precision": float(prec[i]), "recall": float(rec[i]), "threshold": float(pthr[i])} for i in pkeep],
    }


def gate_decision(test: dict, min_recall: float, min_auc: float, champion: dict | None, tolerance: float) -> dict:
    """Rules in order (recall first); the first that fails decides, else all passed.

    min_recall is checked against the recall the test split can promise: its one-sided 95% lower bound.
    """
    bound = test["recall_lower_bound"]
    rules = [
        {"rule": "min_recall", "value": bound, "limit": min_recall, "passed": bool(bound >= min_recall),
         "text": f"test recall lower bound (95%) {bound:.4f} {'>=' if bound >= min_recall else '<'} {min_recall} "
                 f"(test recall {test['recall']:.4f})"},
        {"rule": "min_auc", "value": test["roc_auc"], "limit": min_auc,
         "passed": bool(test["roc_auc"] >= min_auc),
         "text": f"test ROC-AUC {test['roc_auc']:.4f} {'>=' if test['roc_auc'] >= min_auc else '<'} {min_auc}"},
    ]
    if champion is not None and champion.get("test"):
        for key, label in (("recall", "recall"), ("roc_auc", "ROC-AUC")):
            limit = champion["test"][key] - tolerance
            ok = bool(test[key] >= limit)
            rules.append({"rule": f"champion_{key}", "value": test[key], "limit": limit, "passed": ok,
                          "champion": champion["test"][key], "tolerance": tolerance,
                          "text": f"candidate {label} {test[key]:.4f} {'>=' if ok else '<'} champion "
                                  f"{champion['test'][key]:.4f} - tolerance {tolerance}"})
    failed = [r for r in rules if not r["passed"]]
    decided = failed[0] if failed else rules[-1]
    reason = (f"FAILED: {decided['text']}" if failed else
              "passed: " + "; ".join(r["text"] for r in rules))
    if champion is not None and not champion.get("test"):
        reason += f" (no champion comparison: {champion.get('note')})"
    return {"passed": not failed, "decided_by": decided["rule"], "reason": reason, "rules": rules,
            "min_recall": min_recall, "min_auc": min_auc, "tolerance": tolerance}


# ----------------------------------------------------------------------------- images and scores
SPLIT_COLUMNS = ("path", "class7", "modality")  # evaluation reports per modality


def read_images(paths) -> list[bytes]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(storage.read_bytes, paths))


def predict_files(bundle: ModelBundle, files: list[bytes], batch_size: int = 32) -> np.ndarray:
    """[N, 7] probabilities of encoded image files, preprocessed by the shared function with the
    bundle's own options (ModelBundle.preprocess)."""
    parts = [bundle.predict(bundle.preprocess(files[start:start + batch_size]), batch_size)
             for start in range(0, len(files), batch_size)]
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, len(CLASSES)), np.float32)


def tumor_truth(frame) -> np.ndarray:
    return frame["class7"].map(is_tumor).to_numpy(dtype=bool)


def calibrate(frame, probabilities, target_recall: float) -> calibration.Calibration:
    """The decision policy from validation scores (brainscan.calibration's rule)."""
    return calibration.calibrate(probabilities, tumor_truth(frame), frame["modality"].to_numpy(), target_recall)


# ----------------------------------------------------------------------------- plots
def _plots(folder: Path, test_y, test_scores, threshold, matrix, curves) -> list[str]:
    """Confusion matrix, ROC and PR curves; `threshold` is the served decision's, one per image."""
    # pyplot needs its headless backend chosen before the import; only when plots are drawn
    import matplotlib

    matrix = np.asarray(matrix)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    names = []
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted"); ax.set_ylabel("true"); ax.set_title("Test confusion matrix (7 classes)")
    fig.tight_layout(); fig.savefig(folder / "confusion_matrix.png", dpi=100); plt.close(fig)
    names.append("confusion_matrix.png")

    y = np.asarray(test_y).astype(bool)
    pred = np.asarray(test_scores) >= np.asarray(threshold)
    marker = f"threshold {float(np.min(threshold)):.4g}" + ("" if np.ndim(threshold) == 0 or np.ptp(threshold) == 0
                                                            else f"-{float(np.max(threshold)):.4g} by modality")
    recall = (pred & y).sum() / max(y.sum(), 1)
    fpr_at = (pred & ~y).sum() / max((~y).sum(), 1)
    precision = (pred & y).sum() / max(pred.sum(), 1)
    if 0 < y.sum() < len(y):
        fpr, tpr, _ = roc_curve(y, test_scores)
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot(fpr, tpr, label=f"ROC (AUC {curves['roc_auc']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.scatter([fpr_at], [recall], color="red", zorder=3, label=marker)
        ax.set_xlabel("false positive rate"); ax.set_ylabel("recall (tumor)"); ax.set_title("Test ROC, P(tumor)")
        ax.legend(loc="lower right"); fig.tight_layout(); fig.savefig(folder / "roc_curve.png", dpi=100); plt.close(fig)
        prec, rec, _ = precision_recall_curve(y, test_scores)
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.plot(rec, prec, label=f"PR (AP {curves['pr_auc']:.3f})")
        ax.scatter([recall], [precision], color="red", zorder=3, label=marker)
        ax.set_xlabel("recall (tumor)"); ax.set_ylabel("precision"); ax.set_title("Test precision-recall, P(tumor)")
        ax.legend(loc="lower left"); fig.tight_layout(); fig.savefig(folder / "pr_curve.png", dpi=100); plt.close(fig)
        names += ["roc_curve.png", "pr_curve.png"]
    return names


def _explanations(folder: Path, bundle, frame, files, probabilities, lime_images: int = 2) -> list[str]:
    """Grad-CAM over one correct and one wrong test image of each class; LIME for a few."""
    (folder / "explanations").mkdir(exist_ok=True)
    predicted = np.argmax(probabilities, axis=1)
    truth = frame["class7"].map(CLASSES.index).to_numpy()
    chosen = []
    for i, name in enumerate(CLASSES):
        for outcome, mask in (("correct", (truth == i) & (predicted == i)), ("wrong", (truth == i) & (predicted != i))):
            rows = np.flatnonzero(mask)
            if len(rows):
                chosen.append((int(rows[0]), f"{name}_{outcome}"))
    written = []
    if not chosen:
        return written
    x = bundle.preprocess([files[r] for r, _ in chosen])  # the model's own input (its crop, if any)
    heat, probs = explanations_of.gradcam(bundle.model, x)
    for k, (row, tag) in enumerate(chosen):
        p = int(np.argmax(probs[k]))
        png = explanations_of.overlay_png(explanations_of.shown_image(bundle, files[row], x[k]), heat[k],
                                          title=f"true {CLASSES[truth[row]]} / pred {CLASSES[p]} {probs[k, p]:.2f}")
        name = f"explanations/gradcam_{tag}.png"
        (folder / name).write_bytes(png)
        written.append(name)
    for k, (row, tag) in enumerate(chosen[:lime_images]):
        name = f"explanations/lime_{tag}.png"
        (folder / name).write_bytes(explanations_of.lime_png(bundle, x[k]))
        written.append(name)
    return written


# ----------------------------------------------------------------------------- the step
def _champion_scores(champion: str, frame, files, y, target_recall: float, val_frame, val_files) -> dict:
    """The champion's metrics on the same test split (missing champion: a note, no comparison)."""
    try:
        bundle = load_bundle(champion)
    except BundleError as err:
        log.info("no champion to compare with: %s", err)
        return {"uri": champion, "note": str(err).splitlines()[0], "test": None}
    try:
        policy = bundle.policy()
    except ValueError:  # an uncalibrated champion: calibrate it the same way, on validation
        policy = calibrate(val_frame, predict_files(bundle, val_files), target_recall).policy
    decision = policy.decide(predict_files(bundle, files))
    return {"uri": champion, "version": bundle.metadata.get("registered_version"), "threshold": policy.threshold,
            "thresholds": dict(policy.thresholds), "test": binary_metrics(y, decision.tumor_probability,
                                                                          decision.threshold)}


def evaluate(model, splits: str, out: str, target_recall: float = DEFAULTS.target_recall,
             min_recall: float = DEFAULTS.min_recall, min_auc: float = DEFAULTS.min_auc, champion: str | None = None,
             tolerance: float = CHAMPION_TOLERANCE, explain: bool = True, n_boot: int = 1000) -> EvaluationReport:
    """Evaluate a bundle (URI or ModelBundle) on {splits}/val.csv and {splits}/test.csv; write the report to out."""
    bundle = model if isinstance(model, ModelBundle) else load_bundle(str(model))
    val_frame, test_frame = read_split(splits, "val", SPLIT_COLUMNS), read_split(splits, "test", SPLIT_COLUMNS)

    log.info("evaluate: scoring %d validation and %d test images", len(val_frame), len(test_frame))
    val_files, test_files = read_images(val_frame["path"]), read_images(test_frame["path"])
    val_probs = predict_files(bundle, val_files)
    test_probs = predict_files(bundle, test_files)
    val_y, test_y = tumor_truth(val_frame), tumor_truth(test_frame)

    # Calibrated on validation only; the test split never moves a threshold.
    calibrated = calibrate(val_frame, val_probs, target_recall)
    policy = calibrated.policy
    val_decision, test_decision = policy.decide(val_probs), policy.decide(test_probs)
    test_scores = test_decision.tumor_probability

    validation = binary_metrics(val_y, val_decision.tumor_probability, val_decision.threshold)
    test = binary_metrics(test_y, test_scores, test_decision.threshold)
    test.update(bootstrap_ci(test_y, test_scores, test_decision.threshold, n_boot=n_boot))
    promised = calibration.promise(test["tumor"], test["tp"], test["n"] - test["tumor"], test["fp"])
    per_modality = {}
    for modality in MODALITIES:
        rows = (test_frame["modality"] == modality).to_numpy()
        if rows.any():
            per_modality[modality] = binary_metrics(test_y[rows], test_scores[rows], test_decision.threshold[rows])
    per_class, matrix = per_class_metrics(test_frame["class7"].map(CLASSES.index).to_numpy(), test_probs,
                                          test_decision.tumor)

    champion_report = None
    if champion:
        champion_report = _champion_scores(champion, test_frame, test_files, test_y, target_recall, val_frame, val_files)
    gate = gate_decision(test, min_recall, min_auc, champion_report, tolerance)
    log.info("evaluate: threshold %.4g (per modality %s); test recall %.4f precision %.4f ROC-AUC %.4f; gate %s; %s",
             policy.threshold, dict(policy.thresholds), test["recall"], test["precision"], test["roc_auc"],
             gate["reason"], promised["statement"])

    report = EvaluationReport(
        model_uri=bundle.uri, splits=str(splits), image_size=bundle.image_size, target_recall=target_recall,
        **policy.to_metadata(), threshold_source="validation split", calibration=calibrated.report(),
        promise=promised,
        decision="P(tumor) >= the threshold of the scan's modality (the model's own CT/MRI call) where "
                 "`thresholds` has one, else `threshold` (brainscan.decision)",
        dataset_fingerprint=splits_fingerprint(splits) or bundle.metadata.get("dataset_fingerprint"),
        validation=validation, test=test, test_per_modality=per_modality, per_class=per_class,
        classes=list(CLASSES), confusion_matrix=matrix, curves=roc_points(test_y, test_scores), gate=gate,
        champion=champion_report, uri=file_uri(str(out)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        report.plots = _plots(folder, test_y, test_scores, test_decision.threshold, matrix, test)
        report.explanations = _explanations(folder, bundle, test_frame, test_files, test_probs) if explain else []
        report.save(folder)
        if storage.is_s3(str(out)):
            storage.upload_dir(folder, str(out))
        else:
            storage.download_dir(str(folder), str(out))  # a local copy of the folder
    return report
