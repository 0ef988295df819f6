"""The KServe model `brain-tumor`: load a bundle, preprocess v2 requests, predict, postprocess.

Open Inference Protocol (v2), as in the design notes:
- input `image` BYTES [N]: each element one encoded image file (raw bytes over gRPC and the
  REST binary extension, base64 text in plain JSON), or input `input` FP32 [N, S, S, 3]
  already preprocessed;
- outputs `probabilities` FP32 [N, 7], `tumor_probability` FP32 [N], `tumor` BOOL [N],
  `label` BYTES [N].

Explanation: the v1 route `POST /v1/models/brain-tumor:explain` with
`{"instances": [{"b64": "<base64 image file>"}, ...]}` answers
`{"explanations": [{"label", "tumor_probability", "tumor", "overlay_png_b64"}, ...]}`
(a Grad-CAM overlay PNG per image).

The decision (P(tumor), the threshold of the scan's modality, tumor or not) is
brainscan.decision's, as in evaluation and the registered MLflow model. Batching across
requests lives in serving.batching; this class only calls it. Bad input raises
kserve's InvalidInput (HTTP 400 / gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import kserve
import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from prometheus_client import Info

from brainscan.config import MODEL_NAME, ServeSettings
from brainscan.decision import check_modality
from brainscan.explain import gradcam_overlay
from serving import kserve_compat
from serving.runtime import ServedModel
from brainscan.cpus import cpu_count
from brainscan.labels import CLASSES
from brainscan.modelstore import load_bundle
from brainscan.preprocessing import InvalidImageError
from serving.batching import DynamicBatcher, Ticket

log = logging.getLogger("serving")

IMAGE_INPUT = "image"
TENSOR_INPUT = "input"
RUNTIME = Info("brainscan_model_runtime", "What runs the served model's forward pass")


@dataclass
class Limits:
    """What one request may hold (bigger requests get a 4xx, never a crash)."""

    max_images: int = ServeSettings.max_images  # elements per request
    max_image_bytes: int = ServeSettings.max_image_bytes  # one encoded file
    max_pixels: int = ServeSettings.max_pixels  # width * height of one image, from its header before decoding


@dataclass
class PreparedBatch:
    """What preprocess hands predict: model-ready images plus what postprocess needs."""

    images: np.ndarray  # float32 [N, S, S, 3]
    request: InferRequest | None = None  # None for v1 (dict) requests
    raw_images: list[bytes] = field(default_factory=list)  # encoded files (explain needs them)
    modality: str | None = None  # "ct" / "mri" when the client said so
    ticket: Ticket | None = None  # tells the batcher this request is coming


class BrainTumorModel(kserve.Model):
    def __init__(self, model_uri: str, name: str = MODEL_NAME, threshold: float | None = None,
                 limits: Limits | None = None, batcher_options: dict | None = None, runtime: str = "auto"):
        super().__init__(name)
        self.model_uri = model_uri
        self.threshold_override = threshold
        self.limits = limits or Limits()
        self.batcher_options = batcher_options or {}
        self.runtime = runtime
        self.bundle = None
        self.served = None
        self.policy = None
        self.batcher = None
        # Decoding and preprocessing: CPU work off the event loop, one thread per CPU the pod may
        # use (its cgroup CPU limit, not the node's cores); it overlaps the model call of the
        # previous batch (both release the GIL in native code).
        self.decoders = ThreadPoolExecutor(max_workers=cpu_count(), thread_name_prefix="brainscan-decode")

    # ------------------------------------------------------------------ load
    def load(self) -> bool:
        bundle = load_bundle(self.model_uri)
        try:
            # A served detector without a calibrated threshold would decide at an arbitrary 0.5.
            self.policy = bundle.policy(self.threshold_override)
        except ValueError as err:
            raise ValueError(f"{self.model_uri}: {err} (brainscan serve --threshold)") from None
        self.bundle = bundle
        # The compiled preprocessing and a runtime checked against Keras (serving.runtime);
        # it warms both up before the server reports ready.
        self.served = ServedModel(bundle, self.runtime, on_runtime=self._runtime_changed)
        self.batcher = DynamicBatcher(self.served.predict, **self.batcher_options)
        self.ready = True
        log.info("loaded %s (image size %d, threshold %s, per modality %s; model run by %s)", self.model_uri,
                 bundle.image_size, self.policy.threshold, dict(self.policy.thresholds),
                 self.served.runtime.description)
        return self.ready

    @staticmethod
    def _runtime_changed(runtime) -> None:
        RUNTIME.info({"runtime": runtime.name, "description": runtime.description})

    # ------------------------------------------------------------------ metadata (v2 model metadata)
    def get_input_types(self) -> list[dict]:
        size = self.bundle.image_size if self.bundle else -1
        return [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, size, size, 3]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(CLASSES)]},
                {"name": "tumor_probability", "datatype": "FP32", "shape": [-1]},
                {"name": "tumor", "datatype": "BOOL", "shape": [-1]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]}]

    # ------------------------------------------------------------------ preprocess
    def validate(self, payload):
        return payload  # preprocess already checked everything; the base class expects dicts

    async def preprocess(self, payload, headers=None) -> PreparedBatch:
        if isinstance(payload, InferRequest):
            return await self._preprocess_v2(payload)
        if isinstance(payload, dict):
            return await self._preprocess_v1(payload)
        raise InvalidInput(f"unsupported request body ({type(payload).__name__})")

    async def _preprocess_v2(self, request: InferRequest) -> PreparedBatch:
        if len(request.inputs) != 1:
            raise InvalidInput(f"expected exactly one input ('{IMAGE_INPUT}' BYTES [N] or '{TENSOR_INPUT}' FP32 "
                               f"[N, S, S, 3]), got {len(request.inputs)}")
        tensor = request.inputs[0]
        params = request.parameters or {}
        modality = params.get("modality")
        modality = self._modality_parameter(getattr(modality, "string_param", modality))
        if tensor.name == IMAGE_INPUT:
            if tensor.datatype != "BYTES":
                raise InvalidInput(f"input '{IMAGE_INPUT}' must have datatype BYTES (encoded image files), "
                                   f"got {tensor.datatype}")
            if len(tensor.shape) != 1:
                raise InvalidInput(f"input '{IMAGE_INPUT}' must have shape [N], got {list(tensor.shape)}")
            raw = self._image_bytes(tensor)
            ticket = self.batcher.expect()
            images = await self._decode(raw, ticket)
            return PreparedBatch(images=images, request=request, raw_images=raw, modality=modality, ticket=ticket)
        if tensor.name == TENSOR_INPUT:  # turning a JSON list into an array is CPU work: off the event loop
            images = await asyncio.get_running_loop().run_in_executor(self.decoders, self._tensor, tensor)
            return PreparedBatch(images=images, request=request, modality=modality)
        raise InvalidInput(f"unknown input '{tensor.name}': send '{IMAGE_INPUT}' (BYTES [N], encoded image files) "
                           f"or '{TENSOR_INPUT}' (FP32 [N, S, S, 3], preprocessed)")

    def _image_bytes(self, tensor) -> list[bytes]:
        count = int(tensor.shape[0])
        if count == 0:
            raise InvalidInput(f"input '{IMAGE_INPUT}' is empty (shape [0])")
        if count > self.limits.max_images:
            raise InvalidInput(f"{count} images in one request; at most {self.limits.max_images}")
        if kserve_compat.raw_contents(tensor) is not None:  # gRPC raw contents, REST binary extension
            try:
                elements = [bytes(e) for e in tensor.as_numpy().reshape(-1)]
            except Exception as err:  # malformed length-prefixed BYTES buffer
                raise InvalidInput(f"input '{IMAGE_INPUT}': malformed binary BYTES data ({err})") from None
        else:
            data = tensor.data if tensor.data is not None else []
            elements = [self._from_text(e, i) for i, e in enumerate(data)]
        if len(elements) != count:
            raise InvalidInput(f"input '{IMAGE_INPUT}' declares shape [{count}] but holds {len(elements)} elements")
        for index, element in enumerate(elements):
            self._check_size(element, index)
        return elements

    @staticmethod
    def _from_text(element, index: int) -> bytes:
        # gRPC bytes_contents arrive as bytes; plain JSON carries the file's base64 text.
        if isinstance(element, (bytes, bytearray)):
            return bytes(element)
        if not isinstance(element, str):
            raise InvalidInput(f"image {index}: expected base64 text of an image file, got {type(element).__name__}")
        try:
            return base64.b64decode(element, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"image {index}: not valid base64 (in JSON, BYTES elements carry the image "
                               "file's base64 text)") from None

    @staticmethod
    def _modality_parameter(value) -> str | None:
        try:
            return check_modality(value)
        except ValueError:
            raise InvalidInput(f"parameter modality must be 'ct' or 'mri', got {value!r}") from None

    def _check_size(self, data: bytes, index: int) -> None:
        if len(data) == 0:
            raise InvalidInput(f"image {index}: empty input (0 bytes)")
        if len(data) > self.limits.max_image_bytes:
            raise InvalidInput(f"image {index}: {len(data)} bytes; at most {self.limits.max_image_bytes}")

    async def _decode(self, raw: list[bytes], ticket: Ticket | None = None) -> np.ndarray:
        # Decoding is CPU work: off the event loop, so other requests keep flowing. Preprocessing
        # refuses an image whose header names more than max_pixels before decoding it.
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.decoders, self.served.preprocess, raw, self.limits.max_pixels)
        except BaseException as err:
            if ticket is not None:
                ticket.close()  # this request will not reach the batcher
            if isinstance(err, InvalidImageError):
                raise InvalidInput(str(err)) from None
            raise

    def _tensor(self, tensor) -> np.ndarray:
        size = self.bundle.image_size
        expected = [size, size, 3]
        if tensor.datatype != "FP32":
            raise InvalidInput(f"input '{TENSOR_INPUT}' must have datatype FP32, got {tensor.datatype}")
        shape = [int(s) for s in tensor.shape]
        if len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
            raise InvalidInput(f"input '{TENSOR_INPUT}' must have shape [N, {size}, {size}, 3] (preprocessed), "
                               f"got {shape}")
        if shape[0] > self.limits.max_images:
            raise InvalidInput(f"{shape[0]} images in one request; at most {self.limits.max_images}")
        try:
            images = np.asarray(tensor.as_numpy(), dtype=np.float32).reshape(shape)
        except (ValueError, TypeError) as err:
            raise InvalidInput(f"input '{TENSOR_INPUT}': data does not match shape {shape} ({err})") from None
        if not np.isfinite(images).all():
            raise InvalidInput(f"input '{TENSOR_INPUT}' holds NaN or infinite values")
        return images

    async def _preprocess_v1(self, body: dict) -> PreparedBatch:
        instances = body.get("instances")
        if not isinstance(instances, list) or not instances:
            raise InvalidInput('expected {"instances": [{"b64": "<base64 image file>"}, ...]}')
        if len(instances) > self.limits.max_images:
            raise InvalidInput(f"{len(instances)} images in one request; at most {self.limits.max_images}")
        raw = []
        for index, instance in enumerate(instances):
            if isinstance(instance, dict):
                instance = instance.get("b64", (instance.get(IMAGE_INPUT) or {}).get("b64")
                                        if isinstance(instance.get(IMAGE_INPUT), dict) else instance.get(IMAGE_INPUT))
            raw.append(self._from_text(instance, index))
            self._check_size(raw[-1], index)
        modality = self._modality_parameter(body.get("modality"))
        ticket = self.batcher.expect()
        return PreparedBatch(images=await self._decode(raw, ticket), raw_images=raw, modality=modality,
                             ticket=ticket)

    # ------------------------------------------------------------------ predict / postprocess
    async def predict(self, payload: PreparedBatch, headers=None):
        probabilities = await self.batcher.submit(payload.images, payload.ticket)
        return payload, probabilities

    def postprocess(self, result, headers=None):
        if isinstance(result, dict):  # explain's answer passes through
            return result
        prepared, probabilities = result
        decision = self.policy.decide(probabilities, prepared.modality)
        tumor_probability = decision.tumor_probability.astype(np.float32)
        if prepared.request is None:  # v1 predict
            return {"predictions": [
                {"label": str(decision.label[i]), "tumor_probability": float(tumor_probability[i]),
                 "tumor": bool(decision.tumor[i]), "threshold": float(decision.threshold[i]),
                 "probabilities": decision.probabilities[i].tolist()}
                for i in range(len(decision))]}
        outputs = []
        for name, array, datatype in (("probabilities", decision.probabilities, "FP32"),
                                      ("tumor_probability", tumor_probability, "FP32"),
                                      ("tumor", decision.tumor, "BOOL"), ("label", decision.label, "BYTES")):
            output = InferOutput(name=name, shape=list(array.shape), datatype=datatype)
            output.set_data_from_numpy(array, binary_data=False)
            outputs.append(output)
        request = prepared.request
        return InferResponse(response_id=request.id or "", model_name=self.name, infer_outputs=outputs,
                             from_grpc=request.from_grpc, use_binary_outputs=request.use_binary_outputs,
                             requested_outputs=request.request_outputs)

    # ------------------------------------------------------------------ explain
    async def explain(self, payload: PreparedBatch, headers=None) -> dict:
        if not payload.raw_images:
            raise InvalidInput("explain needs encoded image files (input 'image' / v1 instances), "
                               "not a preprocessed tensor")
        _, probabilities = await self.predict(payload)
        answer = self.postprocess((PreparedBatch(images=payload.images, modality=payload.modality), probabilities))
        explanations = []
        # Grad-CAM needs gradients through the model: on the batcher's worker thread, each one
        # counted against its queue limit like a predicted image (503 when full).
        overlays = await self.batcher.map_exclusive(functools.partial(gradcam_overlay, self.bundle),
                                                    payload.raw_images)
        for png, prediction in zip(overlays, answer["predictions"]):
            prediction["overlay_png_b64"] = base64.b64encode(png).decode("ascii")
            prediction.pop("probabilities", None)
            explanations.append(prediction)
        return {"explanations": explanations}
