"""deploy: put a registered model into service, then make it the champion.

On a cluster: build the InferenceService (`brainscan/inferenceservice.py`), create it or
patch the existing one with `kserve.KServeClient`, and poll its status until the new generation
is Ready. If it is not Ready in time, roll back: a canary gets its traffic share set back to 0
(all traffic to the previous, still running revision) and the previous spec is re-applied.

Locally (`local=True`): (re)start the local KServe model server on the model
(`brainscan.local.predictor`); when it does not come up, the previous model is started again.

The registry follows what is served. When the model is a pinned registered version
(`models:/NAME/VERSION`) that takes all traffic, `champion` moves to it (brainscan.registry.promote)
once it serves, and not at all when the rollout fails; the version is checked in the registry
before anything is rolled out. A promotion the registry refuses after the rollout rolls the
rollout back, so that the InferenceService and the champion stay on one version. A canary is
not the champion yet: deploying the same version to all traffic promotes it.

`rollback_champion` (`brainscan model rollback`) goes back one champion the same way round:
the previous version is served first, then named champion; or, alias only, the alias moves and
the result names what still serves the old version.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from kserve import KServeClient, V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec, constants
from kubernetes.client import V1ObjectMeta
from kubernetes.client.rest import ApiException
from kubernetes.config import ConfigException
from urllib3.exceptions import HTTPError

from brainscan.local import predictor
from brainscan import inferenceservice as isvc_builder
from brainscan import registry
from brainscan.config import (DEFAULT_WORKDIR, DEFAULTS, DEPLOY, MODEL_NAME, NAMESPACE, champion_uri, check_canary,
                              default_serving_image, pinned_version, version_uri)

log = logging.getLogger(__name__)


@dataclass
class DeployResult:
    model_uri: str
    target: str                      # "cluster" or "local"
    name: str
    namespace: str | None
    action: str                      # created | patched | started | reloaded
    ready: bool
    rolled_back: bool = False
    rollback_ready: bool | None = None   # after a rollback: is the previous spec serving again?
    canary_percent: int | None = None
    previous_model_uri: str | None = None
    url: str | None = None
    generation: int | None = None
    waited_s: float = 0.0
    polls: int = 0
    message: str = ""
    conditions: list[dict] = field(default_factory=list)
    promoted: bool = False           # did `champion` move to this version?
    champion: str | None = None      # the champion's version after this deploy, when it moved
    previous_champion: str | None = None

    def summary(self) -> dict:
        return asdict(self)


# What runs once the new model serves (the promotion); raising turns the deploy into a failure.
OnReady = Callable[[DeployResult], None]


def deploy(
    model_uri: str,
    namespace: str = NAMESPACE,
    name: str = MODEL_NAME,
    canary_percent: int | None = None,
    local: bool = False,
    timeout_s: float = DEPLOY.timeout_s,
    image: str | None = None,
    gpus: int = DEFAULTS.serving_gpus,
    kubeconfig: str | os.PathLike | None = None,
    poll_interval_s: float = DEPLOY.poll_interval_s,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    promote: bool = True,
    tracking_uri: str | None = None,
    **isvc_options: Any,
) -> DeployResult:
    """Deploy `model_uri`; returns a DeployResult whose `ready` says whether it is serving.

    `image` defaults to $BRAINSCAN_SERVING_IMAGE, then the builder's default. `kubeconfig`:
    None reads $KUBECONFIG / ~/.kube/config, or the in-cluster service account when run in
    a pod (the pipeline's deploy step). `promote`: move `champion` to a pinned version once it
    serves (see the module docstring), in the registry at `tracking_uri` (default:
    $MLFLOW_TRACKING_URI, else sqlite in `workdir`). Other keyword arguments go to
    `build_inference_service` (deployment_mode, gpu_node_selection, node_selector, tolerations,
    min_replicas, ...).
    """
    if not model_uri:
        raise ValueError("no model URI: give --model models:/brain-tumor@champion, an s3:// URI or a path")
    check_canary(canary_percent, None, name="canary percent")  # the mode: checked by the InferenceService builder
    if timeout_s <= 0:
        raise ValueError(f"timeout must be positive, got {timeout_s}")
    on_ready = promotion(model_uri, tracking_uri, workdir) if promote and canary_percent is None else None
    if local:
        return deploy_local(model_uri, workdir, on_ready=on_ready)
    return deploy_cluster(model_uri, namespace=namespace, name=name, canary_percent=canary_percent,
                          timeout_s=timeout_s, image=image, gpus=gpus, kubeconfig=kubeconfig,
                          poll_interval_s=poll_interval_s, on_ready=on_ready, **isvc_options)


def promotion(model_uri: str, tracking_uri: str | None, workdir) -> OnReady | None:
    """The step that moves `champion` to a pinned version once it serves; None for any other URI.

    The version is looked up now, before anything is rolled out: an unknown version or a
    registry that does not answer stops the deploy while nothing has changed.
    """
    pinned = pinned_version(model_uri)
    if pinned is None:
        return None
    name, version = pinned
    client, _ = registry.connect(tracking_uri, workdir)
    registry.check_version(client, name, version)

    def promote(result: DeployResult) -> None:
        result.previous_champion = registry.promote(client, name, version)
        result.champion, result.promoted = version, True

    return promote


# --------------------------------------------------------------------------- cluster

def kserve_client(kubeconfig=None) -> KServeClient:
    try:
        return KServeClient(config_file=str(kubeconfig) if kubeconfig else None)
    except (ConfigException, OSError) as err:
        raise RuntimeError(f"no usable Kubernetes configuration ({err}): pass --kubeconfig, set KUBECONFIG, "
                           f"or run inside the cluster") from err


def deploy_cluster(model_uri: str, namespace: str, name: str, canary_percent: int | None, timeout_s: float,
                   image: str | None, gpus: int, kubeconfig, poll_interval_s: float, on_ready: OnReady | None = None,
                   **isvc_options: Any) -> DeployResult:
    client = kserve_client(kubeconfig)
    isvc = isvc_builder.build_inference_service(
        name=name, namespace=namespace, image=image or default_serving_image(), model_uri=model_uri, gpus=gpus,
        canary_traffic_percent=canary_percent, **isvc_options)
    previous = _get_or_none(client, name, namespace)
    if previous is not None and canary_percent is None and \
            previous.get("spec", {}).get("predictor", {}).get("canaryTrafficPercent") is not None:
        # a merge patch keeps fields it does not mention: promote explicitly to all traffic
        isvc.spec.predictor.canary_traffic_percent = 100
    return roll_out(client, isvc, previous, model_uri, namespace, name, canary_percent, timeout_s, poll_interval_s,
                    on_ready)


def redeploy_cluster(model_uri: str, namespace: str, name: str, kubeconfig=None, timeout_s: float = DEPLOY.timeout_s,
                     poll_interval_s: float = DEPLOY.poll_interval_s, on_ready: OnReady | None = None) -> DeployResult:
    """The InferenceService as it runs, on another model: only its MODEL_URI changes (image, resources,
    mode and replicas stay), with all traffic. Waits, rolls back and calls `on_ready` as deploy_cluster."""
    client = kserve_client(kubeconfig)
    current = _get_or_none(client, name, namespace)
    if current is None:
        raise RuntimeError(f"there is no InferenceService {namespace}/{name} to redeploy")
    if model_uri_of(current) is None:
        raise RuntimeError(f"{namespace}/{name} has no MODEL_URI (not brainscan's predictor): redeploy it by hand")
    spec = copy.deepcopy(current["spec"])
    for container in spec["predictor"].get("containers") or []:
        for env in container.get("env") or []:
            if env.get("name") == "MODEL_URI":
                env["value"] = model_uri
    if spec["predictor"].get("canaryTrafficPercent") is not None:
        spec["predictor"]["canaryTrafficPercent"] = 100
    isvc = V1beta1InferenceService(api_version=current.get("apiVersion", isvc_builder.API_VERSION),
                                   kind=isvc_builder.KIND, metadata=V1ObjectMeta(name=name, namespace=namespace),
                                   spec=spec)
    return roll_out(client, isvc, current, model_uri, namespace, name, None, timeout_s, poll_interval_s, on_ready)


def roll_out(client, isvc, previous: dict | None, model_uri: str, namespace: str, name: str,
             canary_percent: int | None, timeout_s: float, poll_interval_s: float,
             on_ready: OnReady | None) -> DeployResult:
    """Create or patch, wait for the new generation, run `on_ready`; roll back when either fails."""
    if previous is None:
        log.info("creating InferenceService %s/%s for %s", namespace, name, model_uri)
        sent = client.create(isvc, namespace=namespace)
        action = "created"
    else:
        log.info("patching InferenceService %s/%s: %s -> %s%s", namespace, name, model_uri_of(previous), model_uri,
                 f" (canary {canary_percent}%)" if canary_percent else "")
        sent = client.patch(name, isvc, namespace=namespace)
        action = "patched"

    generation = sent.get("metadata", {}).get("generation")
    ready, current, waited, polls = wait_ready(client, name, namespace, generation, timeout_s, poll_interval_s)
    result = DeployResult(
        model_uri=model_uri, target="cluster", name=name, namespace=namespace, action=action, ready=ready,
        canary_percent=canary_percent, previous_model_uri=model_uri_of(previous) if previous else None,
        url=(current or {}).get("status", {}).get("url"), generation=generation, waited_s=round(waited, 3),
        polls=polls, conditions=(current or {}).get("status", {}).get("conditions", []))
    if ready:
        problem = _run_on_ready(on_ready, result)
        if problem is None:
            result.message = f"{namespace}/{name} is Ready with {model_uri} (generation {generation})" + _champion_note(
                result, canary_percent)
            log.info(result.message)
            return result
        result.ready = False
        failure = f"{namespace}/{name} is Ready with {model_uri} but {problem}"
    else:
        failure = f"{namespace}/{name} did not become Ready within {timeout_s:g}s ({_not_ready_reason(current)})"

    if previous is None:
        result.message = (f"{failure}; there is no previous revision to roll back to, the InferenceService is left "
                          f"for inspection")
    else:
        restored = rollback(client, previous, namespace, canary=canary_percent is not None)
        result.rolled_back = True
        # the previous model comes back as a new generation: wait for it as long again
        result.rollback_ready, *_ = wait_ready(client, name, namespace, restored.get("metadata", {}).get("generation"),
                                               timeout_s, poll_interval_s)
        result.message = (f"{failure}; rolled back to the previous spec ({model_uri_of(previous)}), which is "
                          f"{'Ready again' if result.rollback_ready else 'NOT Ready either: check the cluster'}")
    log.error(result.message)
    return result


def _run_on_ready(on_ready: OnReady | None, result: DeployResult) -> str | None:
    """None when the step after Ready (the promotion) went through, else what went wrong."""
    if on_ready is None:
        return None
    try:
        on_ready(result)
    except Exception as err:  # noqa: BLE001 - any failure to promote must undo the rollout, whatever raised it
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        return f"the registry did not make it the champion ({first})"
    return None


def _champion_note(result: DeployResult, canary_percent: int | None) -> str:
    if result.promoted:
        return f"; champion: version {result.previous_champion or 'none'} -> {result.champion}"
    if canary_percent is not None and pinned_version(result.model_uri):
        return "; a canary: the champion stays where it is until this version takes all traffic"
    return ""


def wait_ready(client, name: str, namespace: str, generation: int | None, timeout_s: float,
               poll_interval_s: float) -> tuple[bool, dict | None, float, int]:
    """Poll until the InferenceService's Ready condition is True for `generation` (or later).

    Returns (ready, last object seen, seconds waited, polls). An API error during the wait
    counts as "not ready yet": the control plane may blip while pods roll.
    """
    start = time.monotonic()
    current, polls = None, 0
    while True:
        polls += 1
        try:
            current = client.get(name, namespace=namespace)
        except RuntimeError as err:
            log.warning("reading %s/%s failed, still waiting: %s", namespace, name, str(err).splitlines()[0])
        if current is not None and is_ready(current, generation):
            return True, current, time.monotonic() - start, polls
        waited = time.monotonic() - start
        if waited >= timeout_s:
            return False, current, waited, polls
        log.info("waiting for %s/%s to be Ready: %s (%.0fs of %gs)", namespace, name, _not_ready_reason(current),
                 waited, timeout_s)
        time.sleep(min(poll_interval_s, max(timeout_s - waited, 0)))


def is_ready(isvc: dict, generation: int | None) -> bool:
    """Ready=True, observed at the generation we sent (an old Ready status does not count)."""
    status = isvc.get("status") or {}
    if generation is not None and status.get("observedGeneration", 0) < generation:
        return False
    return any(c.get("type") == "Ready" and str(c.get("status")).lower() == "true"
               for c in status.get("conditions", []))


def rollback(client, previous: dict, namespace: str, canary: bool) -> dict:
    """Return to the InferenceService as it was before this deploy; returns the object the API stored."""
    name = previous["metadata"]["name"]
    if canary:
        # immediate: the previous revision still runs and takes all traffic again
        log.warning("rollback: canary traffic of %s/%s back to 0%%", namespace, name)
        _patch_canary_zero(client, name, namespace)
    log.warning("rollback: re-applying the previous spec of %s/%s (%s)", namespace, name, model_uri_of(previous))
    meta = previous.get("metadata", {})
    restored = V1beta1InferenceService(
        api_version=previous.get("apiVersion", isvc_builder.API_VERSION), kind=isvc_builder.KIND,
        metadata=V1ObjectMeta(name=name, namespace=namespace, labels=meta.get("labels"),
                              annotations=meta.get("annotations")),
        spec=previous["spec"])
    return client.replace(name, restored, namespace=namespace)  # PUT: exactly the old spec, no leftovers


def _patch_canary_zero(client, name: str, namespace: str) -> None:
    patch = V1beta1InferenceService(api_version=isvc_builder.API_VERSION, kind=isvc_builder.KIND,
                                    spec=V1beta1InferenceServiceSpec(
                                        predictor=V1beta1PredictorSpec(canary_traffic_percent=0)))
    client.patch(name, patch, namespace=namespace)


def _get_or_none(client, name: str, namespace: str) -> dict | None:
    try:
        # the CustomObjectsApi under KServeClient, to tell "not found" from real errors
        return client.api_instance.get_namespaced_custom_object(
            constants.KSERVE_GROUP, constants.KSERVE_V1BETA1_VERSION, namespace,
            constants.KSERVE_PLURAL_INFERENCESERVICE, name)
    except ApiException as err:
        if err.status == 404:
            return None
        raise RuntimeError(f"cannot read InferenceService {namespace}/{name}: {err.status} {err.reason}") from err
    except HTTPError as err:
        raise RuntimeError(f"cannot reach the Kubernetes API for {namespace}/{name}: {err}") from err


def model_uri_of(isvc: dict | None) -> str | None:
    for container in ((isvc or {}).get("spec", {}).get("predictor", {}).get("containers") or []):
        for env in container.get("env") or []:
            if env.get("name") == "MODEL_URI":
                return env.get("value")
    return None


def _not_ready_reason(isvc: dict | None) -> str:
    if not isvc:
        return "status unknown"
    status = isvc.get("status") or {}
    for condition in status.get("conditions", []):
        if condition.get("type") == "Ready":
            text = f"Ready={condition.get('status')}"
            detail = condition.get("reason") or condition.get("message")
            return f"{text} ({detail}), observed generation {status.get('observedGeneration', 0)}" if detail else text
    return "no Ready condition yet"


# --------------------------------------------------------------------------- local

def deploy_local(model_uri: str, workdir: str | os.PathLike = DEFAULT_WORKDIR,
                 on_ready: OnReady | None = None) -> DeployResult:
    """(Re)start the local model server on `model_uri` and run `on_ready` once it answers with that model.

    `brainscan.local.predictor.start` replaces a running server on the same ports (clients keep
    their URL) and returns once the new model is ready. When it does not come up, or `on_ready`
    fails, the previous model is started again (or, with none, the server stopped).
    """
    workdir = Path(workdir)
    running = predictor.status(workdir)
    result = DeployResult(model_uri=model_uri, target="local", name=MODEL_NAME, namespace=None,
                          action="reloaded" if running is not None else "started", ready=False,
                          previous_model_uri=running.model_uri if running else None)
    try:
        info = predictor.start(model_uri, workdir)
        result.url = info.url
        serving = predictor.status(workdir)
        if serving is None or serving.model_uri != model_uri or not predictor.ready(info.url):
            raise RuntimeError(f"the local model server does not answer with {model_uri}")
        problem = _run_on_ready(on_ready, result)
    except RuntimeError as err:
        problem = str(err).strip().splitlines()[0][:300] if str(err).strip() else "it did not start"
    if problem is None:
        result.ready = True
        result.message = f"local model server {result.action} on {model_uri} at {result.url}" + _champion_note(result,
                                                                                                                None)
        return result
    result.rolled_back = running is not None
    if running is None:
        predictor.stop(workdir)  # nothing was served before: serve nothing rather than a model the registry denies
        result.message = f"local deploy of {model_uri} failed ({problem}); no model server runs"
    else:
        try:
            result.url = predictor.start(running.model_uri, workdir).url
            result.rollback_ready = True
        except RuntimeError as err:
            result.rollback_ready = False
            log.error("restarting the previous model %s failed: %s", running.model_uri, str(err).splitlines()[0])
        result.message = (f"local deploy of {model_uri} failed ({problem}); the previous model {running.model_uri} "
                          f"is {'served again' if result.rollback_ready else 'NOT served either: see the server log'}")
    log.error(result.message)
    return result


# --------------------------------------------------------------------------- rolling the champion back
# The previous champion's pinned version, served first and then named champion (`redeploy`), or the
# alias alone, with what still serves the old version named. Listing a namespace's InferenceServices
# (alias only) is the one Kubernetes call here that deploying does not make: it runs with the
# operator's credentials (`brainscan model rollback`), never the deploy step's.

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


def rollback_champion(name: str = MODEL_NAME, tracking_uri: str | None = None,
                      workdir: str | os.PathLike = DEFAULT_WORKDIR, redeploy: bool = False, local: bool = False,
                      namespace: str = NAMESPACE, isvc: str = MODEL_NAME, kubeconfig=None,
                      timeout_s: float = DEPLOY.timeout_s,
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

    def move_alias(deployed: DeployResult) -> None:
        registry.rollback(result.name, tracking_uri=result.tracking_uri,
                          expect=(result.from_version, result.to_version))
        deployed.previous_champion, deployed.champion, deployed.promoted = result.from_version, result.to_version, True

    if local:
        deployed = deploy_local(target_uri, workdir, on_ready=move_alias)
    else:
        deployed = redeploy_cluster(target_uri, namespace, isvc, kubeconfig=kubeconfig, timeout_s=timeout_s,
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
    client = kserve_client(kubeconfig)
    try:
        listed = client.api_instance.list_namespaced_custom_object(
            constants.KSERVE_GROUP, constants.KSERVE_V1BETA1_VERSION, namespace,
            constants.KSERVE_PLURAL_INFERENCESERVICE, _request_timeout=LIST_TIMEOUT_S)
    except ApiException as err:
        raise RuntimeError(f"cannot list InferenceServices in {namespace}: {err.status} {err.reason}") from err
    except HTTPError as err:
        raise RuntimeError(f"cannot reach the Kubernetes API for {namespace}: {err}") from err
    return {item["metadata"]["name"]: model_uri_of(item) for item in listed.get("items", [])}
