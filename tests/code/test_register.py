"""Registration in MLflow: refusal without a passed gate, the pyfunc + bundle, tags, the candidate
alias, rollback, loading back by models:/brain-tumor@champion once promoted; on sqlite and on a
real `mlflow server` (loopback) whose artifacts live in the session's SeaweedFS. How the champion
follows deploys: tests/code/test_champion.py."""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from brainscan import modelstore, registry, storage
from cli import app
from components import register as reg
from components.evaluate import evaluate, read_images
from brainscan.dataset import read_split
from brainscan.preprocessing import preprocess_batch
from tests.fixtures.registry import MlflowServer

NAME = "brain-tumor"


@pytest.fixture(scope="module")
def passed_evaluation(tiny_trained_bundle_dir, eval_splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("register_eval")
    result = evaluate(str(tiny_trained_bundle_dir), eval_splits, str(out), min_recall=0.85, min_auc=0.9, explain=False)
    assert result.passed, result.gate["reason"]
    return str(out)


@pytest.fixture(scope="module")
def test_files(eval_splits):
    return read_images(read_split(eval_splits, "test")["path"][:6])


def _probabilities(bundle, files):
    return bundle.predict(preprocess_batch(files, bundle.image_size))


def test_failed_gate_is_refused(tiny_bundle_dir, tmp_path):
    uri = registry.default_tracking_uri(tmp_path)
    doc = {"gate": {"passed": False, "reason": "FAILED: test recall 0.5000 < 0.95"}, "threshold": 0.1}
    result = reg.register(str(tiny_bundle_dir), doc, tracking_uri=uri)
    assert not result.registered and "FAILED: test recall 0.5000 < 0.95" in result.reason
    assert registry.champion_info(NAME, tracking_uri=uri) is None


def test_register_load_back_and_rollback_on_sqlite(tiny_trained_bundle_dir, passed_evaluation, test_files,
                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINSCAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory but the work dir
    uri = registry.default_tracking_uri(tmp_path / "work")
    first = reg.register(str(tiny_trained_bundle_dir), passed_evaluation, pipeline_run="run-1", tracking_uri=uri)
    second = reg.register(str(tiny_trained_bundle_dir), passed_evaluation, pipeline_run="run-2", tracking_uri=uri)
    assert first.registered and second.registered and second.champion is None
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "work"}  # no stray ./mlruns
    client, _ = registry.connect(uri)
    for result in (first, second):  # what a deploy of each does once it serves
        registry.promote(client, NAME, result.version)

    info = registry.champion_info(NAME, tracking_uri=uri)
    evaluation = storage.read_json(str(Path(passed_evaluation) / "evaluation.json"))
    assert info["version"] == second.version and info["tags"]["pipeline_run"] == "run-2"
    assert info["threshold"] == pytest.approx(evaluation["threshold"], rel=1e-5)
    assert info["tags"]["dataset_fingerprint"] == evaluation["dataset_fingerprint"] and info["tags"]["code_version"]

    # Loading back by alias: same predictions, calibrated threshold written into the bundle.
    local = modelstore.load_bundle(str(tiny_trained_bundle_dir))
    champion = modelstore.load_bundle(f"models:/{NAME}@champion", tracking_uri=uri)
    assert local.threshold is None and champion.threshold == pytest.approx(evaluation["threshold"])
    np.testing.assert_allclose(_probabilities(champion, test_files), _probabilities(local, test_files), atol=1e-6)

    # The pyfunc serves the same numbers from base64 files.
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    frame = pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(f).decode() for f in test_files]}))
    np.testing.assert_allclose(np.stack(frame["probabilities"]), _probabilities(local, test_files), atol=1e-5)
    assert set(frame) == {"probabilities", "tumor_probability", "tumor", "label"}
    # The decision is the one rule's, at the calibrated thresholds written into the registered bundle.
    expected = champion.policy().decide(frame["probabilities"])
    assert list(frame["tumor"]) == list(expected.tumor) and list(frame["label"]) == list(expected.label)

    # Rollback with the CLI (alias only): champion goes back to the first version, which stays loadable.
    runner = CliRunner()
    rolled = runner.invoke(app, ["model", "rollback", "--tracking-uri", uri, "--workdir", str(tmp_path / "work"),
                                 "--kubeconfig", str(tmp_path / "no-cluster"), "--json"])
    assert rolled.exit_code == 0, rolled.output
    assert registry.champion_info(NAME, tracking_uri=uri)["version"] == first.version
    again = runner.invoke(app, ["model", "rollback", "--tracking-uri", uri, "--workdir", str(tmp_path / "work")])
    assert again.exit_code == 1 and "no previous one" in again.output
    versions = registry.list_versions(NAME, tracking_uri=uri)
    assert [v["version"] for v in versions] == [first.version, second.version]


def test_cli_register_refuses_a_failed_gate(tiny_bundle_dir, eval_splits, tmp_path):
    evaluate(str(tiny_bundle_dir), eval_splits, str(tmp_path / "eval"), explain=False)
    result = CliRunner().invoke(app, ["register", "--model", str(tiny_bundle_dir), "--evaluation",
                                      str(tmp_path / "eval"), "--tracking-uri", registry.default_tracking_uri(tmp_path)])
    assert result.exit_code == 1 and "did not pass" in result.output


@pytest.fixture
def mlflow_server(s3_stack, s3_prefix, tmp_path):
    """`mlflow server` on loopback: sqlite metadata, artifacts proxied to SeaweedFS."""
    bucket = storage.parse_s3(s3_prefix)[0]
    server = MlflowServer(tmp_path, artifacts=f"s3://{bucket}/mlartifacts").start()
    try:
        yield server.url, bucket
    finally:
        server.stop()


def test_register_on_a_remote_server_with_s3_artifacts(mlflow_server, tiny_trained_bundle_dir, passed_evaluation,
                                                        test_files, tmp_path, monkeypatch):
    url, bucket = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # the environment decides, as on a cluster
    monkeypatch.setenv("BRAINSCAN_CACHE", str(tmp_path / "cache"))
    result = reg.register(str(tiny_trained_bundle_dir), passed_evaluation, pipeline_run="remote-1")
    assert result.registered and result.tracking_uri == url
    stored = [uri for uri, _ in storage.list_files(f"s3://{bucket}/mlartifacts")]
    assert any(uri.endswith("/model.keras") for uri in stored)
    assert any(uri.endswith("/evaluation/evaluation.json") for uri in stored)
    registered = modelstore.load_bundle(result.model_uri)
    local = modelstore.load_bundle(str(tiny_trained_bundle_dir))
    np.testing.assert_allclose(_probabilities(registered, test_files), _probabilities(local, test_files), atol=1e-6)
    client, _ = registry.connect()
    assert client.get_model_version(NAME, result.version).tags["pipeline_run"] == "remote-1"
    assert registry.champion_info(NAME) is None  # the champion moves when a deploy of it serves


# ----------------------------------------------------------------------------- MLflow down mid-way
def _versions(server, name=NAME) -> list[str]:
    return [v["version"] for v in registry.list_versions(name, tracking_uri=server.url)]


def test_mlflow_stopped_mid_register_answers_in_one_line_and_changes_nothing(
        tiny_trained_bundle_dir, passed_evaluation, tmp_path, monkeypatch):
    """The tracking server dies while register uploads the evidence: one line naming the tracking URI,
    within MLflow's bounded retries (not its default four minutes), and the registry as it was."""
    import mlflow

    monkeypatch.setenv("BRAINSCAN_CACHE", str(tmp_path / "cache"))
    server = MlflowServer(tmp_path).start()
    try:
        first = reg.register(str(tiny_trained_bundle_dir), passed_evaluation, tracking_uri=server.url)
        assert first.registered
        registry.promote(registry.connect(server.url)[0], NAME, first.version)  # as its deploy would
        before = (registry.champion_info(NAME, tracking_uri=server.url), _versions(server))

        real_log_artifacts = mlflow.log_artifacts

        def outage_then_log(*args, **kwargs):
            server.stop(signal.SIGKILL)  # the server goes away half-way through the register step
            return real_log_artifacts(*args, **kwargs)

        monkeypatch.setattr(mlflow, "log_artifacts", outage_then_log)
        started = time.monotonic()
        result = CliRunner().invoke(app, ["register", "--model", str(tiny_trained_bundle_dir), "--evaluation",
                                          passed_evaluation, "--tracking-uri", server.url])
        waited = time.monotonic() - started
        assert result.exit_code == 1, result.output
        message = result.output.strip().splitlines()
        assert len(message) == 1 and message[0].startswith("error: MLflow at " + server.url + " is unreachable")
        assert "check that the tracking server runs" in message[0] and "left as it was" in message[0]
        assert waited < 150, waited  # bounded retries; MLflow's defaults keep trying for about 248 s
        monkeypatch.setattr(mlflow, "log_artifacts", real_log_artifacts)
        assert mlflow.active_run() is None
        print(f"register gave up {waited:.1f}s after the outage")

        server.start()
        after = (registry.champion_info(NAME, tracking_uri=server.url), _versions(server))
        assert after[1] == before[1], "no new version"
        assert after[0]["version"] == before[0]["version"] and after[0]["history"] == before[0]["history"]
        again = reg.register(str(tiny_trained_bundle_dir), passed_evaluation, tracking_uri=server.url)
        assert again.registered and again.champion == first.version
    finally:
        server.stop()


def test_a_version_whose_registration_did_not_finish_is_withdrawn(tiny_trained_bundle_dir, passed_evaluation,
                                                                  tmp_path, monkeypatch):
    """A failure after the new version exists (here: setting its alias) removes that version again."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("BRAINSCAN_CACHE", str(tmp_path / "cache"))
    uri = registry.default_tracking_uri(tmp_path / "work")
    first = reg.register(str(tiny_trained_bundle_dir), passed_evaluation, tracking_uri=uri)
    registry.promote(registry.connect(uri)[0], NAME, first.version)  # as its deploy would

    def refuse(self, *args, **kwargs):
        raise MlflowException("alias service refused the request")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(MlflowException, match="refused"):
        reg.register(str(tiny_trained_bundle_dir), passed_evaluation, tracking_uri=uri)
    monkeypatch.undo()
    assert [v["version"] for v in registry.list_versions(NAME, tracking_uri=uri)] == [first.version]
    assert registry.champion_info(NAME, tracking_uri=uri)["version"] == first.version
