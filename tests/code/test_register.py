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

from brainscan import bundle, modelstore, registry, storage
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
    # ... with its ONNX model, checked at registration, and the sha256 of its files as the version's tag.
    assert (champion.local_dir / bundle.ONNX_FILE).is_file()
    assert champion.metadata["onnx"]["max_abs_diff_from_keras"] <= bundle.ONNX_TOLERANCE
    assert info["tags"][registry.DIGEST_TAG] == bundle.digest(champion.local_dir) == bundle.recorded_digest(
        champion.local_dir)
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
                                                        test_files, tmp_path, monkeypatch, capsys, caplog):
    url, bucket = mlflow_server
    # the environment decides, as on a cluster; with a user and password (basic auth, which this server ignores)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url.replace("http://", "http://alice:s3cret@"))
    monkeypatch.setenv("BRAINSCAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")  # unset, and unset again after the test
    result = reg.register(str(tiny_trained_bundle_dir), passed_evaluation, pipeline_run="remote-1")
    assert result.registered and result.tracking_uri == url.replace("http://", "http://***@")
    shown = capsys.readouterr()
    assert "s3cret" not in shown.out + shown.err + caplog.text  # MLflow's run links included
    stored = [uri for uri, _ in storage.list_files(f"s3://{bucket}/mlartifacts")]
    assert any(uri.endswith("/model.keras") for uri in stored)
    assert any(uri.endswith("/evaluation/evaluation.json") for uri in stored)
    assert any(uri.endswith("/bundle/model.onnx") for uri in stored)
    registered = modelstore.load_bundle(result.model_uri)
    local = modelstore.load_bundle(str(tiny_trained_bundle_dir))
    np.testing.assert_allclose(_probabilities(registered, test_files), _probabilities(local, test_files), atol=1e-6)
    client, _ = registry.connect()
    tags = client.get_model_version(NAME, result.version).tags
    assert tags["pipeline_run"] == "remote-1"
    assert registry.champion_info(NAME) is None  # the champion moves when a deploy of it serves
    expected = tags[registry.DIGEST_TAG]
    assert expected == bundle.digest(registered.local_dir)

    # One byte of the weights changed in the artifact store: no loader serves it.
    weights = next(uri for uri in stored if uri.endswith("/bundle/model.keras"))
    storage.write_bytes(weights, _flip_one_byte(storage.read_bytes(weights)))
    with pytest.raises(modelstore.BundleIntegrityError, match=f"expected {expected}, found [0-9a-f]{{64}}\\)$"):
        modelstore.load_bundle(result.model_uri)
    import mlflow

    with pytest.raises(bundle.BundleIntegrityError, match=f"refusing to load.*expected {expected}"):
        mlflow.pyfunc.load_model(result.model_uri)  # MLServer's and batch scoring's way in
    # Rewriting the bundle's own record to match does not help: the registry's tag is the reference.
    record = weights.rsplit("/", 1)[0] + "/" + bundle.DIGEST_FILE
    tampered = bundle.digest(storage.download_dir(weights.rsplit("/", 1)[0], tmp_path / "tampered"))
    storage.write_text(record, tampered + "\n")
    with pytest.raises(modelstore.BundleIntegrityError, match=f"expected {expected}, found {tampered}"):
        modelstore.load_bundle(result.model_uri)


def _flip_one_byte(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    return bytes(changed)


def test_a_version_whose_onnx_model_disagrees_with_keras_is_not_registered(
        tiny_trained_bundle_dir, tiny_bundle_dir, passed_evaluation, tmp_path, monkeypatch):
    """The ONNX conversion is checked against Keras at registration: an ONNX model of other weights (here
    the untrained model's) is refused, and the registry is left as it was."""
    from brainscan import onnx_export

    monkeypatch.setenv("BRAINSCAN_CACHE", str(tmp_path / "cache"))
    uri = registry.default_tracking_uri(tmp_path / "work")
    convert = onnx_export.convert_in_child
    monkeypatch.setattr(onnx_export, "convert_in_child",
                        lambda folder, size, path, **kw: convert(tiny_bundle_dir, size, path, **kw))
    result = CliRunner().invoke(app, ["register", "--model", str(tiny_trained_bundle_dir), "--evaluation",
                                      passed_evaluation, "--tracking-uri", uri])
    assert result.exit_code == 1, result.output
    assert "differs from Keras by" in result.output and "refusing to register it" in result.output, result.output
    assert registry.list_versions(NAME, tracking_uri=uri) == []
    assert registry.champion_info(NAME, tracking_uri=uri) is None


def test_a_failed_conversion_says_why(tmp_path):
    """The conversion runs in a child process (its memory leaves with it); its failure is an error with the
    child's last words, and no model.onnx is left behind."""
    from brainscan import onnx_export

    (tmp_path / "bundle").mkdir()
    with pytest.raises(onnx_export.OnnxExportError, match="ONNX conversion exited with code 1: .*no model.keras"):
        onnx_export.export_onnx(tmp_path / "bundle", 32)
    assert not (tmp_path / "bundle" / bundle.ONNX_FILE).exists()


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

        outage = []

        def outage_then_log(*args, **kwargs):
            server.stop(signal.SIGKILL)  # the server goes away half-way through the register step
            outage.append(time.monotonic())  # after staging (the ONNX conversion): the wait counts from here
            return real_log_artifacts(*args, **kwargs)

        monkeypatch.setattr(mlflow, "log_artifacts", outage_then_log)
        result = CliRunner().invoke(app, ["register", "--model", str(tiny_trained_bundle_dir), "--evaluation",
                                          passed_evaluation, "--tracking-uri", server.url])
        waited = time.monotonic() - outage[0]
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


# ----------------------------------------------------------------------------- credentials in tracking URIs
def test_redact_hides_the_user_and_password_of_every_uri():
    from brainscan.redact import redact

    assert redact("https://alice:s3cret@mlflow.example.org:5000/api") == "https://***@mlflow.example.org:5000/api"
    assert redact("http://token@h") == "http://***@h"
    assert redact("a password with @: http://bob:p@ss@h/x") == "a password with @: http://***@h/x"
    assert redact('{"a": "http://u:p@h", "b": "s3://bucket/key@1"}') == '{"a": "http://***@h", "b": "s3://bucket/key@1"}'
    for plain in ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000", "s3://b/p", "models:/brain-tumor@champion",
                  "mail me@example.org", 'http://h","x":"me@y'):
        assert redact(plain) == plain


def test_an_unreachable_tracking_uri_with_credentials_is_shown_without_them(tmp_path):
    """`brainscan model info|list|rollback` against an MLflow that does not answer: one error line that names
    the server, not its password (MLflow's own error, and so a traceback, would repeat the URL as given)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing answers there
    uri = f"http://alice:s3cret@127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    for command in (["model", "info"], ["model", "list"], ["model", "rollback"]):
        done = subprocess.run([sys.executable, "-m", "cli", *command, "--tracking-uri", uri, "--workdir", str(tmp_path)],
                              capture_output=True, text=True, env=env, timeout=300)
        shown = done.stdout + done.stderr
        assert done.returncode == 1 and "s3cret" not in shown, shown[-3000:]
        assert shown.strip().splitlines() == [f"error: MLflow at http://***@127.0.0.1:{port} is unreachable "
                                              + shown.split(" is unreachable ", 1)[1].strip()], shown[-3000:]
