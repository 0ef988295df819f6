"""In-process pieces of the model server: the dynamic batcher, the binary-BYTES request parser
(against kserve's own, which fails), readiness, the threshold rules and start-up refusal.

This module imports kserve; it never imports tritonclient.grpc (see test_serving.py).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest


# --------------------------------------------------------------------------- DynamicBatcher
def _identity_model(calls: list):
    def predict(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return images[:, 0, 0, :1].repeat(7, axis=1)  # row i carries request i's marker value

    return predict


def test_batcher_gathers_concurrent_requests_and_returns_each_its_rows():
    from serving.batching import DynamicBatcher

    calls: list[int] = []
    batcher = DynamicBatcher(_identity_model(calls), max_batch_size=8, max_latency_ms=20)

    async def main():
        sizes = [1, 2, 1, 3, 1, 1, 2, 1, 1, 1] * 4
        requests = [np.full((n, 2, 2, 3), float(i), np.float32) for i, n in enumerate(sizes)]
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        return requests, answers

    requests, answers = asyncio.run(main())
    for i, (request, answer) in enumerate(zip(requests, answers)):
        assert answer.shape == (len(request), 7) and np.all(answer == i)
    assert sum(calls) == sum(len(r) for r in requests)
    assert max(calls) <= 8 and len(calls) < len(requests)


def test_batcher_model_error_reaches_every_waiter_and_it_keeps_working():
    from serving.batching import DynamicBatcher

    fail = {"now": True}

    def predict(images):
        if fail["now"]:
            raise RuntimeError("model exploded")
        return np.zeros((len(images), 7), np.float32)

    batcher = DynamicBatcher(predict, max_batch_size=4, max_latency_ms=20)

    async def main():
        first = await asyncio.gather(*(batcher.submit(np.zeros((1, 2, 2, 3), np.float32)) for _ in range(3)),
                                     return_exceptions=True)
        fail["now"] = False
        second = await batcher.submit(np.zeros((2, 2, 2, 3), np.float32))
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "exploded" in str(e) for e in first)
    assert second.shape == (2, 7)


def test_batcher_bounded_queue_refuses_when_full():
    from serving.batching import DynamicBatcher, ServerOverloaded

    release = threading.Event()

    def slow(images):
        release.wait(10)
        return np.zeros((len(images), 7), np.float32)

    batcher = DynamicBatcher(slow, max_batch_size=1, max_latency_ms=0, max_queue=3)

    async def main():
        def one():
            return asyncio.ensure_future(batcher.submit(np.zeros((1, 2, 2, 3), np.float32)))

        running = [one()]
        await asyncio.sleep(0.2)  # the first is in the model (blocked) ...
        running += [one() for _ in range(3)]
        await asyncio.sleep(0.1)  # ... and three wait: the queue is full
        with pytest.raises(ServerOverloaded, match="busy"):
            await batcher.submit(np.zeros((1, 2, 2, 3), np.float32))
        release.set()
        return await asyncio.gather(*running)

    assert len(asyncio.run(main())) == 4


def test_batcher_waits_for_announced_requests_only():
    """A request on its way (ticket) is waited for and shares the call; a lone one is not kept
    waiting for max_latency_ms (ten minutes here: waiting would hang the test, not slow it)."""
    from serving.batching import DynamicBatcher

    calls: list[int] = []
    batcher = DynamicBatcher(_identity_model(calls), max_batch_size=8, max_latency_ms=600_000)

    async def main():
        lone = await asyncio.wait_for(batcher.submit(np.zeros((1, 2, 2, 3), np.float32)), 60)
        assert lone.shape == (1, 7) and calls == [1]
        ticket = batcher.expect()  # announced, still decoding

        async def later():
            await asyncio.sleep(0.05)
            return await batcher.submit(np.ones((2, 2, 2, 3), np.float32), ticket)

        first, second = await asyncio.wait_for(
            asyncio.gather(batcher.submit(np.zeros((1, 2, 2, 3), np.float32)), later()), 60)
        return first, second

    first, second = asyncio.run(main())
    assert calls == [1, 3]  # the announced request joined the batch of the one already waiting
    assert np.all(first == 0) and np.all(second == 1)
    assert batcher._expected == 0


def test_batcher_tickets_are_taken_back_when_a_request_never_arrives():
    import gc

    from serving.batching import DynamicBatcher

    batcher = DynamicBatcher(lambda x: np.zeros((len(x), 7), np.float32))
    closed, dropped = batcher.expect(), batcher.expect()
    assert batcher._expected == 2
    closed.close()
    closed.close()  # twice is harmless
    del dropped  # lost without a word (the request failed somewhere in between)
    gc.collect()
    assert batcher._expected == 0


def test_batcher_rejects_bad_settings():
    from serving.batching import DynamicBatcher

    with pytest.raises(ValueError):
        DynamicBatcher(lambda x: x, max_batch_size=0)


# --------------------------------------------------------------------------- binary BYTES parsing
def _tritonclient_binary_body(images: list[bytes]) -> tuple[bytes, dict]:
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([tensor])
    return body, {"inference-header-content-length": str(json_size)}


def test_stock_kserve_cannot_parse_raw_image_bytes_but_ours_can(serving_images):
    from kserve.protocol.dataplane import DataPlane
    from kserve.model_repository import ModelRepository

    from serving.kserve_compat import BinarySafeDataPlane

    body, headers = _tritonclient_binary_body(serving_images)
    with pytest.raises(Exception) as stock_error:  # the trap the server works around
        DataPlane(ModelRepository()).decode_inference_request(body, headers, "brain-tumor")
    assert "utf" in str(stock_error.value).lower() or isinstance(stock_error.value, UnicodeDecodeError)

    request = BinarySafeDataPlane(ModelRepository()).decode_inference_request(
        body, headers, "brain-tumor")
    decoded = [bytes(b) for b in request.inputs[0].as_numpy()]
    assert decoded == serving_images


def test_binary_parser_refuses_broken_framing(serving_images):
    from kserve.errors import InvalidInput
    from kserve.model_repository import ModelRepository

    from serving.kserve_compat import BinarySafeDataPlane

    plane = BinarySafeDataPlane(ModelRepository())
    body, headers = _tritonclient_binary_body(serving_images[:1])
    for bad_headers, bad_body, message in (
        ({"inference-header-content-length": "abc"}, body, "not a number"),
        ({"inference-header-content-length": str(len(body) + 5)}, body, "does not fit"),
        (headers, body[: len(body) - 10], "runs past"),
        ({"inference-header-content-length": "5"}, b"[1,2]", "object"),
        *[({"inference-header-content-length": str(len(header))}, header, message) for header, message in (
            (b'{"inputs": [{"name": "image", "shape": [null], "datatype": "BYTES", "data": ["x"]}]}',
             "shape must be a list of non-negative integers"),
            (b'{"inputs": [{"name": "image", "shape": "1", "datatype": "BYTES", "data": ["x"]}]}', "shape must"),
            (b'{"inputs": [{"name": "image", "shape": [true], "datatype": "BYTES", "data": ["x"]}]}', "shape must"),
            (b'{"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": ["x"]}]}', "shape must"),
            (b'{"inputs": [{"name": "image", "shape": [1], "datatype": 7, "data": ["x"]}]}',
             "datatype"),
            (b'{"inputs": [{"name": ["image"], "shape": [1], "datatype": "BYTES", "data": ["x"]}]}', "'name' must"),
            (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": "binary_data_size"}]}',
             "'parameters' must be an object"),
            (b'{"parameters": [1], "inputs": []}', "'parameters' must be an object"),
            (b'{"id": 5, "inputs": []}', "'id' must be a string"))],
    ):
        with pytest.raises(InvalidInput, match=message):
            plane.decode_inference_request(bad_body, bad_headers, "brain-tumor")


# --------------------------------------------------------------------------- readiness
def test_readiness_follows_the_model_on_rest_and_grpc():
    """kserve's server readiness is True whatever its models' state; ours follows the model (the
    real server's /v2/health/ready and gRPC ServerReady read this data plane, see test_serving)."""
    import kserve
    from kserve.model_repository import ModelRepository
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.rest.v2_endpoints import V2Endpoints
    from kserve.errors import ServerNotReady

    from serving.kserve_compat import DataPlaneOnly, DataPlaneOnlyServicer

    async def check():
        registry = ModelRepository()
        plane = DataPlaneOnly(registry)
        assert not await plane.ready()  # no model yet
        model = kserve.Model("brain-tumor")
        registry.update(model)
        rest, grpc = V2Endpoints(plane), DataPlaneOnlyServicer(plane)
        states = []
        for ready in (False, True, False):
            model.ready = ready
            try:
                states.append((await rest.ready()).ready)
            except ServerNotReady:  # REST: 503
                states.append(False)
            states.append((await grpc.ServerReady(pb.ServerReadyRequest(), None)).ready)
            states.append((await grpc.ModelReady(pb.ModelReadyRequest(name="brain-tumor"), None)).ready)
        assert states == [False] * 3 + [True] * 3 + [False] * 3
        assert plane.metadata()["extensions"] == []

    asyncio.run(check())


# --------------------------------------------------------------------------- thresholds and load
def _bundle(tmp_path, threshold=None, thresholds=None):
    from brainscan.modelstore import save_bundle
    from tests.fixtures.registry import TINY_SIZE, make_tiny_model

    out = tmp_path / "bundle"
    save_bundle(make_tiny_model(), str(out), TINY_SIZE, {}, threshold=threshold, thresholds=thresholds)
    return out


def test_refuses_a_bundle_without_threshold_unless_given(tmp_path):
    from serving.model import BrainTumorModel

    bundle = _bundle(tmp_path)
    with pytest.raises(ValueError, match="no calibrated decision threshold.*--threshold"):
        BrainTumorModel(str(bundle)).load()
    model = BrainTumorModel(str(bundle), threshold=0.3)
    assert model.load() and model.policy.threshold_for(None) == 0.3 and model.policy.threshold_for("ct") == 0.3


def flip_one_byte(path) -> None:
    """Change one byte in the middle of a file (what a tampered or corrupted weights file looks like)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("changed", ["model.keras", "model.onnx", "brainscan_model.json"])
def test_refuses_to_serve_a_bundle_whose_files_changed_since_registration(serving_bundle, tmp_path, changed):
    """One byte changed in the downloaded folder: the server does not load, says which digest it expected
    and which it found, and is never ready."""
    import shutil

    from brainscan.bundle import BundleIntegrityError, digest, recorded_digest
    from serving.model import BrainTumorModel

    folder = shutil.copytree(serving_bundle, tmp_path / "bundle")
    expected = recorded_digest(folder)
    assert expected == digest(folder)
    flip_one_byte(folder / changed)
    found = digest(folder)
    model = BrainTumorModel(str(folder))
    with pytest.raises(BundleIntegrityError, match=f"refusing to load.*expected {expected}, found {found}"):
        model.load()
    assert not model.ready and model.served is None


def test_per_modality_thresholds(tmp_path, serving_images):
    from brainscan.labels import CLASSES
    from serving.model import BrainTumorModel, PreparedBatch

    model = BrainTumorModel(str(_bundle(tmp_path, threshold=0.5, thresholds={"ct": 0.2, "mri": 0.9})))
    model.load()
    assert (model.policy.threshold_for("ct"), model.policy.threshold_for("mri"), model.policy.threshold_for(None)) == (0.2, 0.9, 0.5)
    # Scores of 0.6: tumor at CT's threshold, not at MRI's. Modality from the client or, when not
    # given, from the model's own CT-vs-MRI probabilities.
    ct_like = np.zeros(7, np.float32)
    ct_like[CLASSES.index("ct_tumor")], ct_like[CLASSES.index("ct_healthy")] = 0.6, 0.4
    mri_like = np.zeros(7, np.float32)
    mri_like[CLASSES.index("mri_glioma")], mri_like[CLASSES.index("mri_healthy")] = 0.6, 0.4
    answer = model.postprocess((PreparedBatch(images=np.zeros((2, 1, 1, 3))), np.stack([ct_like, mri_like])))
    assert [p["tumor"] for p in answer["predictions"]] == [True, False]
    assert [p["threshold"] for p in answer["predictions"]] == [0.2, 0.9]
    forced = model.postprocess((PreparedBatch(images=np.zeros((2, 1, 1, 3)), modality="ct"),
                                np.stack([ct_like, mri_like])))
    assert [p["tumor"] for p in forced["predictions"]] == [True, True]


def test_kserve_adaptations_refuse_another_kserve_version(monkeypatch):
    from importlib import metadata

    from serving import kserve_compat

    kserve_compat.check_version()  # the installed one is the one it was written for
    monkeypatch.setattr(metadata, "version", lambda name: "0.22.0")
    with pytest.raises(ImportError, match=r"written for kserve 0\.21\.0, found 0\.22\.0.*re-check"):
        kserve_compat.check_version()


# --------------------------------------------------------------------------- explain and the queue limit
def test_explanations_count_against_the_queue_limit(tmp_path, serving_images, monkeypatch):
    """Grad-CAMs run on the model thread; each counts as a queued image, so a request that
    would push the queue over max_queue gets 503 instead of waiting behind them."""
    import base64

    from serving import model as served
    from serving.batching import ServerOverloaded

    started, release = threading.Event(), threading.Event()

    def slow_gradcam(bundle, raw):
        started.set()
        release.wait(60)
        return b"\x89PNG"

    monkeypatch.setattr(served, "gradcam_overlay", slow_gradcam)
    model = served.BrainTumorModel(str(_bundle(tmp_path, threshold=0.5)), batcher_options={"max_queue": 4})
    model.load()
    request = {"instances": [{"b64": base64.b64encode(image).decode()} for image in serving_images[:3]]}

    async def check():
        explain = asyncio.create_task(model.explain(await model.preprocess(request)))
        while not started.is_set():  # its 3 Grad-CAMs are under way
            await asyncio.sleep(0.01)
        two = await model.preprocess({"instances": request["instances"][:2]})
        predict = asyncio.create_task(model.predict(two))
        await asyncio.sleep(0)
        refused = predict.done() and isinstance(predict.exception(), ServerOverloaded)
        release.set()
        answer = await explain
        if not predict.done():
            predict.cancel()
        one = await model.predict(await model.preprocess({"instances": request["instances"][:1]}))
        return refused, answer, one

    refused, answer, one = asyncio.run(check())
    assert refused, "a predict went on waiting behind the explanations instead of a 503"
    assert len(answer["explanations"]) == 3
    assert len(one[1]) == 1  # the places came back: the next request is served
