"""RBAC derived from the code: each Role in infra/k8s grants exactly what its user calls.

The deploy step runs its create, patch, rollback and canary paths against the fake Kubernetes API
(tests/fixtures/kube.py), the retrain watcher's KFP calls run against the fake KFP API
(tests/code/test_kfp_client.py); every recorded request is turned into the (API group, resource,
verb) the API server would authorize, and the Role must be that set: a verb the code never uses
fails the test as surely as a missing one.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

from components.deploy import deploy
from pipelines import kfp_client
from tests.code.test_kfp_client import FakeKfp, fake_kfp  # noqa: F401 (the fixture, and its class)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
NS = "kubeflow-user"
# promote=False: moving the champion alias talks to MLflow, not Kubernetes (tests/code/test_champion.py)
FAST = {"poll_interval_s": 0.01, "timeout_s": 5, "promote": False}

# /apis/GROUP/VERSION/namespaces/NS/RESOURCE[/NAME[/SUBRESOURCE]] (core: /api/v1/...)
KUBE_PATH = re.compile(r"^/apis?/(?:(?P<group>[^/]+)/)?(?P<version>v[^/]+)/namespaces/[^/]+/(?P<resource>[^/]+)"
                       r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")
# The KFP API server authorizes each v2beta1 call as a verb on a pipelines.kubeflow.org resource in the
# namespace (a SubjectAccessReview; kubeflow/pipelines backend/src/apiserver/server/run_server.go and
# experiment_server.go): list and create on the collection, get and delete on one object, and the
# custom verbs archive, unarchive, terminate, retry as `:verb` suffixes.
KFP_PATH = re.compile(r"^/apis/v2beta1/(?P<resource>runs|experiments|recurringruns|pipelines)"
                      r"(?:/(?P<id>[^/:]+))?(?::(?P<custom>\w+))?$")


def kube_permission(method: str, raw_path: str) -> tuple[str, str, str]:
    """(apiGroup, resource[/subresource], verb) that the Kubernetes API server checks for a request."""
    url = urlparse(raw_path)
    match = KUBE_PATH.match(url.path)
    assert match, f"not a namespaced resource path: {raw_path}"
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    named = match["name"] is not None
    if method == "GET":
        verb = "get" if named else ("watch" if parse_qs(url.query).get("watch") == ["true"] else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if named else "deletecollection"}[method]
    return match["group"] or "", resource, verb


def kfp_permission(method: str, path: str) -> tuple[str, str, str] | None:
    """(apiGroup, resource, verb) that the KFP API asks Kubernetes about; None for calls it does not authorize."""
    if path.endswith("/healthz"):
        return None
    match = KFP_PATH.match(path)
    assert match, f"a KFP call this table does not know: {method} {path}"
    if match["custom"]:
        verb = match["custom"]
    elif method == "GET":
        verb = "get" if match["id"] else "list"
    else:
        verb = {"POST": "create", "DELETE": "delete"}[method]
    return "pipelines.kubeflow.org", match["resource"], verb


def role_grants(path: Path, name: str) -> set[tuple[str, str, str]]:
    (role,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc["kind"] == "Role"
               and doc["metadata"]["name"] == name]
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_permission_tables_read_requests_as_the_api_servers_do():
    isvcs = f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"
    assert kube_permission("GET", f"{isvcs}/bt") == ("serving.kserve.io", "inferenceservices", "get")
    assert kube_permission("GET", isvcs) == ("serving.kserve.io", "inferenceservices", "list")
    assert kube_permission("GET", f"{isvcs}?watch=true") == ("serving.kserve.io", "inferenceservices", "watch")
    assert kube_permission("PUT", f"{isvcs}/bt/status") == ("serving.kserve.io", "inferenceservices/status", "update")
    assert kube_permission("DELETE", f"/api/v1/namespaces/{NS}/secrets/s") == ("", "secrets", "delete")
    assert kfp_permission("GET", "/apis/v2beta1/runs") == ("pipelines.kubeflow.org", "runs", "list")
    assert kfp_permission("GET", "/apis/v2beta1/runs/rid-1") == ("pipelines.kubeflow.org", "runs", "get")
    assert kfp_permission("POST", "/apis/v2beta1/runs/rid-1:terminate") == ("pipelines.kubeflow.org", "runs",
                                                                           "terminate")
    assert kfp_permission("GET", "/apis/v2beta1/healthz") is None


def _deploy_paths(kubeconfig, api) -> None:
    """Every path of the deploy step: create, patch, a canary, a promotion, a failed rollout rolled back
    (the canary's traffic reset, then the old spec re-applied)."""
    assert deploy("models:/brain-tumor/1", namespace=NS, kubeconfig=kubeconfig, **FAST).action == "created"
    assert deploy("models:/brain-tumor/2", namespace=NS, kubeconfig=kubeconfig, canary_percent=10, **FAST).ready
    assert deploy("models:/brain-tumor/2", namespace=NS, kubeconfig=kubeconfig, **FAST).ready  # promotion
    api.ready_after = None
    failed = deploy("models:/brain-tumor/3", namespace=NS, kubeconfig=kubeconfig, canary_percent=10,
                    **{**FAST, "timeout_s": 0.1})
    assert failed.rolled_back


def test_deployer_role_grants_exactly_what_the_deploy_step_calls(fake_kube):
    api, kubeconfig = fake_kube
    _deploy_paths(kubeconfig, api)
    used = {kube_permission(r.method, r.path) for r in api.requests}
    assert {verb for _, _, verb in used} == {"get", "create", "patch", "update"}  # the paths above ran
    assert role_grants(K8S / "base" / "rbac-deploy.yaml", "brainscan-deployer") == used


def test_watcher_role_grants_exactly_what_the_watcher_calls(fake_kfp):  # noqa: F811 (the imported fixture)
    """The watcher's only KFP calls: `kfp_client.submit_once` (pipelines/watcher.py through cli/retrain.py),
    for new data (no run yet: the experiment is looked up or created, the run created) and for data it
    submitted before (the run is found)."""
    host, fake = fake_kfp
    name = "brainscan-retrain-0123456789abcdef"
    assert kfp_client.submit_once(host, name, {"source": "s3://scans/raw"}, namespace=NS).action == "submit"
    assert kfp_client.submit_once(host, name, {"source": "s3://scans/raw"}, namespace=NS).action == "exists"
    used = {kfp_permission(r["method"], r["path"]) for r in fake.requests} - {None}
    assert used == {("pipelines.kubeflow.org", "experiments", "list"),
                    ("pipelines.kubeflow.org", "experiments", "create"),
                    ("pipelines.kubeflow.org", "runs", "list"), ("pipelines.kubeflow.org", "runs", "create")}
    assert role_grants(K8S / "retrain" / "rbac-watch.yaml", "brainscan-retrain") == used
