"""`brainscan pipeline upload|submit|schedule` against a fake KFP API server on 127.0.0.1.

The fake records every request and answers with the smallest valid v2beta1 responses, so
the tests assert what the real backend would receive: the compiled pipeline, the run's
parameters, the cron expression and max_concurrency of the recurring run.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from pipelines import kfp_client


class FakeKfp(BaseHTTPRequestHandler):
    requests: list[dict] = []
    pipelines: dict[str, str] = {}
    runs: list[dict] = []
    stall = threading.Event()  # while set, every request waits (a backend that accepts and never answers)
    unstall = threading.Event()  # ... until this is set, or for STALL_S at most
    STALL_S = 15

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        if self.stall.is_set():
            self.unstall.wait(self.STALL_S)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urlparse(self.path)
        entry = {"method": self.command, "path": url.path, "query": parse_qs(url.query), "raw": raw,
                 "content_type": self.headers.get("Content-Type", ""),
                 "authorization": self.headers.get("Authorization")}
        if raw and entry["content_type"].startswith("application/json"):
            entry["json"] = json.loads(raw)
        type(self).requests.append(entry)
        return entry

    def do_GET(self):
        entry = self._record()
        if entry["path"] == "/apis/v2beta1/pipelines":
            wanted = json.dumps(entry["query"].get("filter", [""])[0])
            found = [{"pipeline_id": pid, "display_name": name} for name, pid in self.pipelines.items()
                     if name in wanted]
            self._reply({"pipelines": found, "total_size": len(found)})
        elif entry["path"] == "/apis/v2beta1/experiments":
            self._reply({"experiments": [], "total_size": 0})
        elif entry["path"] == "/apis/v2beta1/runs":
            predicates = json.loads(entry["query"].get("filter", ['{"predicates": []}'])[0])["predicates"]
            wanted = [p.get("string_value", p.get("stringValue")) for p in predicates if p["key"] == "display_name"]
            found = [run for run in self.runs if not wanted or run["display_name"] in wanted]
            self._reply({"runs": found[::-1], "total_size": len(found)})
        else:
            self._reply({})

    def do_POST(self):
        entry = self._record()
        path = entry["path"]
        if path == "/apis/v2beta1/pipelines/upload":
            name = entry["query"]["name"][0]
            self.pipelines[name] = f"pid-{len(self.pipelines) + 1}"
            self._reply({"pipeline_id": self.pipelines[name], "display_name": name})
        elif path == "/apis/v2beta1/pipelines/upload_version":
            self._reply({"pipeline_id": entry["query"]["pipelineid"][0], "pipeline_version_id": "vid-1",
                         "display_name": entry["query"]["name"][0]})
        elif path == "/apis/v2beta1/experiments":
            self._reply({"experiment_id": "eid-1", "display_name": entry["json"]["display_name"]})
        elif path == "/apis/v2beta1/runs":
            run = {"run_id": f"rid-{len(self.runs) + 1}", "display_name": entry["json"]["display_name"],
                   "state": "RUNNING"}
            self.runs.append(run)
            self._reply(run)
        elif path == "/apis/v2beta1/recurringruns":
            self._reply({"recurring_run_id": "rrid-1", "display_name": entry["json"]["display_name"]})
        else:
            self._reply({})


@pytest.fixture
def fake_kfp():
    FakeKfp.requests = []
    FakeKfp.pipelines = {}
    FakeKfp.runs = []
    FakeKfp.stall, FakeKfp.unstall = threading.Event(), threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", FakeKfp
    finally:
        FakeKfp.unstall.set()
        server.shutdown()
        server.server_close()


def _posts(fake, path):
    return [r for r in fake.requests if r["method"] == "POST" and r["path"] == path]


def _pipeline_spec(body: dict) -> dict:
    """The pipeline spec of a run request (wrapped with the Kubernetes platform spec when there is one)."""
    spec = body["pipeline_spec"]
    return spec.get("pipeline_spec", spec)


def _spec_in(raw: bytes) -> dict:
    """The pipeline YAML inside a multipart upload body."""
    start = raw.index(b"# PIPELINE DEFINITION")
    end = raw.index(b"\r\n--", start)
    return next(yaml.safe_load_all(raw[start:end]))  # first document: the pipeline spec


def test_upload_creates_pipeline_then_new_versions(fake_kfp):
    host, fake = fake_kfp
    first = kfp_client.upload(host, version="v1")
    assert first.pipeline_id == "pid-1" and first.version_id == "vid-1"
    uploads = _posts(fake, "/apis/v2beta1/pipelines/upload")
    assert len(uploads) == 1 and uploads[0]["query"]["name"] == ["brainscan-train"]
    spec = _spec_in(uploads[0]["raw"])
    assert spec["pipelineInfo"]["name"] == "brainscan-train"
    assert "train-op" in spec["root"]["dag"]["tasks"]

    kfp_client.upload(host, version="v2")
    assert len(_posts(fake, "/apis/v2beta1/pipelines/upload")) == 1, "an existing pipeline gets a version, not a copy"
    versions = _posts(fake, "/apis/v2beta1/pipelines/upload_version")
    assert [v["query"]["name"][0] for v in versions] == ["v1", "v2"]
    assert all(v["query"]["pipelineid"] == ["pid-1"] for v in versions)


def test_submit_sends_pipeline_spec_and_parameters(fake_kfp):
    host, fake = fake_kfp
    result = kfp_client.submit(host, arguments={"source": "s3://scans/raw", "epochs": 3}, run_name="nightly")
    assert result.run_id == "rid-1"
    (run,) = _posts(fake, "/apis/v2beta1/runs")
    body = run["json"]
    assert body["display_name"] == "nightly"
    assert body["runtime_config"]["parameters"] == {"source": "s3://scans/raw", "epochs": 3}
    assert _pipeline_spec(body)["pipelineInfo"]["name"] == "brainscan-train"
    assert "kubernetes" in body["pipeline_spec"].get("platform_spec", {}).get("platforms", {})
    assert body["experiment_id"] == "eid-1"


def test_schedule_creates_recurring_run_with_cron_and_one_at_a_time(fake_kfp):
    host, fake = fake_kfp
    result = kfp_client.schedule(host, cron="0 3 * * *", arguments={"source": "s3://scans/raw"})
    assert result.recurring_run_id == "rrid-1"
    (recurring,) = _posts(fake, "/apis/v2beta1/recurringruns")
    body = recurring["json"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["runtime_config"]["parameters"] == {"source": "s3://scans/raw"}
    assert _pipeline_spec(body)["pipelineInfo"]["name"] == "brainscan-retrain-if-new-data"


def test_schedule_rejects_bad_cron_before_any_request(fake_kfp):
    host, fake = fake_kfp
    with pytest.raises(ValueError, match="cron"):
        kfp_client.schedule(host, cron="every night")
    assert fake.requests == []


def test_cli_submit_and_schedule(fake_kfp):
    host, fake = fake_kfp
    runner = CliRunner()
    out = runner.invoke(app, ["pipeline", "submit", "--host", host, "--source", "s3://scans/raw", "--epochs", "2",
                              "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.strip().splitlines()[-1])["run_id"] == "rid-1"
    (run,) = _posts(fake, "/apis/v2beta1/runs")
    assert run["json"]["runtime_config"]["parameters"]["source"] == "s3://scans/raw"
    assert run["json"]["runtime_config"]["parameters"]["epochs"] == 2

    out = runner.invoke(app, ["pipeline", "schedule", "--host", host, "--cron", "0 0 4 * * *",
                              "--source", "s3://scans/raw"])
    assert out.exit_code == 0, out.output
    (recurring,) = _posts(fake, "/apis/v2beta1/recurringruns")
    assert recurring["json"]["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * *"

    out = runner.invoke(app, ["pipeline", "schedule", "--host", host, "--cron", "nope"])
    assert out.exit_code != 0 and "cron" in out.output


def test_cli_retrain_watch_submits_one_retrain_run_per_data_change(fake_kfp, synthetic_archive, tmp_path,
                                                                   monkeypatch):
    """No champion yet: the first check submits the retrain pipeline; the same data again submits nothing."""
    host, fake = fake_kfp
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    source = str(synthetic_archive.out_dir)
    out = CliRunner().invoke(app, ["retrain", "watch", "--source", source, "--host", host, "--interval", "1",
                                   "--max-checks", "2"])
    assert out.exit_code == 0, out.output
    assert "submitted run rid-1" in out.output and "1 run(s) started" in out.output
    (run,) = _posts(fake, "/apis/v2beta1/runs")
    assert _pipeline_spec(run["json"])["pipelineInfo"]["name"] == "brainscan-retrain-if-new-data"
    assert run["json"]["runtime_config"]["parameters"] == {"source": source}


def test_requests_carry_the_pods_projected_kfp_token(fake_kfp, tmp_path, monkeypatch):
    """A multi-user Kubeflow answers only authenticated requests: where the pod has a projected token
    (audience pipelines.kubeflow.org), every request carries it, read anew each time (the kubelet rotates it)."""
    host, fake = fake_kfp
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "absent"))
    kfp_client.submit(host, {"source": "s3://scans/raw"})
    assert {r["authorization"] for r in fake.requests} == {None}  # no token file: nothing is sent

    token = tmp_path / "token"
    token.write_text("first-token\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    fake.requests.clear()
    kfp_client.submit(host, {"source": "s3://scans/raw"}, namespace="kubeflow-user")
    assert fake.requests and {r["authorization"] for r in fake.requests} == {"Bearer first-token"}
    assert _posts(fake, "/apis/v2beta1/experiments")[0]["json"]["namespace"] == "kubeflow-user"


def test_submit_once_starts_one_run_per_name(fake_kfp):
    host, fake = fake_kfp
    first = kfp_client.submit_once(host, "brainscan-retrain-0123456789abcdef", {"source": "s3://scans/raw"})
    again = kfp_client.submit_once(host, "brainscan-retrain-0123456789abcdef", {"source": "s3://scans/raw"})
    other = kfp_client.submit_once(host, "brainscan-retrain-fedcba9876543210", {"source": "s3://scans/raw"})
    assert (first.action, again.action, other.action) == ("submit", "exists", "submit")
    assert again.run_id == first.run_id
    assert [r["json"]["display_name"] for r in _posts(fake, "/apis/v2beta1/runs")] == [
        "brainscan-retrain-0123456789abcdef", "brainscan-retrain-fedcba9876543210"]
    lookup = [r for r in fake.requests if r["method"] == "GET" and r["path"] == "/apis/v2beta1/runs"][0]
    assert json.loads(lookup["query"]["filter"][0])["predicates"] == [
        {"operation": "EQUALS", "key": "display_name", "string_value": "brainscan-retrain-0123456789abcdef"}]


def test_a_restarted_watcher_does_not_submit_the_same_data_again(fake_kfp, synthetic_archive, tmp_path, monkeypatch):
    """The in-cluster watcher restarts (a new pod): the run for this data exists, so no second one."""
    host, fake = fake_kfp
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    source = str(synthetic_archive.out_dir)
    watch = ["retrain", "watch", "--source", source, "--host", host, "--namespace", "kubeflow-user",
             "--interval", "1", "--max-checks", "2"]
    first = CliRunner().invoke(app, watch)
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, watch)  # the same data, a fresh process state
    assert second.exit_code == 0, second.output
    assert "already submitted: run rid-1" in second.output
    (run,) = _posts(fake, "/apis/v2beta1/runs")
    assert run["json"]["display_name"].startswith("brainscan-retrain-")
    assert run["json"]["runtime_config"]["parameters"] == {"source": source, "namespace": "kubeflow-user"}


def test_a_hung_kfp_api_times_out_and_the_next_check_submits(fake_kfp, synthetic_archive, tmp_path, monkeypatch,
                                                             caplog):
    """The KFP API accepts the watcher's requests and never answers: the request times out, the watcher
    logs it and goes on; at the next check (the API answers again) it submits the run."""
    from pipelines import watcher

    host, fake = fake_kfp
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def sleep_while_the_api_recovers(_seconds):
        fake.stall.clear()
        fake.unstall.set()

    monkeypatch.setattr(watcher.time, "sleep", sleep_while_the_api_recovers)
    fake.stall.set()
    with caplog.at_level("ERROR", logger=watcher.log.name):
        out = CliRunner().invoke(app, ["retrain", "watch", "--source", str(synthetic_archive.out_dir), "--host", host,
                                       "--interval", "1", "--max-checks", "2", "--settle-checks", "1",
                                       "--kfp-timeout", "0.5"])
    assert out.exit_code == 0, out.output
    failures = [r.getMessage() for r in caplog.records if "retried at the next check" in r.getMessage()]
    assert len(failures) == 1 and "timed out" in failures[0], caplog.text
    assert "submitted run rid-1" in out.output and "1 run(s) started" in out.output
    (run,) = _posts(fake, "/apis/v2beta1/runs")
    assert run["json"]["display_name"].startswith("brainscan-retrain-")


def test_the_timeout_adaptation_refuses_another_kfp_server_api(monkeypatch):
    """The request timeout relies on kfp_server_api's REST client, which kfp does not pin: checked like kfp."""
    from importlib import metadata

    from pipelines import kfp_compat

    versions = {"kfp": kfp_compat.KFP_VERSION, "kfp-server-api": "2.18.0"}
    monkeypatch.setattr(metadata, "version", lambda name: versions[name])
    with pytest.raises(ImportError, match=r"written for kfp-server-api 2\.17\.3, found 2\.18\.0"):
        kfp_compat.check_version()
