"""The tumor decision, in one place: P(tumor), which threshold applies, the decision.

    P(tumor) = 1 - P(ct_healthy) - P(mri_healthy)
    threshold: the calibrated one of the scan's modality where the model has one, else the
               pooled one; the modality is the client's when it says, else the model's own
               CT-vs-MRI call (P(ct_*) >= 0.5)
    tumor = P(tumor) >= threshold

Evaluation (the metrics a model is gated on), the KServe model server, the MLflow pyfunc
(what MLServer, `mlflow models serve` and batch scoring run) all decide through
`DecisionPolicy.decide`, so a scan gets the same answer whichever of them is asked.

Shipped inside the registered MLflow model (see brainscan/pyfunc.py): numpy and the label
schema only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from brainscan.labels import CLASSES, HEALTHY_INDICES, MODALITIES, modality_of

CT_INDICES = tuple(i for i, name in enumerate(CLASSES) if modality_of(name) == "ct")


def check_probabilities(probabilities) -> np.ndarray:
    """float32 [N, 7] in CLASSES order, or ValueError."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(CLASSES):
        raise ValueError(f"expected probabilities of shape [N, {len(CLASSES)}], got {list(probabilities.shape)}")
    return probabilities


def tumor_probability(probabilities) -> np.ndarray:
    """P(tumor) = 1 - P(ct_healthy) - P(mri_healthy), float64 [N], for softmax rows in CLASSES order."""
    probabilities = check_probabilities(probabilities).astype(np.float64)
    return np.clip(1.0 - probabilities[:, list(HEALTHY_INDICES)].sum(axis=1), 0.0, 1.0)


def predicted_modality(probabilities) -> np.ndarray:
    """The model's own modality call per row: "ct" when P(ct_healthy) + P(ct_tumor) >= 0.5, else "mri"."""
    probabilities = check_probabilities(probabilities).astype(np.float64)
    ct = probabilities[:, list(CT_INDICES)].sum(axis=1)
    return np.where(ct >= 0.5, "ct", "mri").astype(object)


def check_modality(modality: str | None) -> str | None:
    if modality in (None, ""):
        return None
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    return modality


@dataclass(frozen=True)
class Decision:
    """One decision per image, with everything that led to it."""

    probabilities: np.ndarray  # float32 [N, 7]
    tumor_probability: np.ndarray  # float64 [N]
    modality: np.ndarray  # object [N]: the modality whose threshold applied
    threshold: np.ndarray  # float64 [N]
    tumor: np.ndarray  # bool [N]
    label: np.ndarray  # object [N]: the most likely of the 7 classes

    def __len__(self) -> int:
        return len(self.tumor)


@dataclass(frozen=True)
class DecisionPolicy:
    """The thresholds of one model: a pooled one, and per modality where calibration allowed one."""

    threshold: float
    thresholds: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        for modality, value in self.thresholds.items():
            check_modality(modality)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"threshold of {modality} must be within [0, 1], got {value}")

    @classmethod
    def from_metadata(cls, metadata: Mapping, override: float | None = None) -> "DecisionPolicy":
        """The policy recorded in a bundle's brainscan_model.json; `override` replaces it with one threshold."""
        if override is not None:
            return cls(float(override))
        threshold = metadata.get("threshold")
        if threshold is None:
            raise ValueError("the model has no calibrated decision threshold ('threshold' is null in "
                             "brainscan_model.json): evaluate and register it, or give a threshold explicitly")
        thresholds = metadata.get("thresholds") or {}
        return cls(float(threshold), {str(k): float(v) for k, v in thresholds.items()})

    def to_metadata(self) -> dict:
        return {"threshold": float(self.threshold), "thresholds": {k: float(v) for k, v in self.thresholds.items()}}

    def threshold_for(self, modality: str | None) -> float:
        return float(self.thresholds.get(modality, self.threshold)) if modality else float(self.threshold)

    def decide(self, probabilities, modality: str | Sequence[str | None] | None = None) -> Decision:
        """Decide for softmax rows [N, 7]; `modality`: the client's, one for all rows or one per row."""
        probabilities = check_probabilities(probabilities)
        scores = tumor_probability(probabilities)
        if modality is None or isinstance(modality, str):
            given = [check_modality(modality)] * len(scores)
        else:
            given = [check_modality(m) for m in modality]
            if len(given) != len(scores):
                raise ValueError(f"{len(given)} modalities for {len(scores)} images")
        own = predicted_modality(probabilities) if self.thresholds else [None] * len(scores)
        used = np.array([g or o for g, o in zip(given, own)], dtype=object)
        thresholds = np.array([self.threshold_for(m) for m in used], dtype=np.float64)
        labels = np.array([CLASSES[i] for i in probabilities.argmax(axis=1)], dtype=object)
        return Decision(probabilities=probabilities, tumor_probability=scores, modality=used,
                        threshold=thresholds, tumor=scores >= thresholds, label=labels)
