"""Automated retraining: retrain exactly when the data (or its labels) changed.

The dataset fingerprint is the sha256 of the sorted `sha256,class7` lines of the images
(the same definition ingest uses, see docs/internals.md). `check(source)` compares the
source's fingerprint with the tag on the champion model version; `watch` repeats the check
on an interval and starts a run (on the cluster, or locally) when they differ.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from brainscan import labels, storage

log = logging.getLogger(__name__)

FINGERPRINT_TAGS = ("dataset_fingerprint", "brainscan.dataset_fingerprint", "fingerprint")


@dataclass
class RetrainDecision:
    source: str
    fingerprint: str
    champion_fingerprint: str | None
    champion_version: str | None
    retrain: bool
    message: str

    def summary(self) -> dict:
        return asdict(self)


def _labelled(path: str) -> str | None:
    """class7 of an image path in the archive layout, None for anything else (read-me files, masks)."""
    try:
        return labels.label_from_path(path)[1]
    except labels.UnknownLabelError:
        return None


def _fingerprint(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def source_fingerprint(source: str) -> str:
    """Fingerprint of a source without copying it: a folder, an S3 prefix or a zip archive."""
    try:  # ingest owns the definition; use its function when it offers one
        from brainscan.components import ingest as ingest_module
        if hasattr(ingest_module, "source_fingerprint"):
            return ingest_module.source_fingerprint(source)
    except ImportError:
        pass
    lines = []
    if str(source).lower().endswith(".zip"):
        data = storage.read_bytes(source) if storage.is_s3(source) else Path(source).read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                class7 = None if info.is_dir() else _labelled(info.filename)
                if class7:
                    lines.append(f"{hashlib.sha256(archive.read(info)).hexdigest()},{class7}")
    else:
        if not storage.is_s3(source) and not Path(source).is_dir():
            raise FileNotFoundError(f"source {source!r} is neither a folder, an s3:// prefix nor a .zip file")
        for uri, _ in storage.list_files(source):
            class7 = _labelled(uri)
            if class7:
                lines.append(f"{hashlib.sha256(storage.read_bytes(uri)).hexdigest()},{class7}")
    if not lines:
        raise ValueError(f"no labelled images under {source!r} (expected the Kaggle archive layout)")
    return _fingerprint(lines)


def champion_fingerprint(model_name: str = "brain-tumor") -> tuple[str | None, str | None]:
    """(fingerprint tag, version) of the champion, or (None, None) when there is none yet."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None, None
    tags = version.tags or {}
    for key in FINGERPRINT_TAGS:
        if tags.get(key):
            return tags[key], str(version.version)
    return None, str(version.version)


def check(source: str, model_name: str = "brain-tumor") -> RetrainDecision:
    """Is a retrain due? Yes when there is no champion or its data differs from the source's."""
    fingerprint = source_fingerprint(source)
    champion, version = champion_fingerprint(model_name)
    if version is None:
        retrain, message = True, f"no champion for {model_name!r} yet: retrain"
    elif champion != fingerprint:
        retrain, message = True, (f"data changed since champion v{version} "
                                  f"({(champion or 'untagged')[:12]} -> {fingerprint[:12]}): retrain")
    else:
        retrain, message = False, f"champion v{version} was trained on this data ({fingerprint[:12]}): nothing to do"
    return RetrainDecision(source, fingerprint, champion, version, retrain, message)


def watch(source: str, on_change: Callable[[RetrainDecision], object], interval_s: float = 300,
          model_name: str = "brain-tumor", max_checks: int | None = None) -> int:
    """Check every `interval_s` seconds; call `on_change` (submit a run / run locally) when due.

    Returns the number of runs started. A fingerprint already acted on is not started again
    while its run is still going (the champion's tag only moves when the run finishes).
    """
    started, checks, last_started = 0, 0, None
    while max_checks is None or checks < max_checks:
        checks += 1
        try:
            decision = check(source, model_name=model_name)
        except (FileNotFoundError, ValueError) as err:
            log.error("check failed: %s", err)
        else:
            log.info(decision.message)
            if decision.retrain and decision.fingerprint != last_started:
                on_change(decision)
                started += 1
                last_started = decision.fingerprint
        if max_checks is None or checks < max_checks:
            time.sleep(interval_s)
    return started
