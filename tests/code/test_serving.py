"""The real model server on loopback: v2 over tritonclient HTTP (JSON and binary) and gRPC,
metadata, health, metrics, Grad-CAM explain, the predict CLI, every bad-input case, and 200
concurrent requests. One server for the whole module (see tests/fixtures/serving.py).

kserve is never imported here: tritonclient.grpc runs in a child process so this module works
whatever else the test session imported (both register the same protobuf symbols).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.fixtures.serving import (ACCEPTED_FORMATS, IMAGE_FORMATS, SERVER_LIMITS, declaring_size, encode,
                                    refused_images)

MODEL = "brain-tumor"
CLASSES = ["ct_healthy", "ct_tumor", "mri_glioma", "mri_healthy", "mri_meningioma", "mri_pituitary", "mri_tumor"]
OUTPUTS = ["probabilities", "tumor_probability", "tumor", "label"]


# --------------------------------------------------------------------------- helpers
def http_client(server):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}", concurrency=8)


def infer_http(server, images: list[bytes], binary: bool) -> dict:
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    if binary:  # raw file bytes after the JSON header (the binary-data extension)
        tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    else:  # plain JSON: each element the file's base64 text
        tensor.set_data_from_numpy(np.array([base64.b64encode(b) for b in images], dtype=object), binary_data=False)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    result = http_client(server).infer(MODEL, [tensor], outputs=outputs)
    return {name: result.as_numpy(name) for name in OUTPUTS}


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{server.url}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"error": text.decode(errors="replace")}


def v2_json(inputs: list[dict]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def b64_images(images: list[bytes]) -> dict:
    return {"name": "image", "shape": [len(images)], "datatype": "BYTES",
            "data": [base64.b64encode(b).decode() for b in images]}


def get(server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"{server.url}{path}", timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def assert_still_serving(server, images):
    assert get(server, "/v2/health/live")[0] == 200
    assert get(server, f"/v2/models/{MODEL}/ready")[0] == 200
    status, answer = post(server, f"/v2/models/{MODEL}/infer", v2_json([b64_images(images[:1])]))
    assert status == 200, answer
    assert {o["name"] for o in answer["outputs"]} == set(OUTPUTS)


def expected_from_bundle(bundle_dir, images):
    """What the server must answer, computed here with the same bundle and preprocessing."""
    from brainscan.labels import HEALTHY_INDICES
    from brainscan.modelstore import load_bundle
    from brainscan.preprocessing import preprocess_batch

    bundle = load_bundle(str(bundle_dir))
    x = preprocess_batch(images, bundle.image_size)
    probabilities = bundle.predict(x)
    tumor = 1.0 - probabilities[:, list(HEALTHY_INDICES)].sum(axis=1)
    return bundle, x, probabilities, tumor


def check_contract(answer: dict, count: int, bundle, probabilities, tumor) -> None:
    assert answer["probabilities"].shape == (count, 7) and answer["probabilities"].dtype == np.float32
    assert answer["tumor_probability"].shape == (count,)
    assert answer["tumor"].shape == (count,) and answer["tumor"].dtype == bool
    np.testing.assert_allclose(answer["probabilities"], probabilities, atol=1e-5)
    np.testing.assert_allclose(answer["tumor_probability"], tumor, atol=1e-5)
    np.testing.assert_array_equal(answer["tumor"], tumor >= bundle.threshold)
    labels = [v.decode() if isinstance(v, bytes) else str(v) for v in answer["label"]]
    assert labels == [CLASSES[i] for i in probabilities.argmax(axis=1)]


# --------------------------------------------------------------------------- the v2 contract
def test_health_and_metadata(model_server):
    client = http_client(model_server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL
    assert {(i["name"], i["datatype"]) for i in metadata["inputs"]} == {("image", "BYTES"), ("input", "FP32")}
    assert {(o["name"], o["datatype"]) for o in metadata["outputs"]} == {
        ("probabilities", "FP32"), ("tumor_probability", "FP32"), ("tumor", "BOOL"), ("label", "BYTES")}
    assert client.get_server_metadata()["name"]


def test_binds_loopback_only(model_server):
    import socket

    # Ports are free on every other local address: nothing listens there.
    hosts = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for host in hosts:
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex((host, model_server.http_port)) != 0, f"server reachable on {host}"


def test_threshold_splits_the_images(model_server, serving_bundle, serving_images):
    # The fixture put the bundle's threshold at the median score: both decisions must occur.
    answer = infer_http(model_server, serving_images, binary=False)
    assert answer["tumor"].any() and not answer["tumor"].all()


def test_http_json_base64(model_server, serving_bundle, serving_images):
    bundle, _, probabilities, tumor = expected_from_bundle(serving_bundle, serving_images)
    check_contract(infer_http(model_server, serving_images, binary=False), len(serving_images),
                   bundle, probabilities, tumor)


def test_http_binary_extension_with_raw_image_bytes(model_server, serving_bundle, serving_images):
    # Raw PNG/JPEG bytes are not UTF-8: stock kserve 0.21 answers 500 to exactly this request.
    assert any(not _is_utf8(b) for b in serving_images)
    bundle, _, probabilities, tumor = expected_from_bundle(serving_bundle, serving_images)
    check_contract(infer_http(model_server, serving_images, binary=True), len(serving_images),
                   bundle, probabilities, tumor)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


GRPC_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    address, paths = sys.argv[1], sys.argv[2:]
    client = grpcclient.InferenceServerClient(address)
    images = [open(p, "rb").read() for p in paths]
    out = {"live": client.is_server_live(), "ready": client.is_model_ready("brain-tumor"),
           "metadata": client.get_model_metadata("brain-tumor", as_json=True)}
    tensor = grpcclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    result = client.infer("brain-tumor", [tensor])
    out["probabilities"] = result.as_numpy("probabilities").tolist()
    out["tumor_probability"] = result.as_numpy("tumor_probability").tolist()
    out["tumor"] = result.as_numpy("tumor").tolist()
    out["label"] = [v.decode() for v in result.as_numpy("label")]
    bad = grpcclient.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    try:
        client.infer("brain-tumor", [bad])
        out["bad"] = "accepted"
    except grpcclient.InferenceServerException as err:
        out["bad"] = [str(err.status()), err.message()]
    again = client.infer("brain-tumor", [tensor])
    out["again"] = again.as_numpy("tumor_probability").tolist()
    print(json.dumps(out))
""")


def test_grpc(model_server, serving_bundle, serving_images, tmp_path):
    paths = []
    for i, data in enumerate(serving_images):
        paths.append(tmp_path / f"scan{i}.img")
        paths[-1].write_bytes(data)
    run = subprocess.run([sys.executable, "-c", GRPC_SCRIPT, model_server.grpc_address, *map(str, paths)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["metadata"]["name"] == MODEL
    bundle, _, probabilities, tumor = expected_from_bundle(serving_bundle, serving_images)
    answer = {"probabilities": np.array(out["probabilities"], dtype=np.float32),
              "tumor_probability": np.array(out["tumor_probability"], dtype=np.float32),
              "tumor": np.array(out["tumor"], dtype=bool), "label": out["label"]}
    check_contract(answer, len(serving_images), bundle, probabilities, tumor)
    assert "INVALID_ARGUMENT" in out["bad"][0] and "not an image" in out["bad"][1]
    np.testing.assert_allclose(out["again"], tumor, atol=1e-5)


def test_preprocessed_input_tensor(model_server, serving_bundle, serving_images):
    import tritonclient.http as httpclient

    bundle, x, probabilities, tumor = expected_from_bundle(serving_bundle, serving_images)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = http_client(model_server).infer(MODEL, [tensor])
    check_contract({name: result.as_numpy(name) for name in OUTPUTS}, len(x), bundle, probabilities, tumor)


def test_v2_json_by_hand_and_python_client(model_server, serving_images, tmp_path):
    from serving.client import predict

    status, answer = post(model_server, f"/v2/models/{MODEL}/infer", v2_json([b64_images(serving_images[:2])]))
    assert status == 200 and answer["model_name"] == MODEL
    by_name = {o["name"]: o for o in answer["outputs"]}
    assert by_name["probabilities"]["shape"] == [2, 7] and by_name["tumor"]["datatype"] == "BOOL"
    path = tmp_path / "scan.png"
    path.write_bytes(serving_images[0])
    results = predict(model_server.url, [path, serving_images[1]])
    assert [r["label"] for r in results] == by_name["label"]["data"]
    assert [r["tumor"] for r in results] == by_name["tumor"]["data"]
    assert results[0]["image"] == str(path)


def test_predict_cli(model_server, serving_images, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    paths = []
    for i, data in enumerate(serving_images[:3]):
        paths.append(tmp_path / f"scan{i}.png")
        paths[-1].write_bytes(data)
    result = CliRunner().invoke(app, ["predict", "--url", model_server.url, *map(str, paths), "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    rows = json.loads(lines[-1])
    assert len(rows) == 3
    for path, line, row in zip(paths, lines[:3], rows):
        assert str(path) in line and row["label"] in line
        assert re.search(r"P\(tumor\)=\d\.\d{4}", line)
        assert ("TUMOR" in line) == row["tumor"]


def test_predict_cli_reports_server_errors(model_server, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    path = tmp_path / "notes.png"
    path.write_text("this is not an image")
    result = CliRunner().invoke(app, ["predict", "--url", model_server.url, str(path)])
    assert result.exit_code == 1
    assert "HTTP 400" in result.output and "not an image" in result.output


def test_explain_returns_gradcam_png(model_server, serving_images):
    from serving.client import explain

    answer = explain(model_server.url, serving_images[1])
    assert answer["label"] in CLASSES and 0.0 <= answer["tumor_probability"] <= 1.0
    assert answer["overlay_png"].startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image
    import io

    with Image.open(io.BytesIO(answer["overlay_png"])) as overlay:
        assert overlay.size[0] >= 32 and overlay.size[1] >= 32


# --------------------------------------------------------------------------- bad input
def _big_png(side: int) -> bytes:
    return encode(np.zeros((side, side), dtype=np.uint8), "PNG")


def _noisy_png(side: int) -> bytes:  # incompressible: many bytes for few pixels
    return encode(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8), "PNG")


def bad_requests(images):
    good = b64_images(images[:1])
    too_many_pixels = _big_png(1200)  # 1.44 M pixels > --max-pixels 1 M, yet a small file
    too_many_bytes = _noisy_png(400)  # ~480 kB > --max-image-bytes 400 kB
    return {
        "not an image": (v2_json([b64_images([b"hello, I am text"])]), 400, "not an image"),
        "empty element": (v2_json([b64_images([b""])]), 400, "empty"),
        "empty tensor": (v2_json([{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]), 400, "empty"),
        "truncated png": (v2_json([b64_images([images[0][: len(images[0]) // 2]])]), 400, "truncated"),
        "truncated jpeg": (v2_json([b64_images([images[1][: len(images[1]) // 2]])]), 400, "image 0"),
        "not base64": (v2_json([{**good, "data": ["%%% not base64 %%%"]}]), 400, "base64"),
        "wrong datatype": (v2_json([{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]), 400,
                           "datatype BYTES"),
        "wrong shape": (v2_json([{**good, "shape": [1, 1]}]), 400, "shape [N]"),
        "shape and data disagree": (v2_json([{**good, "shape": [2]}]), 400, "shape"),
        "wrong tensor shape": (v2_json([{"name": "input", "shape": [1, 8, 8, 3], "datatype": "FP32",
                                         "data": [0.0] * 192}]), 400, "must have shape"),
        "unknown input": (v2_json([{**good, "name": "scan"}]), 400, "unknown input"),
        "two inputs": (v2_json([good, good]), 400, "exactly one input"),
        "too many images": (v2_json([b64_images(images[:1] * 17)]), 400, "at most 16"),
        "too many pixels": (v2_json([b64_images([too_many_pixels])]), 400, "pixels"),
        "too many bytes in one image": (v2_json([b64_images([too_many_bytes])]), 400, "bytes"),
        "request body too large": (v2_json([b64_images([too_many_bytes] * 4)]), 413, "over the limit"),
        # FastAPI parses JSON bodies before kserve sees them: it answers 422 with its own message.
        "malformed json": (b'{"inputs": [ {"name": "image", ', (400, 422), "json"),
        "json not an object": (b'[1, 2, 3]', (400, 422), ""),
    }


BAD_CASES = ["not an image", "empty element", "empty tensor", "truncated png", "truncated jpeg", "not base64",
             "wrong datatype", "wrong shape", "shape and data disagree", "wrong tensor shape", "unknown input",
             "two inputs", "too many images", "too many pixels", "too many bytes in one image",
             "request body too large", "malformed json", "json not an object"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_4xx_and_server_keeps_serving(model_server, serving_images, case):
    body, status, message = bad_requests(serving_images)[case]
    got, answer = post(model_server, f"/v2/models/{MODEL}/infer", body)
    assert got in (status if isinstance(status, tuple) else (status,)), answer
    text = json.dumps(answer)
    assert message.lower() in text.lower(), text
    assert_still_serving(model_server, serving_images)


def test_binary_extension_bad_bytes(model_server, serving_images):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = http_client(model_server)
    for payload, message in (([b"\xff\xd8\xff\xe0 garbage that starts like a JPEG"], "image 0"),
                             ([serving_images[0][:100]], "truncated")):
        tensor = httpclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array(payload, dtype=object), binary_data=True)
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [tensor])
        assert err.value.status() == "400" and message in err.value.message()
    # A binary_data_size that runs past the body.
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 10_000}}]}).encode()
    got, answer = post(model_server, f"/v2/models/{MODEL}/infer", header + b"\x00\x00\x00\x05hello",
                       headers={"Content-Type": "application/octet-stream",
                                "Inference-Header-Content-Length": str(len(header))})
    assert got == 400 and "binary_data_size" in answer["error"]
    assert_still_serving(model_server, serving_images)


@pytest.mark.parametrize("shape", [[None], ["1"], [1.5], [True], [-1], "1", None])
def test_binary_request_with_a_malformed_shape_gets_400_not_a_python_error(model_server, serving_images, shape):
    header = json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 4 + len(serving_images[0])}}]}).encode()
    body = header + len(serving_images[0]).to_bytes(4, "little") + serving_images[0]
    got, answer = post(model_server, f"/v2/models/{MODEL}/infer", body,
                       headers={"Content-Type": "application/octet-stream",
                                "Inference-Header-Content-Length": str(len(header))})
    assert got == 400, answer
    assert "shape" in answer["error"] and "Error" not in answer["error"], answer  # no Python exception text
    assert_still_serving(model_server, serving_images)


# --------------------------------------------------------------------------- images too large, judged from the header
# A few hundred bytes each, claiming 30000 x 30000 (900 M pixels: Pillow's own DecompressionBombError)
# or 1100 x 1000 (1.1 M: over the server's --max-pixels 1 M): refused with a 4xx before decoding.
OVERSIZED = {"bomb": (30000, 30000), "over-max-pixels": (1100, 1000)}


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_image_over_max_pixels_gets_400_before_decoding(model_server, serving_images, fmt):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    honest = declaring_size(fmt, 8, 8)  # the same file with its true size header: served if JPEG or PNG
    status, answer = post(model_server, f"/v2/models/{MODEL}/infer", v2_json([b64_images([honest])]))
    if fmt in ACCEPTED_FORMATS:
        assert status == 200, answer
    else:  # GIF and BMP: refused since issue 17 (a GIF's later frames escape the pixel check)
        assert status == 400 and f"unsupported image format {fmt}" in json.dumps(answer), answer
    for case, (width, height) in OVERSIZED.items():
        image = declaring_size(fmt, width, height)
        assert len(image) < 1000, case
        status, answer = post(model_server, f"/v2/models/{MODEL}/infer", v2_json([b64_images([image])]))
        assert status == 400 and "pixels" in json.dumps(answer), (fmt, case, status, answer)
        tensor = httpclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=object), binary_data=True)
        with pytest.raises(InferenceServerException) as err:
            http_client(model_server).infer(MODEL, [tensor])
        assert err.value.status() == "400" and "pixels" in err.value.message(), (fmt, case)
        status, answer = post(model_server, f"/v1/models/{MODEL}:explain",
                              json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode())
        assert status == 400 and "pixels" in json.dumps(answer), (fmt, case, status, answer)
    assert_still_serving(model_server, serving_images)


GRPC_OVERSIZED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(sys.argv[1])
    out = {}
    for path in sys.argv[2:]:
        tensor = grpcclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([open(path, "rb").read()], dtype=object))
        try:
            client.infer("brain-tumor", [tensor])
            out[path] = "accepted"
        except grpcclient.InferenceServerException as err:
            out[path] = [str(err.status()), err.message()]
    print(json.dumps(out))
""")


def test_grpc_image_over_max_pixels_gets_invalid_argument(model_server, serving_images, tmp_path):
    paths = {}
    for fmt in IMAGE_FORMATS:
        for case, (width, height) in OVERSIZED.items():
            path = tmp_path / f"{case}.{fmt.lower()}"
            path.write_bytes(declaring_size(fmt, width, height))
            paths[str(path)] = (fmt, case)
    run = subprocess.run([sys.executable, "-c", GRPC_OVERSIZED_SCRIPT, model_server.grpc_address, *paths],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for path, where in paths.items():
        assert out[path] != "accepted", where
        status, message = out[path]
        assert "INVALID_ARGUMENT" in status and "pixels" in message, (where, out[path])
    assert_still_serving(model_server, serving_images)


# --------------------------------------------------------------------------- formats and frame counts
REFUSED = refused_images()


@pytest.mark.parametrize("name", list(REFUSED))
def test_multi_frame_or_other_format_gets_400_on_every_rest_transport(model_server, serving_images, name):
    """Only single-frame JPEG and PNG reach the decoder: TensorFlow sizes a GIF by its largest frame
    (issue 17: an 8x8 first frame passes the pixel check, a 3000x3000 second one is decoded)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    image, named = REFUSED[name]
    status, answer = post(model_server, f"/v2/models/{MODEL}/infer", v2_json([b64_images([image])]))
    assert status == 400 and named in json.dumps(answer), (status, answer)
    tensor = httpclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([image], dtype=object), binary_data=True)
    with pytest.raises(InferenceServerException) as err:
        http_client(model_server).infer(MODEL, [tensor])
    assert err.value.status() == "400" and named in err.value.message()
    for verb in ("predict", "explain"):
        status, answer = post(model_server, f"/v1/models/{MODEL}:{verb}",
                              json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode())
        assert status == 400 and named in json.dumps(answer), (verb, status, answer)
    assert_still_serving(model_server, serving_images)


def test_grpc_multi_frame_or_other_format_gets_invalid_argument(model_server, serving_images, tmp_path):
    paths = {}
    for i, (name, (image, named)) in enumerate(REFUSED.items()):
        path = tmp_path / f"refused{i}"
        path.write_bytes(image)
        paths[str(path)] = (name, named)
    run = subprocess.run([sys.executable, "-c", GRPC_OVERSIZED_SCRIPT, model_server.grpc_address, *paths],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for path, (name, named) in paths.items():
        assert out[path] != "accepted", name
        status, message = out[path]
        assert "INVALID_ARGUMENT" in status and named in message, (name, out[path])
    assert_still_serving(model_server, serving_images)


# --------------------------------------------------------------------------- the data plane only
# Issue 17: kserve's model repository extension let any client unload the model, after which the
# server still said ready and answered every infer with 404.
GRPC_REPOSITORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(sys.argv[1])
    out = {}
    for name, call in (("unload", client.unload_model), ("load", client.load_model)):
        try:
            call("brain-tumor")
            out[name] = "accepted"
        except grpcclient.InferenceServerException as err:
            out[name] = [str(err.status()), err.message()]
    out["ready"] = [client.is_server_ready(), client.is_model_ready("brain-tumor")]
    tensor = grpcclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([open(sys.argv[2], "rb").read()], dtype=object))
    out["infer"] = client.infer("brain-tumor", [tensor]).as_numpy("tumor_probability").tolist()
    print(json.dumps(out))
""")


def test_no_client_can_unload_or_load_the_model_over_rest(model_server, serving_images):
    for verb in ("unload", "load"):
        status, answer = post(model_server, f"/v2/repository/models/{MODEL}/{verb}", b"{}")
        assert status in (404, 405), (verb, status, answer)
    assert http_client(model_server).get_server_metadata()["extensions"] == []
    assert get(model_server, "/v2/health/ready")[0] == 200
    assert_still_serving(model_server, serving_images)


def test_no_client_can_unload_or_load_the_model_over_grpc(model_server, serving_images, tmp_path):
    image = tmp_path / "scan.png"
    image.write_bytes(serving_images[0])
    run = subprocess.run([sys.executable, "-c", GRPC_REPOSITORY_SCRIPT, model_server.grpc_address, str(image)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for verb in ("unload", "load"):
        assert out[verb] != "accepted", verb
        status, message = out[verb]
        assert "UNIMPLEMENTED" in status and "repository" in message, (verb, out[verb])
    assert out["ready"] == [True, True] and len(out["infer"]) == 1
    assert_still_serving(model_server, serving_images)


def test_unknown_model_is_404(model_server, serving_images):
    got, _ = post(model_server, "/v2/models/no-such-model/infer", v2_json([b64_images(serving_images[:1])]))
    assert got == 404


# --------------------------------------------------------------------------- load, batching, metrics
def test_200_concurrent_requests_are_batched(model_server, serving_images):
    def batches() -> tuple[float, float]:
        text = get(model_server, "/metrics")[1].decode()
        count = float(re.search(r"^brainscan_batch_size_count (\S+)$", text, re.M).group(1))
        total = float(re.search(r"^brainscan_batch_size_sum (\S+)$", text, re.M).group(1))
        return count, total

    before_count, before_images = batches()
    bodies = [v2_json([b64_images([serving_images[i % len(serving_images)]])]) for i in range(200)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(lambda body: post(model_server, f"/v2/models/{MODEL}/infer", body), bodies))
    assert [status for status, _ in answers] == [200] * 200
    # Same image, same answer, whichever batch it landed in.
    by_image: dict[int, set] = {}
    for i, (_, answer) in enumerate(answers):
        tumor = next(o for o in answer["outputs"] if o["name"] == "tumor_probability")["data"][0]
        by_image.setdefault(i % len(serving_images), set()).add(round(tumor, 5))
    assert all(len(values) == 1 for values in by_image.values()), by_image
    after_count, after_images = batches()
    assert after_images - before_images == 200
    assert after_count - before_count < 200  # several requests shared a model call


def test_metrics_endpoint(model_server, serving_images):
    assert_still_serving(model_server, serving_images)
    status, body = get(model_server, "/metrics")
    text = body.decode()
    assert status == 200
    for name in ("brainscan_batch_size_bucket", "brainscan_model_call_seconds_count",
                 "brainscan_batcher_requests_total", "request_predict_seconds_count"):
        assert name in text, name


def test_model_runs_on_onnx_runtime_from_the_start(model_server, serving_bundle, serving_images):
    """On a CPU the default runtime is ONNX Runtime on the bundle's model.onnx (written at registration),
    from the first request: nothing is converted at start; checked against Keras at load, answers within 1e-5."""
    text = get(model_server, "/metrics")[1].decode()
    runtime = re.search(r'^brainscan_model_runtime_info\{(.*)\} 1\.0$', text, re.M)
    assert runtime, "no brainscan_model_runtime_info"
    assert 'runtime="onnx"' in runtime.group(1) and "max |diff| from Keras" in runtime.group(1), runtime.group(1)
    bundle, _, probabilities, tumor = expected_from_bundle(serving_bundle, serving_images)
    check_contract(infer_http(model_server, serving_images, binary=True), len(serving_images),
                   bundle, probabilities, tumor)


def test_local_status(model_server):
    from brainscan.local import predictor as local

    info = local.status(model_server.workdir)
    assert info is not None and info.pid == model_server.pid and info.url == model_server.url
    assert SERVER_LIMITS  # the limits the bad-input cases rely on were passed to this server
