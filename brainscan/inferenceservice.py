"""The KServe InferenceService that runs the brainscan model server.

`build_inference_service(...)` turns deployment parameters into a kserve SDK
`V1beta1InferenceService` (a custom predictor container running the serving image from
`infra/docker/serving.Dockerfile`). `components/deploy.py` sends it with `KServeClient`;
`to_dict` gives the plain manifest (for `kubectl apply`, the tests and the docs).

Two deployment modes (brainscan.config.DEPLOYMENT_MODES):
- Serverless (default; Knative): what a stock KServe + Knative, as kubeflow/manifests installs
  them, accepts. Knative refuses `nodeSelector`, `tolerations` and `affinity` in a pod spec
  unless the cluster enables its `kubernetes.podspec-*` feature flags (all "disabled" by
  default), and routes one container port. So by default the predictor only asks for
  `nvidia.com/gpu`: the scheduler then places it on a GPU node, and a tainted GPU pool needs the
  ExtendedResourceToleration admission plugin (GKE, for one, adds the toleration itself) or the
  flags turned on (infra/k8s/knative/, then `gpu_node_selection=True`). HTTP (REST) only.
- RawDeployment (KServe's "Standard"): a plain Deployment and Service, no Knative. GPU predictors
  get the GPU node selector and toleration; HTTP on 8080 and gRPC on 8081 (h2c). No canaries.

Least privilege: the S3 and MLflow settings come key by key from the serving secret (a read-only S3
key, brainscan.config.SERVING_S3_SECRET), never from the pipeline's; no Kubernetes API token; a
read-only root filesystem with emptyDir volumes for what the server writes (HOME: the model cache,
Keras's and MLflow's; TMPDIR). Drain (brainscan.config.DeploySettings): Knative (Serverless) makes
the revision's `timeout` the pod's grace period and puts its own preStop (the queue-proxy's drain)
on the container, which it refuses to take from us; a RawDeployment gets our preStop wait and the
grace period. Either way the grace period is DEPLOY.drain_grace_s, longer than the longest request.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import yaml
from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
from kubernetes.client import (ApiClient, V1Capabilities, V1Container, V1ContainerPort, V1EmptyDirVolumeSource,
                               V1EnvVar, V1EnvVarSource, V1ExecAction, V1HTTPGetAction, V1Lifecycle,
                               V1LifecycleHandler, V1ObjectMeta, V1Probe, V1ResourceRequirements, V1SeccompProfile,
                               V1SecretKeySelector, V1SecurityContext, V1Toleration, V1Volume, V1VolumeMount)

from brainscan.config import (CHAMPION_URI, DEFAULTS, DEPLOY, GPU_NODE_SELECTOR, GPU_RESOURCE, GPU_TOLERATIONS,
                              MLFLOW_ENV_KEYS, MODEL_NAME, NAMESPACE, RAW_DEPLOYMENT, S3_ENV_KEYS, SERVERLESS,
                              SERVING_IMAGE, SERVING_S3_SECRET, SERVING_SERVICE_ACCOUNT, ServeSettings,
                              canonical_deployment_mode, check_canary, gpu_placement)

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"

# Defaults that match infra/k8s (the secret and service account created there).
DEFAULT_IMAGE = SERVING_IMAGE
DEFAULT_SERVICE_ACCOUNT = SERVING_SERVICE_ACCOUNT
DEFAULT_S3_SECRET = SERVING_S3_SECRET  # read-only S3; never the pipeline's read-write brainscan-s3
# What the server reads of that secret (models:/ through MLflow, s3:// through boto3): each key by name,
# so a key added to the secret later does not reach the predictor.
SECRET_KEYS = S3_ENV_KEYS + MLFLOW_ENV_KEYS
# The labels every predictor pod carries (KServe copies the InferenceService's onto its pods): what the
# PodDisruptionBudget and the NetworkPolicies in infra/k8s/base select.
PREDICTOR_LABELS = {"app.kubernetes.io/name": "brainscan", "app.kubernetes.io/component": "predictor"}
DEFAULT_NODE_SELECTOR = GPU_NODE_SELECTOR
DEFAULT_TOLERATIONS = GPU_TOLERATIONS
DEFAULT_RESOURCES = {
    "requests": {"cpu": "1", "memory": "4Gi"},
    "limits": {"cpu": "4", "memory": "8Gi"},
}
HTTP_PORT = ServeSettings.http_port
GRPC_PORT = ServeSettings.grpc_port
SERVING_UID = 1000  # the non-root user of the serving image
# Writable places on the read-only root filesystem, each an emptyDir: HOME (the model cache
# ~/.cache/brainscan with its ONNX file, ~/.keras, MLflow's downloads) and TMPDIR. Not /tmp: older
# Knative releases refuse a volume mounted there; Python's tempfile follows TMPDIR.
SERVING_HOME = "/home/brainscan"
SERVING_TMP = "/var/tmp"
SCRATCH_VOLUMES = {"home": (SERVING_HOME, "4Gi"), "tmp": (SERVING_TMP, "2Gi")}  # name: (mount path, size limit)
# Loading TensorFlow and pulling the model from S3 / MLflow can take minutes on a cold node: the
# server only listens once the model is loaded. The startup probe allows this long before the
# liveness probe may restart the container.
STARTUP_SECONDS = 600
METRICS_PATH = "/metrics"  # Prometheus text, with the brainscan_* metrics, on the HTTP port


def build_inference_service(
    name: str = MODEL_NAME,
    namespace: str = NAMESPACE,
    image: str = DEFAULT_IMAGE,
    model_uri: str = CHAMPION_URI,
    gpus: int = DEFAULTS.serving_gpus,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] | None = None,
    service_account: str | None = DEFAULT_SERVICE_ACCOUNT,
    min_replicas: int = DEPLOY.min_replicas,
    max_replicas: int = DEPLOY.max_replicas,
    canary_traffic_percent: int | None = None,
    resources: Mapping[str, Mapping[str, str]] | None = None,
    probes: bool = True,
    s3_secret: str | None = DEFAULT_S3_SECRET,
    env: Mapping[str, str] | None = None,
    deployment_mode: str = SERVERLESS,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    gpu_node_selection: bool | None = None,
):
    """Build the InferenceService for one model URI.

    - `gpus` > 0 adds an `nvidia.com/gpu` limit; `gpus=0` gives a CPU-only predictor.
    - `gpu_node_selection`: the GPU node selector and toleration on a GPU predictor. Default: in
      RawDeployment mode yes, in Serverless mode no (a stock Knative refuses both; say True where
      the cluster enabled `kubernetes.podspec-nodeselector` and `-tolerations`). `node_selector`
      and `tolerations`, when given, are used as they are.
    - `canary_traffic_percent` (0-100): share of traffic the new revision gets while the
      previous one keeps the rest (KServe canary rollout, Serverless mode).
    - `s3_secret`: the keys SECRET_KEYS of that secret (AWS_*, MLFLOW_*) become environment variables
      of the server, so it reads `models:/` and `s3://` URIs; the default is the read-only serving
      secret, which the service account also names for KServe's own storage initializer.
    - `min_replicas`: 2 by default (DeploySettings): with the PodDisruptionBudget in infra/k8s/base a
      node drain evicts one replica at a time; 1 (or 0 in Serverless) is accepted.
    - `deployment_mode`: "Serverless" / "Knative" (one container port, so only HTTP 8080) or
      "RawDeployment" / "Standard" (a plain Deployment: HTTP 8080 and gRPC 8081 as h2c). The
      annotation carries the first spelling, which every KServe release reads.
    - Probes: a startup probe gives the server STARTUP_SECONDS to load the model before the
      liveness probe counts; readiness says when the model is loaded.
    - Metrics: KServe scrapes `/metrics` on 8080 (the brainscan_* metrics with kserve's own);
      in Serverless mode the queue-proxy aggregates them with its own on one port.
    """
    if not model_uri:
        raise ValueError("model_uri is empty: give a models:/, s3:// or local model URI")
    if gpus < 0:
        raise ValueError(f"gpus must be 0 or more, got {gpus}")
    if min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                         f"got {min_replicas}..{max_replicas}")
    try:
        deployment_mode = canonical_deployment_mode(deployment_mode)
    except ValueError as err:
        raise ValueError(f"deployment_mode: {err}") from None
    # 0 here is a new revision that gets no traffic yet (deploy and the pipeline say "no canary" with None / 0)
    check_canary(canary_traffic_percent, deployment_mode, name="canary_traffic_percent", lowest=0)

    limits = dict((resources or DEFAULT_RESOURCES).get("limits", {}))
    requests = dict((resources or DEFAULT_RESOURCES).get("requests", {}))
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)  # extended resources: the limit is what the scheduler counts
    if gpu_node_selection is None:
        gpu_node_selection = deployment_mode == RAW_DEPLOYMENT
    gpu_selector, gpu_tolerations = gpu_placement(gpus if gpu_node_selection else 0)
    if node_selector is None:
        node_selector = gpu_selector
    if tolerations is None:
        tolerations = gpu_tolerations

    # Knative routes a single port; name "http1" tells it the protocol. gRPC needs its own
    # port named h2c, which only RawDeployment can add next to HTTP.
    ports = [V1ContainerPort(container_port=HTTP_PORT, name="http1", protocol="TCP")]
    if deployment_mode == RAW_DEPLOYMENT:
        ports.append(V1ContainerPort(container_port=GRPC_PORT, name="h2c", protocol="TCP"))

    # PROTOCOL: how KServe knows that a custom predictor speaks the Open Inference Protocol (v2).
    env_vars = [V1EnvVar(name="MODEL_URI", value=model_uri), V1EnvVar(name="PROTOCOL", value="v2")]
    # writable HOME and TMPDIR on the read-only root filesystem (SCRATCH_VOLUMES)
    env_vars += [V1EnvVar(name="HOME", value=SERVING_HOME), V1EnvVar(name="TMPDIR", value=SERVING_TMP)]
    if s3_secret:
        env_vars += [V1EnvVar(name=key, value_from=V1EnvVarSource(
            secret_key_ref=V1SecretKeySelector(name=s3_secret, key=key))) for key in SECRET_KEYS]
    env_vars += [V1EnvVar(name=key, value=str(value)) for key, value in sorted((env or {}).items())]
    volumes = [V1Volume(name=name, empty_dir=V1EmptyDirVolumeSource(size_limit=size))
               for name, (_, size) in SCRATCH_VOLUMES.items()]
    mounts = [V1VolumeMount(name=name, mount_path=path) for name, (path, _) in SCRATCH_VOLUMES.items()]
    # Drain: Knative refuses a lifecycle of ours (its queue-proxy drains); a Deployment gets the wait
    raw = deployment_mode == RAW_DEPLOYMENT
    lifecycle = V1Lifecycle(pre_stop=V1LifecycleHandler(
        _exec=V1ExecAction(command=["sleep", str(DEPLOY.prestop_s)]))) if raw and DEPLOY.prestop_s else None

    startup = readiness = liveness = None
    if probes:
        # v2 health endpoints of the kserve ModelServer, which listens once the model is loaded.
        startup = V1Probe(http_get=V1HTTPGetAction(path="/v2/health/live", port=HTTP_PORT),
                          period_seconds=10, timeout_seconds=5, failure_threshold=STARTUP_SECONDS // 10)
        readiness = V1Probe(http_get=V1HTTPGetAction(path="/v2/health/ready", port=HTTP_PORT),
                            period_seconds=10, timeout_seconds=5, failure_threshold=3)
        liveness = V1Probe(http_get=V1HTTPGetAction(path="/v2/health/live", port=HTTP_PORT),
                           period_seconds=20, timeout_seconds=5, failure_threshold=3)

    container = V1Container(
        name="kserve-container",  # the name KServe expects for a custom predictor
        image=image,
        ports=ports,
        env=env_vars,
        volume_mounts=mounts,
        lifecycle=lifecycle,
        resources=V1ResourceRequirements(requests=requests or None, limits=limits or None),
        startup_probe=startup,
        readiness_probe=readiness,
        liveness_probe=liveness,
        security_context=V1SecurityContext(
            run_as_non_root=True, run_as_user=SERVING_UID, allow_privilege_escalation=False,
            read_only_root_filesystem=True, capabilities=V1Capabilities(drop=["ALL"]),
            seccomp_profile=V1SeccompProfile(type="RuntimeDefault")),
    )

    predictor = V1beta1PredictorSpec(
        containers=[container],
        service_account_name=service_account or None,
        automount_service_account_token=False,  # the server calls no Kubernetes API
        volumes=volumes,
        # Knative: the revision's timeout becomes the pod's grace period (it refuses one of ours);
        # a Deployment takes it as it is. Both: longer than the longest request.
        timeout=None if raw else DEPLOY.drain_grace_s,
        termination_grace_period_seconds=DEPLOY.drain_grace_s if raw else None,
        node_selector=dict(node_selector) or None,
        tolerations=[V1Toleration(**_snake_keys(t)) for t in tolerations] or None,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        canary_traffic_percent=canary_traffic_percent,
    )

    all_annotations = {
        "serving.kserve.io/deploymentMode": deployment_mode,
        # Prometheus scrapes the server's /metrics on the HTTP port; in Serverless mode the
        # queue-proxy merges them with its own (metric aggregation), one port for the scraper.
        "serving.kserve.io/enable-prometheus-scraping": "true",
        "serving.kserve.io/enable-metric-aggregation": "true",
        "prometheus.kserve.io/port": str(HTTP_PORT),
        "prometheus.kserve.io/path": METRICS_PATH,
        **(annotations or {}),
    }
    all_labels = {**(labels or {}), **PREDICTOR_LABELS}  # the selectors' labels cannot be overridden
    return V1beta1InferenceService(
        api_version=API_VERSION,
        kind=KIND,
        metadata=V1ObjectMeta(name=name, namespace=namespace, labels=all_labels, annotations=all_annotations),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )


def to_dict(isvc) -> dict:
    """The manifest as Kubernetes sees it (camelCase keys, no None values)."""
    return ApiClient().sanitize_for_serialization(isvc)


def _snake_keys(mapping: Mapping[str, Any]) -> dict:
    """Accept tolerations written as in YAML (tolerationSeconds) or as in Python (toleration_seconds)."""
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower(): value for key, value in mapping.items()}


def to_yaml(isvc) -> str:
    return yaml.safe_dump(to_dict(isvc), sort_keys=False)


if __name__ == "__main__":
    # Regenerates infra/k8s/examples/inferenceservice.yaml (the tests check they agree):
    #   python -m brainscan.inferenceservice > infra/k8s/examples/inferenceservice.yaml
    print("# Example: what `brainscan deploy` sends for the champion model, with the defaults.\n"
          "# Generated by `python -m brainscan.inferenceservice`; apply with\n"
          "#   kubectl apply -f infra/k8s/examples/inferenceservice.yaml\n"
          "# (after the base manifests and the S3 secret). Edit the image to your registry's.")
    print(to_yaml(build_inference_service()), end="")
