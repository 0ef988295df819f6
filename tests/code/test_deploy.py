"""deploy: the cluster path against a fake Kubernetes API on 127.0.0.1 (exact objects sent, the wait
for the new generation, the rollback), the local path, the CLI and bad input. The registry side
(the champion moving with what is served) is tests/code/test_champion.py."""

from __future__ import annotations

import json
import sys
import types

import pytest
from typer.testing import CliRunner

from components.deploy import deploy
from brainscan.inferenceservice import build_inference_service, to_dict
from tests.fixtures.kube import write_kubeconfig

NS = "ml-team"
V1, V2 = "models:/brain-tumor/1", "models:/brain-tumor/2"
FAST = {"poll_interval_s": 0.01, "timeout_s": 5, "promote": False}  # no registry here: test_champion.py
CLUSTER = {"image": "registry.local/brainscan-serving:1.0", "gpus": 2, "node_selector": {"pool": "gpu-a100"},
           "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
           "service_account": "brainscan-s3-sa"}
ISVC_URL = f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"


def _deploy(kubeconfig, model_uri, **kwargs):
    return deploy(model_uri, namespace=NS, kubeconfig=kubeconfig, **{**FAST, **CLUSTER, **kwargs})


def _predictor(body):
    return body["spec"]["predictor"]


def _model_uri(body):
    (container,) = _predictor(body)["containers"]
    return next(e["value"] for e in container["env"] if e["name"] == "MODEL_URI")


def test_first_deploy_creates_the_exact_object_and_waits_for_ready(fake_kube):
    api, kubeconfig = fake_kube
    api.ready_after = 2  # Ready on the third status read
    result = _deploy(kubeconfig, V1)

    assert result.ready and result.action == "created" and not result.rolled_back
    methods = [(r.method, r.path) for r in api.requests]
    assert methods == [("GET", f"{ISVC_URL}/brain-tumor"), ("POST", ISVC_URL)] + [("GET", f"{ISVC_URL}/brain-tumor")] * 3
    assert result.polls == 3
    assert all(r.authorization == "Bearer fake-token-for-tests" for r in api.requests)

    sent = api.calls("POST")[0].body
    expected = to_dict(build_inference_service(namespace=NS, model_uri=V1, **CLUSTER))
    assert sent == expected
    predictor = _predictor(sent)
    (container,) = predictor["containers"]
    assert container["image"] == "registry.local/brainscan-serving:1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert predictor["nodeSelector"] == {"pool": "gpu-a100"}
    assert predictor["tolerations"] == CLUSTER["tolerations"]
    assert predictor["serviceAccountName"] == "brainscan-s3-sa"
    assert "canaryTrafficPercent" not in predictor
    assert _model_uri(sent) == V1
    assert result.url == f"http://brain-tumor.{NS}.example.com"
    assert result.generation == 1


def test_canary_patch_waits_for_the_new_generation(fake_kube):
    api, kubeconfig = fake_kube
    assert _deploy(kubeconfig, V1).ready
    api.requests.clear()
    api.ready_after = 1  # the first read after the patch still shows generation 1 as Ready
    result = _deploy(kubeconfig, V2, canary_percent=20)

    assert result.ready and result.action == "patched"
    (patch,) = api.calls("PATCH")
    assert patch.content_type == "application/merge-patch+json"
    assert _predictor(patch.body)["canaryTrafficPercent"] == 20
    assert _model_uri(patch.body) == V2
    assert patch.body == to_dict(build_inference_service(namespace=NS, model_uri=V2, canary_traffic_percent=20,
                                                          **CLUSTER))
    # an old Ready=True at observedGeneration 1 must not count for generation 2
    assert result.generation == 2 and result.polls == 2
    assert result.previous_model_uri == V1 and result.canary_percent == 20
    assert not api.calls("PUT")


def test_full_deploy_after_a_canary_promotes_it_to_all_traffic(fake_kube):
    api, kubeconfig = fake_kube
    assert _deploy(kubeconfig, V1).ready
    assert _deploy(kubeconfig, V2, canary_percent=10).ready
    api.requests.clear()
    assert _deploy(kubeconfig, V2).ready
    (patch,) = api.calls("PATCH")
    # a merge patch that leaves canaryTrafficPercent out would keep the 10 %
    assert _predictor(patch.body)["canaryTrafficPercent"] == 100
    assert _predictor(api.objects[(NS, "brain-tumor")])["canaryTrafficPercent"] == 100


def test_never_ready_rolls_back_to_the_previous_spec(fake_kube):
    api, kubeconfig = fake_kube
    assert _deploy(kubeconfig, V1).ready
    v1_object = json.loads(json.dumps(api.objects[(NS, "brain-tumor")]))
    api.requests.clear()
    api.ready_after = {2: None, 3: 1}  # the new model never; the restored one (generation 3) on the 2nd read
    result = _deploy(kubeconfig, V2, timeout_s=0.3, poll_interval_s=0.02)

    assert not result.ready and result.rolled_back and result.rollback_ready
    assert "did not become Ready within 0.3s" in result.message and f"rolled back to the previous spec ({V1})" in result.message
    assert "Ready again" in result.message
    methods = [r.method for r in api.requests]
    assert methods[:2] == ["GET", "PATCH"] and methods[-3:] == ["PUT", "GET", "GET"]  # then waits for the rollback
    assert methods.count("GET") >= 4  # it waited (polled) before giving up
    assert "PATCH" not in methods[2:]  # no canary to reset
    put = api.calls("PUT")[0]
    assert put.body["spec"] == v1_object["spec"]
    assert put.body["metadata"]["name"] == "brain-tumor"  # (the fake answers 409 to a stale resourceVersion)
    stored = api.objects[(NS, "brain-tumor")]
    assert _model_uri(stored) == V1 and stored["metadata"]["generation"] == 3


def test_never_ready_canary_gets_its_traffic_back_then_the_old_spec(fake_kube):
    api, kubeconfig = fake_kube
    assert _deploy(kubeconfig, V1).ready
    v1_spec = json.loads(json.dumps(api.objects[(NS, "brain-tumor")]["spec"]))
    api.requests.clear()
    api.ready_after = None
    result = _deploy(kubeconfig, V2, canary_percent=25, timeout_s=0.2, poll_interval_s=0.02)

    assert not result.ready and result.rolled_back and result.rollback_ready is False
    assert "NOT Ready either" in result.message
    patches = api.calls("PATCH")
    assert [_predictor(p.body).get("canaryTrafficPercent") for p in patches] == [25, 0]
    assert patches[1].body == {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
                               "spec": {"predictor": {"canaryTrafficPercent": 0}}}
    assert "PUT" in [r.method for r in api.requests]
    assert api.objects[(NS, "brain-tumor")]["spec"] == v1_spec


def test_first_deploy_never_ready_fails_without_a_rollback(fake_kube):
    api, kubeconfig = fake_kube
    api.ready_after = None
    result = _deploy(kubeconfig, V1, timeout_s=0.1, poll_interval_s=0.02)
    assert not result.ready and not result.rolled_back
    assert "no previous revision to roll back to" in result.message
    assert "Ready=False" in result.message
    assert {r.method for r in api.requests} == {"GET", "POST"}


def test_unauthorized_api_is_a_clear_error(fake_kube, tmp_path):
    api, _ = fake_kube
    bad = write_kubeconfig(tmp_path / "bad-kubeconfig", api.url)
    bad.write_text(bad.read_text().replace("fake-token-for-tests", "wrong-token"))
    with pytest.raises(RuntimeError, match="cannot read InferenceService ml-team/brain-tumor: 401"):
        _deploy(bad, V1)
    assert not api.objects


def test_missing_kubeconfig_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="no usable Kubernetes configuration"):
        _deploy(tmp_path / "absent-kubeconfig", V1)


@pytest.mark.parametrize("kwargs, message", [
    ({"model_uri": ""}, "no model URI"),
    ({"canary_percent": 0}, "canary percent"),
    ({"canary_percent": 101}, "canary percent"),
    ({"timeout_s": 0}, "timeout"),
])
def test_bad_arguments(kwargs, message, tmp_path):
    args = {"model_uri": V1, **kwargs}
    with pytest.raises(ValueError, match=message):
        deploy(args.pop("model_uri"), kubeconfig=tmp_path / "unused", **args)


def test_local_deploy_starts_then_reloads_the_local_server(monkeypatch, tmp_path):
    """The call contract with brainscan.local.predictor (whose own tests run the real server)."""
    from components import deploy as deploy_module

    calls, running = [], {}
    fake_local = types.ModuleType("brainscan.local.predictor")

    def start(model_uri, workdir):
        calls.append((model_uri, workdir))
        running[workdir] = types.SimpleNamespace(model_uri=model_uri, url="http://127.0.0.1:18080")
        return running[workdir]

    fake_local.start = start
    fake_local.status = lambda workdir: running.get(workdir)
    fake_local.ready = lambda url: True
    monkeypatch.setattr(deploy_module, "predictor", fake_local)

    first = deploy(V1, local=True, workdir=tmp_path, promote=False)
    assert (first.ready, first.target, first.action, first.url) == (True, "local", "started", "http://127.0.0.1:18080")
    second = deploy(V2, local=True, workdir=tmp_path, promote=False)
    assert (second.action, second.previous_model_uri, second.model_uri) == ("reloaded", V1, V2)
    assert calls == [(V1, tmp_path), (V2, tmp_path)]


def test_cli_deploy_json_and_failure_exit(fake_kube):
    from cli import app

    api, kubeconfig = fake_kube
    runner = CliRunner()
    common = ["deploy", "--namespace", NS, "--kubeconfig", str(kubeconfig), "--poll-interval", "0.01", "--gpus", "1",
              "--no-promote"]
    ok = runner.invoke(app, common + ["--model", V1, "--timeout", "5", "--json"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["ready"] is True and summary["model_uri"] == V1 and summary["action"] == "created"

    api.ready_after = None
    bad = runner.invoke(app, common + ["--model", V2, "--canary", "10", "--timeout", "0.1"])
    assert bad.exit_code == 1
    assert "deploy failed" in bad.stderr and "rolled back" in bad.stderr
    assert _model_uri(api.objects[(NS, "brain-tumor")]) == V1

    refused = runner.invoke(app, common + ["--model", V2, "--canary", "150"])
    assert refused.exit_code != 0 and not api.calls("POST")[1:]
