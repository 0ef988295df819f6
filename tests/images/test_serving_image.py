"""The serving image, run as the InferenceService runs it: UID 1000, the S3 secret's keys as variables,
MODEL_URI a registered model (`models:/brain-tumor@champion`) in an MLflow server whose artifacts
are on S3 (the local stack's SeaweedFS), answering tritonclient over v2 HTTP (binary) and gRPC
with what the bundle itself computes. And the image is lean: none of the pipeline's packages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid

import numpy as np
import pytest

from brainscan.local.stack import free_ports, log_tail
from tests.fixtures.images import env_file, images_enabled, owned_dir

pytestmark = pytest.mark.skipif(images_enabled() is not None, reason=images_enabled() or "")

MODEL = "brain-tumor"
IMAGE_SIZE = 71  # the smallest Xception: the trainer's own architecture, untrained
OUTPUTS = ("probabilities", "tumor_probability", "tumor", "label")

CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    protocol, address, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    if protocol == "http":
        import tritonclient.http as client_lib
    else:
        import tritonclient.grpc as client_lib
    client = client_lib.InferenceServerClient(address)
    tensor = client_lib.InferInput("image", [len(paths)], "BYTES")
    images = np.array([open(p, "rb").read() for p in paths], dtype=object)
    if protocol == "http":  # the binary-data extension: raw file bytes after the JSON header
        tensor.set_data_from_numpy(images, binary_data=True)
        outputs = [client_lib.InferRequestedOutput(n, binary_data=True) for n in {outputs!r}]
    else:
        tensor.set_data_from_numpy(images)
        outputs = [client_lib.InferRequestedOutput(n) for n in {outputs!r}]
    result = client.infer("{model}", [tensor], outputs=outputs)
    answer = {{}}
    for name in {outputs!r}:
        value = result.as_numpy(name)
        answer[name] = [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    print(json.dumps(answer))
""").format(outputs=OUTPUTS, model=MODEL)


def test_serving_image_is_lean(serving_container):
    probe = ("import importlib.util as u; print([m for m in ('kfp', 'great_expectations', 'awscli', 'flask', "
             "'sqlalchemy', 'moto', 'pytest', 'tritonclient', 'lime', 'sklearn', 'tf2onnx', 'onnx') if u.find_spec(m)])")
    proc = serving_container.run(["python", "-c", probe], network=False, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def registered_champion(s3_stack, tmp_path_factory):
    """An MLflow server (sqlite metadata, artifacts on the stack's S3 read and written by its clients, as
    on a cluster) holding a brain-tumor champion registered by the project's own register step."""
    from brainscan import registry, storage
    from components.register import register
    from brainscan.network import build_model
    from brainscan.modelstore import save_bundle
    from tests.fixtures.registry import MlflowServer

    folder = tmp_path_factory.mktemp("smoke_mlflow")
    bucket = f"smoke-mlflow-{uuid.uuid4().hex[:8]}"
    storage.ensure_bucket(bucket)
    server = MlflowServer(folder, artifacts=f"s3://{bucket}/artifacts", proxy_artifacts=False).start()
    try:
        model, _ = build_model(IMAGE_SIZE, "none")
        bundle_dir = folder / "bundle"
        save_bundle(model, str(bundle_dir), IMAGE_SIZE, {"trained_by": "tests/images"}, threshold=0.5)
        doc = {"gate": {"passed": True, "reason": "PASSED (image smoke test stand-in)"}, "threshold": 0.5,
               "test": {"recall": 1.0, "roc_auc": 1.0}, "dataset_fingerprint": "image-smoke"}
        result = register(str(bundle_dir), doc, name=MODEL, tracking_uri=server.url)
        assert result.registered, result.reason
        registry.promote(registry.connect(server.url)[0], MODEL, result.version)  # as its deploy would
        yield server, bundle_dir
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(serving_container, s3_stack, registered_champion, tmp_path_factory):
    """`brainscan serve` from the image, on free loopback ports, on MODEL_URI from the registry."""
    server, _ = registered_champion
    work = owned_dir(tmp_path_factory.mktemp("serving_pod"))
    http_port, grpc_port = free_ports(2)
    secret = env_file(work, {**s3_stack.env(), "MLFLOW_TRACKING_URI": server.url,
                             "MODEL_URI": f"models:/{MODEL}@champion"})
    # the image's CMD, on loopback ports instead of 0.0.0.0:8080/8081 (this host's network is shared)
    command = serving_container.command(
        ["sh", "-c", f'exec brainscan serve --host 127.0.0.1 --http-port {http_port} --grpc-port {grpc_port} '
                     '--model "$MODEL_URI"'], env=secret)
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 600  # TensorFlow and the model load on a shared 2-core machine
        while True:
            if process.poll() is not None:
                pytest.fail("the server exited:\n" + log_tail(log_path, 60))
            try:
                if urllib.request.urlopen(f"{url}/v2/models/{MODEL}/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not become ready:\n" + log_tail(log_path, 60))
            time.sleep(2)
        yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}", "pgid": process.pid, "log": log_path}
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _expected(bundle_dir, images: list[bytes]):
    from brainscan.modelstore import load_bundle
    from brainscan.preprocessing import preprocess_batch

    bundle = load_bundle(str(bundle_dir))
    return bundle.predict(preprocess_batch(images, bundle.image_size))


def test_serving_image_serves_the_registered_champion_over_http_and_grpc(served, registered_champion, tmp_path):
    from brainscan.labels import CLASSES
    from tests.fixtures.serving import make_scan_images

    images = make_scan_images(count=4, seed=5)  # PNG and JPEG, greyscale and RGB
    paths = []
    for i, data in enumerate(images):
        paths.append(tmp_path / f"scan{i}")
        paths[-1].write_bytes(data)
    expected = _expected(registered_champion[1], images)

    answers = {}
    for protocol, address in (("http", served["url"].removeprefix("http://")), ("grpc", served["grpc"])):
        # its own process: tritonclient.grpc and kserve cannot share one (both register inference.* protos)
        proc = subprocess.run([sys.executable, "-c", CLIENT, protocol, address, *map(str, paths)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers[protocol] = json.loads(proc.stdout.strip().splitlines()[-1])
    for protocol, answer in answers.items():
        probabilities = np.array(answer["probabilities"], dtype=np.float32)
        assert probabilities.shape == (len(images), len(CLASSES)), protocol
        np.testing.assert_allclose(probabilities, expected, atol=1e-4, err_msg=protocol)
        assert len(answer["tumor_probability"]) == len(answer["tumor"]) == len(images)
        assert set(answer["label"]) <= set(CLASSES)
    assert answers["http"]["label"] == answers["grpc"]["label"]

    # the server runs as the image's user, and its brainscan_* metrics are on the port KServe scrapes
    ps = subprocess.run(["ps", "-eo", "uid=,pgid=,args="], capture_output=True, text=True).stdout.splitlines()
    servers = [line.split(None, 2) for line in ps if "brainscan serve" in line and "sh -c" not in line]
    assert [uid for uid, pgid, _ in servers if int(pgid) == served["pgid"]] == ["1000"], servers
    metrics = urllib.request.urlopen(f"{served['url']}/metrics", timeout=10).read().decode()
    assert "brainscan_" in metrics
