"""The evaluation report: what the evaluate step decided and measured, as `evaluation.json`.

Built once by the evaluate step (components/evaluate.py), read through its attributes by
register, the KFP components and the local runner's summary. On disk it is JSON with one key
per field (sorted; `extra` holds keys of other versions, so that loading and saving loses
nothing); the Kubeflow UI and MLflow's evidence show that file as it is. A report of an older
version loads with the fields it lacks at their empty values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from brainscan import storage
from brainscan.layout import folder_of

FILE_NAME = "evaluation.json"


def file_uri(uri: str) -> str:
    """The report's URI from its own URI or from the folder holding it."""
    return str(uri) if str(uri).endswith(".json") else storage.join(str(uri), FILE_NAME)


@dataclass
class EvaluationReport:
    model_uri: str | None = None
    splits: str | None = None  # the split folder evaluated on (val.csv, test.csv)
    image_size: int | None = None
    target_recall: float | None = None
    threshold: float | None = None  # the pooled decision threshold (brainscan.decision)
    thresholds: dict = field(default_factory=dict)  # per modality, where calibration had enough scans
    threshold_source: str | None = None
    calibration: dict = field(default_factory=dict)  # brainscan.calibration's report of how they were chosen
    promise: dict = field(default_factory=dict)  # what the threshold promises, with its one-sentence statement
    decision: str | None = None  # the decision rule, in words
    dataset_fingerprint: str | None = None
    validation: dict = field(default_factory=dict)  # binary metrics of the decision on the validation split
    test: dict = field(default_factory=dict)  # the same on the test split, with bootstrap CIs
    test_per_modality: dict = field(default_factory=dict)
    per_class: dict = field(default_factory=dict)
    classes: list = field(default_factory=list)
    confusion_matrix: list = field(default_factory=list)  # 7 x 7, rows true, columns predicted
    curves: dict = field(default_factory=dict)  # ROC and PR points
    gate: dict = field(default_factory=dict)  # passed, decided_by, reason, rules, limits
    champion: dict | None = None  # the champion's metrics on the same split, or a note why there are none
    plots: list = field(default_factory=list)  # file names beside the report
    explanations: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they were
    # Where the report is stored (not part of it): set by load, given by evaluate.
    uri: str | None = field(default=None, compare=False)

    @property
    def passed(self) -> bool:
        """Whether the gate passed (no gate: not passed)."""
        return bool((self.gate or {}).get("passed"))

    @property
    def folder(self) -> str | None:
        """The folder holding the report and its plots and explanations (None: not stored)."""
        return folder_of(self.uri) if self.uri else None

    # ------------------------------------------------------------------ the JSON document
    @classmethod
    def from_dict(cls, doc: dict, uri: str | None = None) -> "EvaluationReport":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "uri"}
        return cls(**{k: v for k, v in doc.items() if k in known},
                   extra={k: v for k, v in doc.items() if k not in known}, uri=uri)

    def to_dict(self) -> dict:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "uri")}
        return {**self.extra, **doc}

    @classmethod
    def load(cls, uri: str) -> "EvaluationReport":
        """The report at `uri`: evaluation.json itself or the folder holding it."""
        uri = file_uri(uri)
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri} not found: run `brainscan evaluate` first")
        return cls.from_dict(storage.read_json(uri), uri=uri)

    def save(self, folder: str | Path) -> str:
        """Write the report into `folder` (a URI or a local folder); returns the file's URI."""
        uri = file_uri(str(folder))
        storage.write_json(uri, self.to_dict())
        return uri

    # ------------------------------------------------------------------ the short form
    def summary(self) -> dict:
        """The headline numbers (the CLI's --json line)."""
        test = self.test
        return {
            "report_uri": self.uri, "threshold": self.threshold, "thresholds": self.thresholds,
            "gate_passed": self.passed, "gate_decided_by": self.gate["decided_by"], "gate_reason": self.gate["reason"],
            "recall": test["recall"], "precision": test["precision"], "roc_auc": test["roc_auc"],
            "pr_auc": test["pr_auc"], "f2": test["f2"], "specificity": test["specificity"], "accuracy": test["accuracy"],
            "recall_ci95": test["recall_ci95"], "precision_ci95": test["precision_ci95"],
            "recall_lower_bound": test["recall_lower_bound"], "promise": self.promise.get("statement"),
        }
