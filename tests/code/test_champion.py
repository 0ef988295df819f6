"""The registry and what is served never disagree: registration leaves `champion` alone, a deploy
moves it only once the InferenceService is Ready on that version (or the local server answers
with it), a failed deploy leaves the champion and the InferenceService on the previous version,
`brainscan model rollback --deploy` serves the previous version before it moves the alias, and
a withdrawn registration never deletes a version an alias points at.

Against the fake Kubernetes API (tests/fixtures/kube.py) and one real `mlflow server` on
loopback; every test registers its own model name with the real register step.
"""

from __future__ import annotations

import json
import types
import uuid

import pytest
from typer.testing import CliRunner

from brainscan import registry
from brainscan.config import CANDIDATE_ALIAS, CHAMPION_ALIAS, champion_uri, version_uri
from cli import app
from components import deploy as deploy_module
from components import register as reg
from components.deploy import deploy, is_ready, model_uri_of
from tests.fixtures.kube import FAILED
from tests.fixtures.registry import MlflowServer

NS = "ml-team"
ISVC = "brain-tumor"
FAST = {"poll_interval_s": 0.01, "timeout_s": 5}
CLUSTER = {"image": "registry.local/brainscan-serving:1.0", "gpus": 0}
EVALUATION = {"gate": {"passed": True, "reason": "PASSED (test stand-in)"}, "threshold": 0.5,
              "test": {"recall": 1.0, "roc_auc": 1.0}, "dataset_fingerprint": "champion-test"}


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("champion_mlflow")).start()
    try:
        yield server.url
    finally:
        server.stop()


class Model:
    """One registered model name on the shared server: register versions, read its aliases."""

    def __init__(self, url: str, bundle_dir):
        self.url, self.bundle_dir = url, bundle_dir
        self.name = f"bt-{uuid.uuid4().hex[:10]}"
        self.client, _ = registry.connect(url)

    def register(self) -> str:
        result = reg.register(str(self.bundle_dir), EVALUATION, name=self.name, tracking_uri=self.url)
        assert result.registered, result.reason
        return result.version

    def uri(self, version: str) -> str:
        return version_uri(self.name, version)

    @property
    def champion(self) -> str | None:
        return registry.champion_version(self.client, self.name)

    def aliases(self, version: str) -> list[str]:
        return sorted(registry.aliases_of(self.client, self.name, version))

    def versions(self) -> list[str]:
        return [v["version"] for v in registry.list_versions(self.name, tracking_uri=self.url)]


@pytest.fixture
def model(mlflow_url, tiny_bundle_dir, tmp_path, monkeypatch) -> Model:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)  # as in the deploy step's pod
    monkeypatch.setenv("BRAINSCAN_CACHE", str(tmp_path / "cache"))
    return Model(mlflow_url, tiny_bundle_dir)


def _deploy(kubeconfig, model_uri, **kwargs):
    return deploy(model_uri, namespace=NS, kubeconfig=kubeconfig, **{**FAST, **CLUSTER, **kwargs})


def _served(api, name=ISVC) -> str:
    return model_uri_of(api.objects[(NS, name)])


def _deployed(model: Model, kubeconfig) -> tuple[str, str]:
    """Two versions, each registered and deployed: (v1, v2), champion and InferenceService on v2."""
    v1 = model.register()
    assert _deploy(kubeconfig, model.uri(v1)).ready
    v2 = model.register()
    assert _deploy(kubeconfig, model.uri(v2)).ready
    return v1, v2


# ----------------------------------------------------------------------------- registration
def test_registration_marks_a_candidate_and_leaves_the_champion_alone(model):
    v1 = model.register()
    assert model.champion is None and model.aliases(v1) == [CANDIDATE_ALIAS]
    registry.promote(model.client, model.name, v1)  # what a deploy of v1 does once it serves
    assert model.aliases(v1) == [CHAMPION_ALIAS]
    v2 = model.register()
    assert model.champion == v1, "registration must not move the champion: nothing serves the new version yet"
    assert model.aliases(v2) == [CANDIDATE_ALIAS]


def test_a_withdrawn_registration_never_deletes_a_version_an_alias_points_at(model, monkeypatch):
    """The registration fails after the version exists, and by then an alias points at it (here: it
    was promoted meanwhile): deleting it would delete the champion with it."""
    from mlflow import MlflowClient

    first = model.register()
    registry.promote(model.client, model.name, first)
    real_tag = MlflowClient.set_model_version_tag

    def promoted_meanwhile_then_fail(self, name, version, key, value):
        real_tag(self, name, version, key, value)
        registry.promote(model.client, name, version)
        raise RuntimeError("tag service refused the request")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", promoted_meanwhile_then_fail)
    with pytest.raises(RuntimeError, match="refused"):
        model.register()
    monkeypatch.undo()
    second = str(int(first) + 1)
    assert model.versions() == [first, second], "a version an alias points at must not be deleted"
    assert model.champion == second

    # without an alias on it, the half-registered version is removed as before
    def refuse(self, *args, **kwargs):
        raise RuntimeError("refused again")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", refuse)
    with pytest.raises(RuntimeError, match="refused again"):
        model.register()
    monkeypatch.undo()
    assert model.versions() == [first, second] and model.champion == second


# ----------------------------------------------------------------------------- deploy
def test_a_ready_deploy_moves_the_champion_with_the_inference_service(model, fake_kube, monkeypatch):
    api, kubeconfig = fake_kube
    promoted_when = []
    real_promote = registry.promote

    def watched_promote(client, name, version, *args, **kwargs):
        stored = api.objects.get((NS, ISVC))
        promoted_when.append((version, model_uri_of(stored),
                              stored is not None and is_ready(stored, stored["metadata"]["generation"])))
        return real_promote(client, name, version, *args, **kwargs)

    monkeypatch.setattr(registry, "promote", watched_promote)
    api.ready_after = 2
    v1 = model.register()
    first = _deploy(kubeconfig, model.uri(v1))
    assert first.ready and model.champion == v1 and _served(api) == model.uri(v1)

    v2 = model.register()
    assert model.champion == v1, "registered, not served yet: the champion stays"
    second = _deploy(kubeconfig, model.uri(v2))
    assert second.ready and model.champion == v2 and _served(api) == model.uri(v2)
    # each move happened while the InferenceService was Ready on that very version
    assert promoted_when == [(v1, model.uri(v1), True), (v2, model.uri(v2), True)]
    assert first.promoted and (first.champion, first.previous_champion) == (v1, None)
    assert (second.champion, second.previous_champion) == (v2, v1)
    assert model.aliases(v2) == [CHAMPION_ALIAS], "the candidate alias goes once it is the champion"
    assert f"champion: version {v1} -> {v2}" in second.message
    assert registry.history(model.client, model.name) == [v1, v2]


@pytest.mark.parametrize("new_generation", [None, FAILED], ids=["never-ready", "ready-false"])
def test_a_failed_deploy_leaves_champion_and_inference_service_on_the_previous_version(model, fake_kube,
                                                                                      new_generation):
    api, kubeconfig = fake_kube
    v1 = model.register()
    assert _deploy(kubeconfig, model.uri(v1)).ready
    v2 = model.register()
    api.ready_after = {2: new_generation, 3: 0}  # v2 fails; the restored v1 spec (generation 3) is Ready
    result = _deploy(kubeconfig, model.uri(v2), timeout_s=0.3, poll_interval_s=0.02)

    assert not result.ready and result.rolled_back and result.rollback_ready
    assert _served(api) == model.uri(v1)
    assert model.champion == v1, "the champion must stay on the version the InferenceService serves"
    assert not result.promoted and model.aliases(v2) == [CANDIDATE_ALIAS]


def test_a_canary_leaves_the_champion_until_the_version_takes_all_traffic(model, fake_kube):
    api, kubeconfig = fake_kube
    v1 = model.register()
    assert _deploy(kubeconfig, model.uri(v1)).ready
    v2 = model.register()
    canary = _deploy(kubeconfig, model.uri(v2), canary_percent=20)
    assert canary.ready and model.champion == v1, "a canary is not the champion"
    assert not canary.promoted and "the champion stays" in canary.message
    full = _deploy(kubeconfig, model.uri(v2))
    assert full.ready and full.promoted and model.champion == v2 and _served(api) == model.uri(v2)


def test_a_promotion_the_registry_refuses_rolls_the_deploy_back(model, fake_kube, monkeypatch):
    """Ready on the new version, but the alias cannot move: the InferenceService goes back, so that
    both stay on the previous version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    api, kubeconfig = fake_kube
    v1 = model.register()
    assert _deploy(kubeconfig, model.uri(v1)).ready
    v2 = model.register()
    real_alias = MlflowClient.set_registered_model_alias

    def refuse_champion(self, name, alias, version):
        if alias == CHAMPION_ALIAS:
            raise MlflowException("alias service refused the request")
        return real_alias(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse_champion)
    result = _deploy(kubeconfig, model.uri(v2))
    monkeypatch.undo()
    assert not result.ready and result.rolled_back and result.rollback_ready
    assert "the registry did not make it the champion (alias service refused the request)" in result.message
    assert model.champion == v1 and _served(api) == model.uri(v1)


def test_deploy_refuses_a_version_the_registry_does_not_have_before_touching_the_cluster(model, fake_kube):
    api, kubeconfig = fake_kube
    model.register()
    with pytest.raises(registry.RegistryError, match="is not a registered version"):
        _deploy(kubeconfig, model.uri("99"))
    assert api.requests == []


def test_local_deploy_promotes_once_the_server_answers_and_restores_the_previous_model(model, monkeypatch,
                                                                                       tmp_path):
    """The call contract with brainscan.local.predictor (its own tests and the e2e run the real server)."""
    running, failing = {}, set()
    fake_local = types.ModuleType("brainscan.local.predictor")

    def start(model_uri, workdir):
        running.pop(workdir, None)  # start stops the running server first
        if model_uri in failing:
            raise RuntimeError("model server exited with code 1 while starting")
        running[workdir] = types.SimpleNamespace(model_uri=model_uri, url="http://127.0.0.1:18080")
        return running[workdir]

    fake_local.start, fake_local.status = start, lambda workdir: running.get(workdir)
    fake_local.ready = lambda url: True
    fake_local.stop = lambda workdir: running.pop(workdir, None) is not None
    monkeypatch.setattr(deploy_module, "predictor", fake_local)

    v1 = model.register()
    first = deploy(model.uri(v1), local=True, workdir=tmp_path)
    assert first.ready and model.champion == v1
    v2 = model.register()
    failing.add(model.uri(v2))
    failed = deploy(model.uri(v2), local=True, workdir=tmp_path)
    assert running.get(tmp_path) and running[tmp_path].model_uri == model.uri(v1) and model.champion == v1
    assert not failed.ready and failed.rolled_back and failed.rollback_ready and first.promoted
    failing.clear()
    assert deploy(model.uri(v2), local=True, workdir=tmp_path).ready and model.champion == v2

    # and back with `brainscan model rollback --deploy --local`: served first, then the alias
    rolled = CliRunner().invoke(app, ["model", "rollback", "--name", model.name, "--tracking-uri", model.url,
                                      "--deploy", "--local", "--workdir", str(tmp_path)])
    assert rolled.exit_code == 0, rolled.output
    assert running[tmp_path].model_uri == model.uri(v1) and model.champion == v1


# ----------------------------------------------------------------------------- rollback
def _rollback(model: Model, kubeconfig, *args: str):
    return CliRunner().invoke(app, ["model", "rollback", "--name", model.name, "--tracking-uri", model.url,
                                    "--namespace", NS, "--kubeconfig", str(kubeconfig), "--poll-interval", "0.02",
                                    *args])


def test_rollback_redeploys_the_previous_version_then_moves_the_alias(model, fake_kube):
    api, kubeconfig = fake_kube
    v1, v2 = _deployed(model, kubeconfig)
    before = json.loads(json.dumps(api.objects[(NS, ISVC)]["spec"]))
    api.requests.clear()
    result = _rollback(model, kubeconfig, "--deploy", "--timeout", "5", "--json")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["from_version"], summary["to_version"], summary["redeployed"]) == (v2, v1, True)
    assert _served(api) == model.uri(v1) and model.champion == v1
    # the InferenceService as it ran, only its model changed
    after = api.objects[(NS, ISVC)]["spec"]
    (container,) = after["predictor"]["containers"]
    assert container["image"] == CLUSTER["image"]
    assert json.dumps(after).replace(model.uri(v1), model.uri(v2)) == json.dumps(before)
    assert [r.method for r in api.requests if r.method != "GET"] == ["PATCH"]


def test_a_rollback_whose_redeploy_is_not_ready_moves_nothing(model, fake_kube):
    api, kubeconfig = fake_kube
    v1, v2 = _deployed(model, kubeconfig)
    api.ready_after = {3: None, 4: 0}  # the redeploy of v1 never; v2's spec restored (generation 4) at once
    result = _rollback(model, kubeconfig, "--deploy", "--timeout", "0.3")

    assert result.exit_code == 1
    assert f"the champion stays version {v2}" in result.output and "rolled back" in result.output
    assert model.champion == v2 and _served(api) == model.uri(v2)


def test_alias_only_rollback_names_what_still_serves_the_old_version(model, fake_kube, tmp_path):
    api, kubeconfig = fake_kube
    v1, v2 = _deployed(model, kubeconfig)
    # another InferenceService that follows the alias, and one that serves another model
    assert _deploy(kubeconfig, champion_uri(model.name), name="follower").ready
    assert _deploy(kubeconfig, "s3://models/other", name="other").ready
    result = _rollback(model, kubeconfig, "--workdir", str(tmp_path), "--json")

    assert result.exit_code == 0, result.output
    assert f"champion: version {v2} -> {v1} (alias only: nothing was redeployed)" in result.stderr
    assert f"InferenceService {NS}/{ISVC} (pins {model.uri(v2)})" in result.stderr
    assert f"InferenceService {NS}/follower (follows {champion_uri(model.name)}" in result.stderr
    assert f"brainscan deploy --model {model.uri(v1)}" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(summary["still_serving_old"]) == 2 and summary["redeployed"] is False
    assert model.champion == v1 and _served(api) == model.uri(v2)  # only the alias moved, as it says

    # without a usable Kubernetes configuration it says what it could not check
    v3 = model.register()
    assert _deploy(kubeconfig, model.uri(v3)).ready
    blind = CliRunner().invoke(app, ["model", "rollback", "--name", model.name, "--tracking-uri", model.url,
                                     "--kubeconfig", str(tmp_path / "absent"), "--workdir", str(tmp_path)])
    assert blind.exit_code == 0, blind.output
    assert f"champion: version {v3} -> {v1}" in blind.stderr
    assert "not checked: InferenceServices in kubeflow-user (no usable Kubernetes configuration" in blind.stderr
