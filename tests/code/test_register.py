"""Registration in MLflow: refusal without a passed gate, the pyfunc + bundle, tags, champion alias,
rollback, loading back by models:/brain-tumor@champion; on sqlite and on a real `mlflow server`
(loopback) whose artifacts live in the session's SeaweedFS."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from brainscan import modelstore, storage
from brainscan.cli import app
from brainscan.components import register as reg
from brainscan.components.evaluate import evaluate, read_images, read_split
from brainscan.preprocessing import preprocess_batch

NAME = "brain-tumor"


@pytest.fixture(scope="module")
def passed_evaluation(tiny_trained_bundle_dir, eval_splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("register_eval")
    result = evaluate(str(tiny_trained_bundle_dir), eval_splits, str(out), min_recall=0.9, min_auc=0.9, explain=False)
    assert result.passed, result.gate["reason"]
    return str(out)


@pytest.fixture(scope="module")
def test_files(eval_splits):
    return read_images(read_split(eval_splits, "test")["path"][:6])


def _probabilities(bundle, files):
    return modelstore.predict_probabilities(bundle, preprocess_batch(files, bundle.image_size))


def test_failed_gate_is_refused(tiny_bundle_dir, tmp_path):
    uri = reg.default_tracking_uri(tmp_path)
    doc = {"gate": {"passed": False, "reason": "FAILED: test recall 0.5000 < 0.95"}, "threshold": 0.1}
    result = reg.register(str(tiny_bundle_dir), doc, tracking_uri=uri)
    assert not result.registered and "FAILED: test recall 0.5000 < 0.95" in result.reason
    assert reg.champion_info(NAME, tracking_uri=uri) is None


def test_register_load_back_and_rollback_on_sqlite(tiny_trained_bundle_dir, passed_evaluation, test_files,
                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINSCAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory but the work dir
    uri = reg.default_tracking_uri(tmp_path / "work")
    first = reg.register(str(tiny_trained_bundle_dir), passed_evaluation, pipeline_run="run-1", tracking_uri=uri)
    second = reg.register(str(tiny_trained_bundle_dir), passed_evaluation, pipeline_run="run-2", tracking_uri=uri)
    assert first.registered and second.registered and second.previous_champion == first.version
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "work"}  # no stray ./mlruns

    info = reg.champion_info(NAME, tracking_uri=uri)
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
    assert set(frame.columns) == {"probabilities", "tumor_probability", "tumor", "label"}
    assert list(frame["tumor"]) == list(frame["tumor_probability"] >= champion.threshold)

    # Rollback with the CLI: champion goes back to the first version, which stays loadable.
    runner = CliRunner()
    rolled = runner.invoke(app, ["model", "rollback", "--tracking-uri", uri, "--json"])
    assert rolled.exit_code == 0, rolled.output
    assert reg.champion_info(NAME, tracking_uri=uri)["version"] == first.version
    again = runner.invoke(app, ["model", "rollback", "--tracking-uri", uri])
    assert again.exit_code == 1 and "no previous one" in again.output
    versions = reg.list_versions(NAME, tracking_uri=uri)
    assert [v["version"] for v in versions] == [first.version, second.version]


def test_cli_register_refuses_a_failed_gate(tiny_bundle_dir, eval_splits, tmp_path):
    evaluate(str(tiny_bundle_dir), eval_splits, str(tmp_path / "eval"), explain=False)
    result = CliRunner().invoke(app, ["register", "--model", str(tiny_bundle_dir), "--evaluation",
                                      str(tmp_path / "eval"), "--tracking-uri", reg.default_tracking_uri(tmp_path)])
    assert result.exit_code == 1 and "did not pass" in result.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(s3_stack, s3_prefix, tmp_path):
    """`mlflow server` on loopback: sqlite metadata, artifacts proxied to SeaweedFS."""
    port = _free_port()
    bucket = storage.parse_s3(s3_prefix)[0]
    log = open(tmp_path / "mlflow-server.log", "wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", f"s3://{bucket}/mlartifacts"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # start-up takes a minute or more on a busy 2-core machine
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("mlflow server exited: " + (tmp_path / "mlflow-server.log").read_text()[-2000:])
            try:
                if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not become healthy")
        yield url, bucket
    finally:
        # The server runs uvicorn as a child: stop the whole process group this fixture started.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


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
    champion = modelstore.load_bundle(f"models:/{NAME}@champion")
    local = modelstore.load_bundle(str(tiny_trained_bundle_dir))
    np.testing.assert_allclose(_probabilities(champion, test_files), _probabilities(local, test_files), atol=1e-6)
    assert reg.champion_info(NAME)["tags"]["pipeline_run"] == "remote-1"
