"""Talk to a Kubeflow Pipelines backend with `kfp.Client`: upload, run, schedule.

The pipeline is compiled on the fly (same YAML as `brainscan pipeline compile`), so what is
uploaded always matches the code. Authentication, for a multi-user Kubeflow: where the pod has a
projected service-account token for the KFP API (audience `pipelines.kubeflow.org`, at
$KF_PIPELINES_SA_TOKEN_PATH or /var/run/secrets/kubeflow/pipelines/token), every request carries
it, re-read as the kubelet rotates it. (`kfp.Client` itself attaches none once a host is given.)
Nothing here prints credentials. Every request fails after `timeout_s` (brainscan.config.KFP_TIMEOUT_S)
without a connection or an answer, where `kfp.Client` alone would wait forever (kfp_compat).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import kfp
from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH, ServiceAccountTokenVolumeCredentials

from brainscan.config import EXPERIMENT, KFP_TIMEOUT_S, PIPELINE_NAME, RETRAIN_PIPELINE_NAME
from pipelines.kfp_compat import with_request_timeout
from pipelines.pipeline import compile_pipeline

DEFAULT_EXPERIMENT = EXPERIMENT


@dataclass
class KfpResult:
    action: str
    host: str
    pipeline_id: str | None = None
    version_id: str | None = None
    run_id: str | None = None
    recurring_run_id: str | None = None
    experiment_id: str | None = None
    name: str | None = None

    def summary(self) -> dict:
        return asdict(self)


def token_path() -> Path:
    return Path(os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH)


def _client(host: str, namespace: str | None = None, timeout_s: float = KFP_TIMEOUT_S):
    credentials = ServiceAccountTokenVolumeCredentials(str(token_path())) if token_path().is_file() else None
    client = kfp.Client(host=host, namespace=namespace or "kubeflow", credentials=credentials)
    return with_request_timeout(client, timeout_s, timeout_s)


def _compiled(which: str, folder: str) -> str:
    return compile_pipeline(Path(folder) / f"{which}.yaml", which=which)


def _pipeline_name(which: str) -> str:
    return RETRAIN_PIPELINE_NAME if which == "retrain" else PIPELINE_NAME


def upload(host: str, which: str = "train", version: str | None = None, namespace: str | None = None,
           timeout_s: float = KFP_TIMEOUT_S) -> KfpResult:
    """Upload the pipeline, or a new version of it when a pipeline of that name exists."""
    client = _client(host, namespace, timeout_s)
    name = _pipeline_name(which)
    version = version or time.strftime("v%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory() as folder:
        package = _compiled(which, folder)
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            pipeline = client.upload_pipeline(package, pipeline_name=name,
                                              description="brainscan tumor detector training pipeline")
            pipeline_id = pipeline.pipeline_id
        created = client.upload_pipeline_version(package, pipeline_version_name=version, pipeline_id=pipeline_id)
    return KfpResult("upload", host, pipeline_id=pipeline_id, version_id=created.pipeline_version_id, name=version)


def submit(host: str, arguments: dict | None = None, which: str = "train", experiment: str = DEFAULT_EXPERIMENT,
           run_name: str | None = None, namespace: str | None = None, timeout_s: float = KFP_TIMEOUT_S) -> KfpResult:
    """Start one run of the pipeline with these parameter values."""
    client = _client(host, namespace, timeout_s)
    run_name = run_name or f"{_pipeline_name(which)}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as folder:
        result = client.create_run_from_pipeline_package(_compiled(which, folder), arguments=arguments or {},
                                                         run_name=run_name, experiment_name=experiment,
                                                         namespace=namespace)
    return KfpResult("submit", host, run_id=result.run_id, name=run_name)


def find_run(host: str, name: str, namespace: str | None = None, timeout_s: float = KFP_TIMEOUT_S) -> dict | None:
    """The newest run named `name` (its id and state), or None."""
    client = _client(host, namespace, timeout_s)
    predicate = {"operation": "EQUALS", "key": "display_name", "string_value": name}
    response = client.list_runs(namespace=namespace, filter=json.dumps({"predicates": [predicate]}),
                                sort_by="created_at desc", page_size=1)
    runs = getattr(response, "runs", None) or []
    if not runs:
        return None
    return {"run_id": runs[0].run_id, "state": str(runs[0].state or "")}


def submit_once(host: str, run_name: str, arguments: dict | None = None, which: str = "retrain",
                experiment: str = DEFAULT_EXPERIMENT, namespace: str | None = None,
                timeout_s: float = KFP_TIMEOUT_S) -> KfpResult:
    """Start the run named `run_name` unless the KFP API already has one by that name (action "exists").

    Whatever that run's state: one going on or done needs no second, and a failed one is not retried
    on its own (a permanent error would start a run per check); `brainscan pipeline submit` does that
    by hand. Run names come from the data's fingerprint (pipelines.watcher.run_name).
    """
    found = find_run(host, run_name, namespace, timeout_s)
    if found is not None:
        return KfpResult("exists", host, run_id=found["run_id"], name=run_name)
    return submit(host, arguments, which=which, experiment=experiment, run_name=run_name, namespace=namespace,
                  timeout_s=timeout_s)


def schedule(host: str, cron: str, arguments: dict | None = None, which: str = "retrain",
             experiment: str = DEFAULT_EXPERIMENT, name: str | None = None, namespace: str | None = None,
             timeout_s: float = KFP_TIMEOUT_S) -> KfpResult:
    """A recurring run on a cron schedule (KFP cron has six fields: seconds first), one at a time.

    max_concurrency=1 and no catch-up: a slow training run is never doubled by the next tick.
    By default it schedules the "retrain if new data" pipeline, which does nothing when the
    data did not change.
    """
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"cron {cron!r}: expected 5 or 6 fields, e.g. '0 0 3 * * *' (daily at 03:00)")
    if len(fields) == 5:  # the usual 5-field form: KFP wants seconds in front
        cron = "0 " + cron
    client = _client(host, namespace, timeout_s)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    name = name or f"{_pipeline_name(which)}-schedule"
    with tempfile.TemporaryDirectory() as folder:
        recurring = client.create_recurring_run(
            experiment_id=experiment_id, job_name=name, cron_expression=cron, max_concurrency=1, no_catchup=True,
            params=arguments or {}, pipeline_package_path=_compiled(which, folder), enabled=True)
    return KfpResult("schedule", host, recurring_run_id=recurring.recurring_run_id, experiment_id=experiment_id,
                     name=name)
