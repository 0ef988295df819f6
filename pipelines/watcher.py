"""Automated retraining: retrain exactly when the data (or its labels) changed.

`check(source)` compares the source's dataset fingerprint with the tag on the champion model
version (the fingerprint steps, components/fingerprint.py); `watch` repeats the check on an
interval and starts a run (on the cluster, or locally) when they differ.

Made to run for weeks against any S3 store (the in-cluster watcher, infra/k8s/retrain/):
- a check lists the source first and reads its images only when the listing changed (keys, sizes
  and ETags on S3; paths, sizes and modification times in a folder), so an unchanged bucket costs
  one LIST request, not a download of the dataset;
- an upload in progress changes the data from check to check: a run starts only once the same
  data was seen on `settle_checks` checks in a row, so N uploaded images start one run, not N;
- one run per data version, even across restarts: on a cluster the run is named after the
  fingerprint and not submitted again when the KFP API already has it (cli);
- never stuck in silence: every call it makes has a timeout (KFP requests: kfp_client; S3:
  brainscan.storage; MLflow: brainscan.registry), a call that fails or times out is logged and the
  next check tries again, and the loop touches a heartbeat file at every check and while it reads
  images, so that a liveness probe (`brainscan retrain alive`) restarts a watcher that stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from brainscan import heartbeat as liveness
from brainscan.config import MODEL_NAME, WATCH
from brainscan.redact import redact
from components.fingerprint import champion_fingerprint, source_fingerprint

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


def check(source: str, model_name: str = MODEL_NAME, tracking_uri: str | None = None,
          progress: Callable[[], object] | None = None) -> RetrainDecision:
    """Is a retrain due? Yes when there is no champion or its data differs from the source's.

    tracking_uri: default MLFLOW_TRACKING_URI, else the embedded sqlite (see register). progress: called
    after each image read (the heartbeat).
    """
    fingerprint = source_fingerprint(source, progress)
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
    """What a log line shows of an error: its first line, without credentials in the URIs it names."""
    return redact(str(err).splitlines()[0]) if str(err).strip() else type(err).__name__


def _beat(heartbeat: str | Path | None) -> None:
    """Touch the heartbeat; a failure is logged (the probe then restarts the watcher), not raised."""
    if heartbeat is None:
        return
    try:
        liveness.beat(heartbeat)
    except OSError as err:
        log.error("cannot touch the heartbeat %s: %s", heartbeat, _first_line(err))


def watch(source: str, on_change: Callable[[RetrainDecision], object], interval_s: float = WATCH.interval_s,
          model_name: str = MODEL_NAME, max_checks: int | None = None, settle_checks: int = WATCH.settle_checks,
          heartbeat: str | Path | None = None) -> int:
    """Check every `interval_s` seconds; call `on_change` (submit a run / run locally) when due.

    Returns the number of runs started. A run starts once the source showed the same data on
    `settle_checks` checks in a row (an upload still going on changes it from check to check), and
    a fingerprint already acted on is not started again while its run is still going (the
    champion's tag only moves when the run finishes). A watcher outlives outages: a check that
    fails (source or MLflow unreachable) or a run that cannot start is logged, and the next check
    tries again. `heartbeat`: a file touched before the first check (an unwritable one fails here),
    after each check and each start, and after every image a check reads.
    """
    if settle_checks < 1:
        raise ValueError(f"settle_checks must be 1 or more, got {settle_checks}")
    if heartbeat is not None:
        liveness.beat(heartbeat)
    progress = (lambda: _beat(heartbeat)) if heartbeat is not None else None
    started, checks, last_started = 0, 0, None
    seen, seen_times = None, 0  # the fingerprint of the latest checks, and on how many in a row
    while max_checks is None or checks < max_checks:
        checks += 1
        try:
            decision = check(source, model_name=model_name, progress=progress)
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
                _beat(heartbeat)  # the check is done: the start gets a whole max age of its own
                try:
                    on_change(decision)
                except Exception as err:  # noqa: BLE001 - retried at the next check
                    log.error("starting a run for %s failed (retried at the next check): %s",
                              decision.fingerprint[:12], _first_line(err))
                else:
                    started += 1
                    last_started = decision.fingerprint
        _beat(heartbeat)
        if max_checks is None or checks < max_checks:
            time.sleep(interval_s)
    return started
