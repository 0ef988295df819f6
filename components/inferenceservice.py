"""The KServe InferenceService that runs the brainscan model server on GPU nodes.

`build_inference_service(...)` turns deployment parameters into a kserve SDK
`V1beta1InferenceService` (a custom predictor container running the serving image from
`infra/docker/serving.Dockerfile`). `components/deploy.py` sends it with `KServeClient`;
`to_dict` gives the plain manifest (for `kubectl apply`, the tests and the docs).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import yaml
from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
from kubernetes.client import (ApiClient, V1Capabilities, V1Container, V1ContainerPort, V1EnvFromSource, V1EnvVar,
                               V1HTTPGetAction, V1ObjectMeta, V1Probe, V1ResourceRequirements, V1SecretEnvSource,
                               V1SecurityContext, V1Toleration)

from brainscan.config import CHAMPION_URI, MODEL_NAME, NAMESPACE, S3_SECRET, SERVING_IMAGE, SERVING_SERVICE_ACCOUNT, ServeSettings

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
GPU_RESOURCE = "nvidia.com/gpu"

# Defaults that match infra/k8s (the secret and service account created there).
DEFAULT_IMAGE = SERVING_IMAGE
DEFAULT_SERVICE_ACCOUNT = SERVING_SERVICE_ACCOUNT
DEFAULT_S3_SECRET = S3_SECRET
DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_TOLERATIONS = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
DEFAULT_RESOURCES = {
    "requests": {"cpu": "1", "memory": "4Gi"},
    "limits": {"cpu": "4", "memory": "8Gi"},
}
HTTP_PORT = ServeSettings.http_port
GRPC_PORT = ServeSettings.grpc_port
SERVING_UID = 1000  # the non-root user of the serving image


def build_inference_service(
    name: str = MODEL_NAME,
    namespace: str = NAMESPACE,
    image: str = DEFAULT_IMAGE,
    model_uri: str = CHAMPION_URI,
    gpus: int = 1,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] | None = None,
    service_account: str | None = DEFAULT_SERVICE_ACCOUNT,
    min_replicas: int = 1,
    max_replicas: int = 3,
    canary_traffic_percent: int | None = None,
    resources: Mapping[str, Mapping[str, str]] | None = None,
    probes: bool = True,
    s3_secret: str | None = DEFAULT_S3_SECRET,
    env: Mapping[str, str] | None = None,
    deployment_mode: str = "Serverless",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
):
    """Build the InferenceService for one model URI.

    - `gpus` > 0 adds an `nvidia.com/gpu` limit and, unless given otherwise, the GPU node
      selector and toleration; `gpus=0` gives a CPU-only predictor with neither.
    - `canary_traffic_percent` (0-100): share of traffic the new revision gets while the
      previous one keeps the rest (KServe canary rollout, Serverless mode).
    - `s3_secret`: every key of that secret becomes an environment variable of the server
      (AWS_*, MLFLOW_*), so the server reads `models:/` and `s3://` URIs; the service
      account references the same secret for KServe's own storage initializer.
    - `deployment_mode`: "Serverless" (Knative: one container port, so only HTTP 8080) or
      "RawDeployment" (a plain Deployment: HTTP 8080 and gRPC 8081 as h2c).
    """
    if not model_uri:
        raise ValueError("model_uri is empty: give a models:/, s3:// or local model URI")
    if gpus < 0:
        raise ValueError(f"gpus must be 0 or more, got {gpus}")
    if min_replicas < 0 or max_replicas < max(min_replicas, 1):
        raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                         f"got {min_replicas}..{max_replicas}")
    if canary_traffic_percent is not None and not 0 <= canary_traffic_percent <= 100:
        raise ValueError(f"canary_traffic_percent must be within 0..100, got {canary_traffic_percent}")
    if deployment_mode not in ("Serverless", "RawDeployment"):
        raise ValueError(f"deployment_mode must be Serverless or RawDeployment, got {deployment_mode!r}")
    if canary_traffic_percent is not None and deployment_mode != "Serverless":
        # KServe splits traffic between revisions through Knative; a plain Deployment has no revisions
        raise ValueError("canary_traffic_percent needs deployment_mode Serverless")

    limits = dict((resources or DEFAULT_RESOURCES).get("limits", {}))
    requests = dict((resources or DEFAULT_RESOURCES).get("requests", {}))
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)  # extended resources: the limit is what the scheduler counts
    if node_selector is None:
        node_selector = DEFAULT_NODE_SELECTOR if gpus else {}
    if tolerations is None:
        tolerations = DEFAULT_TOLERATIONS if gpus else ()

    # Knative routes a single port; name "http1" tells it the protocol. gRPC needs its own
    # port named h2c, which only RawDeployment can add next to HTTP.
    ports = [V1ContainerPort(container_port=HTTP_PORT, name="http1", protocol="TCP")]
    if deployment_mode == "RawDeployment":
        ports.append(V1ContainerPort(container_port=GRPC_PORT, name="h2c", protocol="TCP"))

    env_vars = [V1EnvVar(name="MODEL_URI", value=model_uri)]
    env_vars += [V1EnvVar(name=key, value=str(value)) for key, value in sorted((env or {}).items())]
    env_from = [V1EnvFromSource(secret_ref=V1SecretEnvSource(name=s3_secret))] if s3_secret else None

    readiness = liveness = None
    if probes:
        # v2 health endpoints of the kserve ModelServer: ready once the model is loaded.
        # Loading TensorFlow and pulling the model from S3 takes a while, hence the delays.
        readiness = V1Probe(http_get=V1HTTPGetAction(path="/v2/health/ready", port=HTTP_PORT),
                            initial_delay_seconds=10, period_seconds=10, timeout_seconds=5, failure_threshold=3)
        liveness = V1Probe(http_get=V1HTTPGetAction(path="/v2/health/live", port=HTTP_PORT),
                           initial_delay_seconds=60, period_seconds=20, timeout_seconds=5, failure_threshold=3)

    container = V1Container(
        name="kserve-container",  # the name KServe expects for a custom predictor
        image=image,
        ports=ports,
        env=env_vars,
        env_from=env_from,
        resources=V1ResourceRequirements(requests=requests or None, limits=limits or None),
        readiness_probe=readiness,
        liveness_probe=liveness,
        security_context=V1SecurityContext(
            run_as_non_root=True, run_as_user=SERVING_UID, allow_privilege_escalation=False,
            capabilities=V1Capabilities(drop=["ALL"])),
    )

    predictor = V1beta1PredictorSpec(
        containers=[container],
        service_account_name=service_account or None,
        node_selector=dict(node_selector) or None,
        tolerations=[V1Toleration(**_snake_keys(t)) for t in tolerations] or None,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        canary_traffic_percent=canary_traffic_percent,
    )

    all_annotations = {
        "serving.kserve.io/deploymentMode": deployment_mode,
        # the kserve ModelServer serves Prometheus metrics on its HTTP port
        "serving.kserve.io/enable-prometheus-scraping": "true",
        **(annotations or {}),
    }
    all_labels = {"app.kubernetes.io/name": "brainscan", "app.kubernetes.io/component": "predictor",
                  **(labels or {})}
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
    #   python -m brainscan.components.inferenceservice > infra/k8s/examples/inferenceservice.yaml
    print("# Example: what `brainscan deploy` sends for the champion model, with the defaults.\n"
          "# Generated by `python -m brainscan.components.inferenceservice`; apply with\n"
          "#   kubectl apply -f infra/k8s/examples/inferenceservice.yaml\n"
          "# (after the base manifests and the S3 secret). Edit the image to your registry's.")
    print(to_yaml(build_inference_service()), end="")
