"""The MLflow model registry as brainscan uses it: where it is, the champion, its history, rollback.

Tracking URI: the argument, else $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db (the
embedded local default). Registry and tracking share it. What this module returns, raises or logs
shows it without the `user:password@` it may hold (brainscan.redact); MLflow's own error for a
server that does not answer repeats the URL as given, so it is never chained to ours.

The champion is the version behind the alias `champion`: the version that is served. It moves
in one place, `promote`, called once a deploy of that version serves (components/deploy.py)
or by a rollback; registration only sets the alias `candidate`. The versions that held it,
oldest first, are the registered model's tag `champion_history`, so that `rollback` can move
the alias back one step.

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

from brainscan.config import (CANDIDATE_ALIAS, CHAMPION_ALIAS, DEFAULT_WORKDIR, EXPERIMENT, MODEL_NAME, champion_uri,
                              version_uri)
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


def check_version(client: MlflowClient, name: str, version: str) -> None:
    """Raise RegistryError unless `version` of `name` is registered (RegistryUnavailable: no answer)."""
    try:
        client.get_model_version(name, version)
    except MlflowException as err:
        if is_unreachable(err):
            raise RegistryUnavailable(client.tracking_uri, err) from err
        raise RegistryError(f"{version_uri(name, version)} is not a registered version: "
                            f"{str(err).splitlines()[0][:200]}") from err


def aliases_of(client: MlflowClient, name: str, version: str) -> list[str]:
    """The aliases that point at one version (MLflow deletes them with the version)."""
    return list(client.get_model_version(name, version).aliases or [])


def mark_candidate(client: MlflowClient, name: str, version: str) -> None:
    """Registration's alias: the newest version that may be deployed; `champion` does not move."""
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)


def promote(client: MlflowClient, name: str, version: str, new_history: list[str] | None = None) -> str | None:
    """Move `champion` to `version`: the one place it moves. Returns the previous champion.

    Called once `version` serves (components/deploy.py) or by `rollback`. The alias move is the
    commit point: when it fails nothing changed; what follows is bookkeeping that may fail without
    breaking a later rollback (a champion missing from the history is added back by the next
    promotion, and `rollback` goes back to the last entry that is not the champion). The history
    records the previous champion; `new_history` replaces it (a rollback drops its last step).
    Promoting the champion again changes nothing (a retried deploy step).
    """
    previous = champion_version(client, name)
    if previous == version and new_history is None:
        return previous
    if new_history is None:
        new_history = history(client, name)
        if previous and (not new_history or new_history[-1] != previous):
            new_history.append(previous)  # a champion set outside brainscan: keep it restorable
        new_history.append(version)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    try:
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(new_history))
        if CANDIDATE_ALIAS in aliases_of(client, name, version):
            client.delete_registered_model_alias(name, CANDIDATE_ALIAS)
    except MlflowException as err:
        log.warning("%s champion is version %s; its history tag or candidate alias was not updated (%s)",
                    name, version, str(err).splitlines()[0][:200])
    log.info("%s champion: version %s -> %s", name, previous, version)
    return previous


def rollback_plan(client: MlflowClient, name: str, uri: str) -> tuple[str, str, list[str]]:
    """(current champion, the previous champion to go back to, the history after going back)."""
    current = champion_version(client, name)
    if current is None:
        raise RegistryError(f"{name} has no {CHAMPION_ALIAS} alias in {redact(uri)}: nothing to roll back")
    past = history(client, name)
    while past and past[-1] == current:
        past.pop()
    if not past:
        raise RegistryError(f"{name}: version {current} is the first champion; there is no previous one to restore")
    return current, past[-1], past


def rollback(name: str = MODEL_NAME, tracking_uri: str | None = None, workdir: str | Path = DEFAULT_WORKDIR,
             expect: tuple[str, str] | None = None) -> dict:
    """Move `champion` back to the previous champion; returns {name, from_version, to_version, ...}.

    Only the alias: an InferenceService that pins `models:/NAME/VERSION` keeps serving what it
    serves (components/rollback.py redeploys first). `expect`: (from, to) as planned before a
    redeploy; when the champion moved meanwhile nothing is changed.
    """
    client, uri = connect(tracking_uri, workdir)
    current, target, past = rollback_plan(client, name, uri)
    if expect is not None and (current, target) != tuple(expect):
        raise RegistryError(f"{name}: the champion changed during the rollback (now {current}, planned "
                            f"{expect[0]} -> {expect[1]}); the alias was left as it is")
    promote(client, name, target, new_history=past)
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
