"""The MLflow model registry as brainscan uses it: where it is, the champion, its history, rollback.

Tracking URI: the argument, else $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db (the
embedded local default). Registry and tracking share it. What this module returns, raises or logs
shows it without the `user:password@` it may hold (brainscan.redact); MLflow's own error for a
server that does not answer repeats the URL as given, so it is never chained to ours.

The champion is the version behind the alias `champion`; the versions that held it, oldest
first, are the registered model's tag `champion_history`, so that `rollback` can move the
alias back one step.

An unreachable tracking server is answered in seconds with `RegistryUnavailable` (one line:
the URI and what to check), not after MLflow's default retries (7, exponential backoff, 120 s
timeouts: about four minutes); a pipeline step is retried by KFP itself.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from brainscan.config import CHAMPION_ALIAS, DEFAULT_WORKDIR, EXPERIMENT, MODEL_NAME, champion_uri, version_uri
from brainscan.redact import redact

log = logging.getLogger(__name__)

HISTORY_TAG = "champion_history"
DIGEST_TAG = "bundle_sha256"  # a version's brainscan.bundle.digest, recorded at registration
# MLflow reads these at every request; the environment still wins where it sets them.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (the message says why)."""


class RegistryUnavailable(RegistryError):
    """The tracking server did not answer; nothing in the registry was changed by the failed call."""

    def __init__(self, uri: str, err: Exception):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        super().__init__(f"MLflow at {redact(uri)} is unreachable ({redact(first)[:300]}): check that the tracking "
                         "server runs and MLFLOW_TRACKING_URI points at it; the registry was left as it was")


def default_tracking_uri(workdir: str | Path = DEFAULT_WORKDIR) -> str:
    """The embedded default: a sqlite file in the work dir."""
    return f"sqlite:///{(Path(workdir).resolve() / 'mlflow.db').as_posix()}"


def resolve_tracking_uri(tracking_uri: str | None = None, workdir: str | Path = DEFAULT_WORKDIR) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def connect(tracking_uri: str | None = None, workdir: str | Path = DEFAULT_WORKDIR) -> tuple[MlflowClient, str]:
    """(client, tracking URI), with MLflow's process-wide URIs set to it and its retries bounded."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    uri = resolve_tracking_uri(tracking_uri, workdir)
    if redact(uri) != uri:  # MLflow prints its run links on the URI as given: user and password included
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def is_unreachable(err: BaseException) -> bool:
    """An error that means the server did not answer (as opposed to an answer saying no)."""
    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return True
    text = str(err)
    return isinstance(err, MlflowException) and any(
        marker in text for marker in ("Max retries exceeded", "Connection refused", "Failed to establish",
                                      "Read timed out", "RemoteDisconnected", "Connection aborted"))


def experiment_id(client: MlflowClient, uri: str) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Next to the database, not ./mlruns under whatever the current directory is.
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def champion_version(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except MlflowException as err:
        if is_unreachable(err):
            raise RegistryUnavailable(client.tracking_uri, err) from None
        return None  # no such model or alias yet


def history(client: MlflowClient, name: str) -> list[str]:
    """The versions that held `champion`, oldest first."""
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as err:
        if is_unreachable(err):
            raise RegistryUnavailable(client.tracking_uri, err) from None
        return []
    try:
        return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    except json.JSONDecodeError:
        return []


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """Move `champion` to version and append it to the history; returns the previous champion."""
    previous = champion_version(client, name)
    past = history(client, name)
    if previous and (not past or past[-1] != previous):
        past.append(previous)  # a champion set outside brainscan: keep it restorable
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(past + [version]))
    return previous


def rollback(name: str = MODEL_NAME, tracking_uri: str | None = None, workdir: str | Path = DEFAULT_WORKDIR) -> dict:
    """Move `champion` back to the previous champion; returns {name, from_version, to_version}."""
    client, uri = connect(tracking_uri, workdir)
    current = champion_version(client, name)
    if current is None:
        raise RegistryError(f"{name} has no {CHAMPION_ALIAS} alias in {redact(uri)}: nothing to roll back")
    past = history(client, name)
    while past and past[-1] == current:
        past.pop()
    if not past:
        raise RegistryError(f"{name}: version {current} is the first champion; there is no previous one to restore")
    target = past[-1]
    client.set_registered_model_alias(name, CHAMPION_ALIAS, target)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(past))
    client.set_model_version_tag(name, current, "rolled_back_at",
                                 dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    log.info("rolled back %s champion: version %s -> %s", name, current, target)
    return {"name": name, "from_version": current, "to_version": target,
            "champion_uri": champion_uri(name), "tracking_uri": redact(uri)}


def champion_info(name: str = MODEL_NAME, tracking_uri: str | None = None,
                  workdir: str | Path = DEFAULT_WORKDIR) -> dict | None:
    """The current champion: version, tags, threshold, model_uri; None when there is none."""
    client, uri = connect(tracking_uri, workdir)
    version = champion_version(client, name)
    if version is None:
        return None
    mv = client.get_model_version(name, version)
    tags = dict(mv.tags)
    threshold = tags.get("threshold")
    return {"name": name, "version": version, "tags": tags,
            "threshold": float(threshold) if threshold else None,
            "model_uri": version_uri(name, version), "champion_uri": champion_uri(name),
            "run_id": mv.run_id, "dataset_fingerprint": tags.get("dataset_fingerprint"),
            "history": history(client, name), "tracking_uri": redact(uri)}


def list_versions(name: str = MODEL_NAME, tracking_uri: str | None = None,
                  workdir: str | Path = DEFAULT_WORKDIR) -> list[dict]:
    client, _ = connect(tracking_uri, workdir)
    champion = champion_version(client, name)
    versions = client.search_model_versions(f"name='{name}'")
    return [{"version": str(v.version), "champion": str(v.version) == champion, "run_id": v.run_id,
             "threshold": v.tags.get("threshold"), "dataset_fingerprint": v.tags.get("dataset_fingerprint"),
             "code_version": v.tags.get("code_version"), "created": v.creation_timestamp}
            for v in sorted(versions, key=lambda v: int(v.version))]


def _version_of(client: MlflowClient, model_uri: str):
    """The ModelVersion behind models:/NAME@ALIAS or models:/NAME/VERSION; None for other forms."""
    rest = model_uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = rest.rpartition("/")
    return client.get_model_version(name, version) if name and version.isdigit() else None


def download(model_uri: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """The artifacts of a models:/NAME@ALIAS or models:/NAME/VERSION URI, in a fresh local folder."""
    return download_version(model_uri, dst, tracking_uri)[0]


def download_version(model_uri: str, dst: str | Path, tracking_uri: str | None = None) -> tuple[Path, dict]:
    """(the artifacts of a models:/NAME@ALIAS or models:/NAME/VERSION URI in a fresh local folder,
    that version's tags). An alias is resolved once, first: the files and the tags (DIGEST_TAG
    among them) are those of one version even when the alias moves meanwhile."""
    client, uri = connect(tracking_uri)
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)  # an alias may point to a new version since last time
    dst.mkdir(parents=True)
    try:
        version = _version_of(client, model_uri)
        source = version_uri(version.name, version.version) if version is not None else model_uri
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst)))
    except MlflowException as err:
        if is_unreachable(err):
            raise RegistryUnavailable(uri, err) from None
        raise RegistryError(f"cannot resolve {model_uri} in MLflow ({redact(uri)}): "
                            f"{redact(str(err).splitlines()[0])}") from None
    return folder, dict(version.tags) if version is not None else {}
