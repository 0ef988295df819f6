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

Batching across requests lives in `brainscan.serving.server.DynamicBatcher`; this class
only calls it. Bad input raises kserve's InvalidInput (HTTP 400 / gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import logging
from dataclasses import dataclass, field

import kserve
import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from brainscan.labels import CLASSES, HEALTHY_INDICES, MODALITIES
from brainscan.preprocessing import InvalidImageError, preprocess_batch

log = logging.getLogger("brainscan.serving")

MODEL_NAME = "brain-tumor"
IMAGE_INPUT = "image"
TENSOR_INPUT = "input"


@dataclass
class Limits:
    """What one request may hold (bigger requests get a 4xx, never a crash)."""

    max_images: int = 64  # elements per request
    max_image_bytes: int = 20 * 1024 * 1024  # one encoded file
    max_pixels: int = 40_000_000  # width * height of one image, read from its header before decoding


@dataclass
class PreparedBatch:
    """What preprocess hands predict: model-ready images plus what postprocess needs."""

    images: np.ndarray  # float32 [N, S, S, 3]
    request: InferRequest | None = None  # None for v1 (dict) requests
    raw_images: list[bytes] = field(default_factory=list)  # encoded files (explain needs them)
    modality: str | None = None  # "ct" / "mri" when the client said so


class BrainTumorModel(kserve.Model):
    def __init__(self, model_uri: str, name: str = MODEL_NAME, threshold: float | None = None,
                 limits: Limits | None = None, batcher_options: dict | None = None):
        super().__init__(name)
        self.model_uri = model_uri
        self.threshold_override = threshold
        self.limits = limits or Limits()
        self.batcher_options = batcher_options or {}
        self.bundle = None
        self.batcher = None

    # ------------------------------------------------------------------ load
    def load(self) -> bool:
        from brainscan.modelstore import load_bundle, predict_probabilities
        from brainscan.serving.server import DynamicBatcher

        bundle = load_bundle(self.model_uri)
        if bundle.threshold is None and not bundle.thresholds and self.threshold_override is None:
            # A served detector without a calibrated threshold would decide at an arbitrary 0.5.
            raise ValueError(f"{self.model_uri} has no calibrated decision threshold (brainscan_model.json "
                             "'threshold' is null): serve an evaluated/registered model, or pass --threshold")
        self.bundle = bundle
        max_batch = int(self.batcher_options.get("max_batch_size", 32))
        self.batcher = DynamicBatcher(lambda x: predict_probabilities(bundle, x, batch_size=max_batch),
                                      **self.batcher_options)
        # Warm up: the first call traces the graph; do it before reporting ready.
        predict_probabilities(bundle, np.zeros((1, bundle.image_size, bundle.image_size, 3), np.float32))
        self.ready = True
        log.info("loaded %s (image size %d, threshold %s, per modality %s)", self.model_uri,
                 bundle.image_size, self.threshold_for(None), bundle.thresholds)
        return self.ready

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

    def threshold_for(self, modality: str | None) -> float:
        """--threshold wins; then the bundle's per-modality threshold; then its global one."""
        if self.threshold_override is not None:
            return float(self.threshold_override)
        thresholds = self.bundle.thresholds or {}
        if modality in thresholds:
            return float(thresholds[modality])
        if self.bundle.threshold is not None:
            return float(self.bundle.threshold)
        return float(max(thresholds.values()))  # only per-modality ones: the stricter for unknown modality

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
        modality = getattr(modality, "string_param", modality) or None
        if modality is not None and modality not in MODALITIES:
            raise InvalidInput(f"parameter modality must be 'ct' or 'mri', got {modality!r}")
        if tensor.name == IMAGE_INPUT:
            if tensor.datatype != "BYTES":
                raise InvalidInput(f"input '{IMAGE_INPUT}' must have datatype BYTES (encoded image files), "
                                   f"got {tensor.datatype}")
            if len(tensor.shape) != 1:
                raise InvalidInput(f"input '{IMAGE_INPUT}' must have shape [N], got {list(tensor.shape)}")
            raw = self._image_bytes(tensor)
            images = await self._decode(raw)
            return PreparedBatch(images=images, request=request, raw_images=raw, modality=modality)
        if tensor.name == TENSOR_INPUT:
            images = self._tensor(tensor)
            return PreparedBatch(images=images, request=request, modality=modality)
        raise InvalidInput(f"unknown input '{tensor.name}': send '{IMAGE_INPUT}' (BYTES [N], encoded image files) "
                           f"or '{TENSOR_INPUT}' (FP32 [N, S, S, 3], preprocessed)")

    def _image_bytes(self, tensor) -> list[bytes]:
        count = int(tensor.shape[0])
        if count == 0:
            raise InvalidInput(f"input '{IMAGE_INPUT}' is empty (shape [0])")
        if count > self.limits.max_images:
            raise InvalidInput(f"{count} images in one request; at most {self.limits.max_images}")
        if tensor._raw_data is not None:  # gRPC raw contents, REST binary extension
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

    def _check_size(self, data: bytes, index: int) -> None:
        from PIL import Image

        if len(data) == 0:
            raise InvalidInput(f"image {index}: empty input (0 bytes)")
        if len(data) > self.limits.max_image_bytes:
            raise InvalidInput(f"image {index}: {len(data)} bytes; at most {self.limits.max_image_bytes}")
        try:  # the header alone says the size: refuse decompression bombs before decoding
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception:
            return  # not an image at all: preprocess_batch says so with its own message
        if width * height > self.limits.max_pixels:
            raise InvalidInput(f"image {index}: {width}x{height} = {width * height} pixels; "
                               f"at most {self.limits.max_pixels}")

    async def _decode(self, raw: list[bytes]) -> np.ndarray:
        # Decoding is CPU work: off the event loop, so other requests keep flowing.
        loop = asyncio.get_running_loop()
        try:
            # the bundle's own preprocessing options (the head crop) travel with it
            return await loop.run_in_executor(
                None, functools.partial(preprocess_batch, raw, self.bundle.image_size, **self.bundle.preprocessing))
        except InvalidImageError as err:
            raise InvalidInput(str(err)) from None

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
        return PreparedBatch(images=await self._decode(raw), raw_images=raw, modality=body.get("modality"))

    # ------------------------------------------------------------------ predict / postprocess
    async def predict(self, payload: PreparedBatch, headers=None):
        probabilities = await self.batcher.submit(payload.images)
        return payload, probabilities

    def postprocess(self, result, headers=None):
        if isinstance(result, dict):  # explain's answer passes through
            return result
        prepared, probabilities = result
        probabilities = np.asarray(probabilities, dtype=np.float32)
        tumor_probability = np.clip(1.0 - probabilities[:, list(HEALTHY_INDICES)].sum(axis=1), 0.0, 1.0).astype(np.float32)
        thresholds = np.array([self.threshold_for(self._modality(prepared.modality, row))
                               for row in probabilities], dtype=np.float64)
        tumor = tumor_probability >= thresholds
        labels = np.array([CLASSES[i] for i in probabilities.argmax(axis=1)], dtype=object)
        if prepared.request is None:  # v1 predict
            return {"predictions": [
                {"label": str(labels[i]), "tumor_probability": float(tumor_probability[i]), "tumor": bool(tumor[i]),
                 "threshold": float(thresholds[i]), "probabilities": probabilities[i].tolist()}
                for i in range(len(labels))]}
        outputs = []
        for name, array, datatype in (("probabilities", probabilities, "FP32"),
                                      ("tumor_probability", tumor_probability, "FP32"),
                                      ("tumor", tumor, "BOOL"), ("label", labels, "BYTES")):
            output = InferOutput(name=name, shape=list(array.shape), datatype=datatype)
            output.set_data_from_numpy(array, binary_data=False)
            outputs.append(output)
        request = prepared.request
        return InferResponse(response_id=request.id or "", model_name=self.name, infer_outputs=outputs,
                             from_grpc=request.from_grpc, use_binary_outputs=request.use_binary_outputs,
                             requested_outputs=request.request_outputs)

    def _modality(self, given: str | None, probabilities: np.ndarray) -> str | None:
        """The client's modality if it sent one, else the model's own CT-vs-MRI call (only needed
        when the bundle has per-modality thresholds; CT and MRI scores sit on different scales)."""
        if given or not self.bundle.thresholds:
            return given
        ct = sum(float(probabilities[CLASSES.index(c)]) for c in CLASSES if c.startswith("ct_"))
        return "ct" if ct >= 0.5 else "mri"

    # ------------------------------------------------------------------ explain
    async def explain(self, payload: PreparedBatch, headers=None) -> dict:
        from brainscan.components.explain import gradcam_overlay

        if not payload.raw_images:
            raise InvalidInput("explain needs encoded image files (input 'image' / v1 instances), "
                               "not a preprocessed tensor")
        _, probabilities = await self.predict(payload)
        answer = self.postprocess((PreparedBatch(images=payload.images, modality=payload.modality), probabilities))
        loop = asyncio.get_running_loop()
        explanations = []
        for raw, prediction in zip(payload.raw_images, answer["predictions"]):
            # Grad-CAM needs gradients through the model: run it on the batcher's worker thread.
            png = await self.batcher.run_exclusive(gradcam_overlay, self.bundle, raw)
            prediction["overlay_png_b64"] = base64.b64encode(png).decode("ascii")
            prediction.pop("probabilities", None)
            explanations.append(prediction)
        del loop
        return {"explanations": explanations}
