"""Automated retraining: retrain exactly when the data (or its labels) changed.

The dataset fingerprint is the sha256 of the sorted `sha256,class7` lines of the images
(the same definition ingest uses, see docs/internals.md). `check(source)` compares the
source's fingerprint with the tag on the champion model version; `watch` repeats the check
on an interval and starts a run (on the cluster, or locally) when they differ.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from brainscan import labels, registry
from brainscan.components import ingest
from brainscan.config import MODEL_NAME
from brainscan.dataset import fingerprint_of

log = logging.getLogger(__name__)


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


def source_fingerprint(source: str) -> str:
    """Fingerprint of a source read in place (folder, .zip, s3:// prefix, kaggle:OWNER/DATASET).

    Uses ingest's own source reader and fingerprint function, so the value equals what ingest
    records for the same data (and thus the champion's tag) by construction.
    """
    scratch = Path(tempfile.mkdtemp(prefix="brainscan-fingerprint-"))
    try:
        items, _ignored = ingest.open_source(str(source), scratch, ingest.ZipLimits())
        rows = []
        for item in items:
            rows.append({"sha256": hashlib.sha256(item.read()).hexdigest(),
                         "class7": labels.label_from_path(item.rel)[1]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not rows:
        raise ValueError(f"no images under {source!r}")
    return fingerprint_of(rows)


def champion_fingerprint(model_name: str = MODEL_NAME, tracking_uri: str | None = None
                         ) -> tuple[str | None, str | None]:
    """(fingerprint tag, version) of the champion, or (None, None) when there is none yet.

    Read through the registry's champion lookup: the tag register writes is the tag compared here.
    """
    info = registry.champion_info(model_name, tracking_uri=tracking_uri)
    if info is None:
        return None, None
    return info["dataset_fingerprint"] or None, str(info["version"])


def check(source: str, model_name: str = MODEL_NAME, tracking_uri: str | None = None) -> RetrainDecision:
    """Is a retrain due? Yes when there is no champion or its data differs from the source's.

    tracking_uri: default MLFLOW_TRACKING_URI, else the embedded sqlite (see register).
    """
    fingerprint = source_fingerprint(source)
    champion, version = champion_fingerprint(model_name, tracking_uri)
    if version is None:
        retrain, message = True, f"no champion for {model_name!r} yet: retrain"
    elif champion != fingerprint:
        retrain, message = True, (f"data changed since champion v{version} "
                                  f"({(champion or 'untagged')[:12]} -> {fingerprint[:12]}): retrain")
    else:
        retrain, message = False, f"champion v{version} was trained on this data ({fingerprint[:12]}): nothing to do"
    return RetrainDecision(source, fingerprint, champion, version, retrain, message)


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err).strip() else type(err).__name__


def watch(source: str, on_change: Callable[[RetrainDecision], object], interval_s: float = 300,
          model_name: str = MODEL_NAME, max_checks: int | None = None) -> int:
    """Check every `interval_s` seconds; call `on_change` (submit a run / run locally) when due.

    Returns the number of runs started. A fingerprint already acted on is not started again
    while its run is still going (the champion's tag only moves when the run finishes).
    A watcher outlives outages: a check that fails (source or MLflow unreachable) or a run
    that cannot start is logged, and the next check tries again.
    """
    started, checks, last_started = 0, 0, None
    while max_checks is None or checks < max_checks:
        checks += 1
        try:
            decision = check(source, model_name=model_name)
        except Exception as err:  # noqa: BLE001 - any failure of one check must not end the watch
            log.error("check %d failed: %s", checks, _first_line(err))
        else:
            log.info(decision.message)
            if decision.retrain and decision.fingerprint != last_started:
                try:
                    on_change(decision)
                except Exception as err:  # noqa: BLE001 - retried at the next check
                    log.error("starting a run for %s failed (retried at the next check): %s",
                              decision.fingerprint[:12], _first_line(err))
                else:
                    started += 1
                    last_started = decision.fingerprint
        if max_checks is None or checks < max_checks:
            time.sleep(interval_s)
    return started
