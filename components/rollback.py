"""Roll the champion back one step, keeping what is served and the registry on one version.

With a redeploy (`redeploy=True`): the previous champion's pinned `models:/NAME/VERSION` is
rolled out on the InferenceService as it runs, only its model changing (or on the local model
server with `local=True`); the alias moves once that is Ready, and not at all when it is not
(the rollout is then rolled back too: components/deploy.py).

Alias only: the alias moves at once, and the result names what still serves the old version:
the InferenceServices of the namespace that pin it or follow the alias (these load the new
champion only when their pods restart) and the local model server. Reading them is the one
Kubernetes call this module adds to deploy's: a `list` of InferenceServices, with the
operator's own credentials.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kserve import constants
from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError

from brainscan import registry
from brainscan.config import DEFAULT_WORKDIR, DEPLOY, MODEL_NAME, NAMESPACE, champion_uri, version_uri
from brainscan.local import predictor
from components import deploy

LIST_TIMEOUT_S = 15  # an unreachable cluster must not hang an alias-only rollback


@dataclass
class RollbackResult:
    name: str
    from_version: str
    to_version: str
    tracking_uri: str
    alias_moved: bool
    redeployed: bool = False
    deploy: dict | None = None               # the redeploy's DeployResult summary
    still_serving_old: list[str] = field(default_factory=list)  # alias only: what serves from_version
    not_checked: list[str] = field(default_factory=list)        # alias only: where it could not look, and why
    message: str = ""

    def summary(self) -> dict:
        return asdict(self)


def rollback(name: str = MODEL_NAME, tracking_uri: str | None = None, workdir: str | os.PathLike = DEFAULT_WORKDIR,
             redeploy: bool = False, local: bool = False, namespace: str = NAMESPACE, isvc: str = MODEL_NAME,
             kubeconfig=None, timeout_s: float = DEPLOY.timeout_s,
             poll_interval_s: float = DEPLOY.poll_interval_s) -> RollbackResult:
    """Move `champion` back to the previous champion: after redeploying it (`redeploy`: the
    InferenceService `namespace`/`isvc`, or with `local` the local model server), or alone.

    Raises registry.RegistryError when there is nothing to roll back to.
    """
    client, uri = registry.connect(tracking_uri, workdir)
    current, target, _ = registry.rollback_plan(client, name, uri)
    result = RollbackResult(name=name, from_version=current, to_version=target, tracking_uri=uri, alias_moved=False)
    if redeploy:
        return _redeploy(result, workdir, local, namespace, isvc, kubeconfig, timeout_s, poll_interval_s)

    registry.rollback(name, tracking_uri=uri, expect=(current, target))
    result.alias_moved = True
    result.still_serving_old, result.not_checked = _serving(name, current, workdir, namespace, kubeconfig)
    lines = [f"{name} champion: version {current} -> {target} (alias only: nothing was redeployed)"]
    if result.still_serving_old:
        lines += [f"still serving version {current}: {where}" for where in result.still_serving_old]
        lines.append(f"redeploy: `brainscan deploy --model {version_uri(name, target)}` (or roll back with --deploy "
                     f"next time)")
    else:
        looked = ([] if result.not_checked else [f"the InferenceServices of {namespace}"]) + [
            f"the local model server in {workdir}"]
        lines.append(f"nothing found serving version {current} (looked at {' and '.join(looked)})")
    lines += [f"not checked: {where}" for where in result.not_checked]
    result.message = "\n".join(lines)
    return result


def _redeploy(result: RollbackResult, workdir, local: bool, namespace: str, isvc: str, kubeconfig,
              timeout_s: float, poll_interval_s: float) -> RollbackResult:
    """Serve the previous version, then move the alias; a failed rollout leaves both as they were."""
    target_uri = version_uri(result.name, result.to_version)

    def move_alias(deployed: deploy.DeployResult) -> None:
        registry.rollback(result.name, tracking_uri=result.tracking_uri, expect=(result.from_version, result.to_version))
        deployed.previous_champion, deployed.champion, deployed.promoted = result.from_version, result.to_version, True

    if local:
        deployed = deploy.deploy_local(target_uri, workdir, on_ready=move_alias)
    else:
        deployed = deploy.redeploy_cluster(target_uri, namespace, isvc, kubeconfig=kubeconfig, timeout_s=timeout_s,
                                           poll_interval_s=poll_interval_s, on_ready=move_alias)
    result.deploy = deployed.summary()
    result.redeployed = result.alias_moved = deployed.ready
    if deployed.ready:
        result.message = (f"{result.name} champion: version {result.from_version} -> {result.to_version}, "
                          f"served: {deployed.message}")
    else:
        result.message = (f"{result.name} rollback to version {result.to_version} not done: the champion stays "
                          f"version {result.from_version}; {deployed.message}")
    return result


def _serving(name: str, version: str, workdir, namespace: str, kubeconfig) -> tuple[list[str], list[str]]:
    """(what still serves `version` of `name`, where it could not look and why)."""
    old = {version_uri(name, version): f"pins {version_uri(name, version)}",
           champion_uri(name): f"follows {champion_uri(name)}: loads the new champion only when its pods restart"}
    found, not_checked = [], []
    local = predictor.status(Path(workdir))
    if local is not None and local.model_uri in old:
        found.append(f"the local model server in {workdir} ({old[local.model_uri]})")
    try:
        for isvc_name, model_uri in inference_services(namespace, kubeconfig).items():
            if model_uri in old:
                found.append(f"InferenceService {namespace}/{isvc_name} ({old[model_uri]})")
    except RuntimeError as err:
        not_checked.append(f"InferenceServices in {namespace} ({str(err).splitlines()[0][:200]})")
    return found, not_checked


def inference_services(namespace: str, kubeconfig=None) -> dict[str, str | None]:
    """{name: its MODEL_URI (None when it is not brainscan's predictor)} of a namespace's InferenceServices."""
    client = deploy.kserve_client(kubeconfig)
    try:
        listed = client.api_instance.list_namespaced_custom_object(
            constants.KSERVE_GROUP, constants.KSERVE_V1BETA1_VERSION, namespace,
            constants.KSERVE_PLURAL_INFERENCESERVICE, _request_timeout=LIST_TIMEOUT_S)
    except ApiException as err:
        raise RuntimeError(f"cannot list InferenceServices in {namespace}: {err.status} {err.reason}") from err
    except HTTPError as err:
        raise RuntimeError(f"cannot reach the Kubernetes API for {namespace}: {err}") from err
    return {item["metadata"]["name"]: deploy.model_uri_of(item) for item in listed.get("items", [])}
