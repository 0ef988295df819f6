"""Automated retraining: retrain exactly when the data (or its labels) changed.

The dataset fingerprint is the sha256 of the sorted `sha256,class7` lines of the images
(the same definition ingest uses, see docs/internals.md). `check(source)` compares the
source's fingerprint with the tag on the champion model version; `watch` repeats the check
on an interval and starts a run (on the cluster, or locally) when they differ.

Made to run for weeks against any S3 store (the in-cluster watcher, infra/k8s/retrain/):
- a check lists the source first and reads its images only when the listing changed (keys, sizes
  and ETags on S3; paths, sizes and modification times in a folder), so an unchanged bucket costs
  one LIST request, not a download of the dataset;
- an upload in progress changes the data from check to check: a run starts only once the same
  data was seen on `settle_checks` checks in a row, so N uploaded images start one run, not N;
- one run per data version, even across restarts: on a cluster the run is named after the
  fingerprint and not submitted again when the KFP API already has it (brainscan.cli).
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

from brainscan import labels, registry, storage
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


# source -> (listing signature, fingerprint) of the last time its images were read
_LAST_READ: dict[str, tuple[str, str]] = {}


def listing_signature(source: str) -> str | None:
    """sha256 of what a listing shows of a source (no image read): S3 keys, sizes and ETags; a folder's
    paths, sizes and modification times; a .zip's size and time. None where there is no such listing
    (kaggle:): the fingerprint is then always computed."""
    source = str(source)
    digest = hashlib.sha256()
    if storage.is_s3(source):
        bucket, key = storage.parse_s3(source)
        prefix = key.rstrip("/") + "/" if key else ""
        for page in storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                digest.update(f"{obj['Key']}\t{obj['Size']}\t{obj.get('ETag', '')}\n".encode())
        return digest.hexdigest()
    path = Path(source).expanduser()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = item.stat()
            digest.update(f"{item.relative_to(path).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    if path.is_file():
        stat = path.stat()
        digest.update(f"{stat.st_size}\t{stat.st_mtime_ns}".encode())
        return digest.hexdigest()
    return None


def source_fingerprint(source: str) -> str:
    """Fingerprint of a source read in place (folder, .zip, s3:// prefix, kaggle:OWNER/DATASET).

    Uses ingest's own source reader and fingerprint function, so the value equals what ingest
    records for the same data (and thus the champion's tag) by construction. The images are read
    again only when the source's listing changed since this process last read them.
    """
    signature = listing_signature(source)
    if signature is not None and _LAST_READ.get(str(source), (None, None))[0] == signature:
        return _LAST_READ[str(source)][1]
    fingerprint = _read_fingerprint(source)
    if signature is not None:
        _LAST_READ[str(source)] = (signature, fingerprint)
    return fingerprint


def _read_fingerprint(source: str) -> str:
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


def run_name(fingerprint: str, prefix: str = "brainscan-retrain") -> str:
    """The name of the run that retrains on one data version: the same data, the same name."""
    return f"{prefix}-{fingerprint[:16]}"


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err).strip() else type(err).__name__


def watch(source: str, on_change: Callable[[RetrainDecision], object], interval_s: float = 300,
          model_name: str = MODEL_NAME, max_checks: int | None = None, settle_checks: int = 2) -> int:
    """Check every `interval_s` seconds; call `on_change` (submit a run / run locally) when due.

    Returns the number of runs started. A run starts once the source showed the same data on
    `settle_checks` checks in a row (an upload still going on changes it from check to check), and
    a fingerprint already acted on is not started again while its run is still going (the
    champion's tag only moves when the run finishes). A watcher outlives outages: a check that
    fails (source or MLflow unreachable) or a run that cannot start is logged, and the next check
    tries again.
    """
    if settle_checks < 1:
        raise ValueError(f"settle_checks must be 1 or more, got {settle_checks}")
    started, checks, last_started = 0, 0, None
    seen, seen_times = None, 0  # the fingerprint of the latest checks, and on how many in a row
    while max_checks is None or checks < max_checks:
        checks += 1
        try:
            decision = check(source, model_name=model_name)
        except Exception as err:  # noqa: BLE001 - any failure of one check must not end the watch
            log.error("check %d failed: %s", checks, _first_line(err))
        else:
            log.info(decision.message)
            seen_times = seen_times + 1 if decision.fingerprint == seen else 1
            seen = decision.fingerprint
            if decision.retrain and decision.fingerprint != last_started and seen_times < settle_checks:
                log.info("data %s seen on %d check(s) in a row: waiting for %d before starting a run",
                         decision.fingerprint[:12], seen_times, settle_checks)
            elif decision.retrain and decision.fingerprint != last_started:
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
