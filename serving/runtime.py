"""The served model call and preprocessing, compiled once and checked against Keras at load.

`ServedModel(bundle)` is what the model server (and the serving benchmark's in-process limit)
calls per batch:

- `preprocess(files, max_pixels)`: brainscan.preprocessing's own checks (`check_image_bytes`:
  format, pixels from the header before decoding, a whole decode) and its one definition of
  the preprocessing, `preprocess_image`, traced once into a graph (`tf.function` with a fixed
  signature) instead of run as about ten eager TensorFlow ops per image, with the bundle's own
  options (`bundle.preprocessing`: the head crop a model was trained with). Same ops, same
  kernels: the same floats as `preprocess_batch` with those options (tests compare them).
- `predict(images)`: softmax [N, 7] from the bundle's model through a runtime:
  - "onnx": the bundle's model.onnx, run by ONNX Runtime on the CPU (measured on 2 cores at
    71 px: 1.3-2x faster per image than the compiled TensorFlow call at batches of 8 to 32).
    Registration converted it and checked it against Keras (brainscan/onnx_export.py); it is
    covered by the bundle's sha256. Serving only loads it: no conversion here, no tf2onnx or
    onnx in the serving image;
  - "tf": `tf.function` over the Keras model with input signature [None, S, S, 3] (one trace
    for every batch size, no per-call Keras overhead), on whatever device TensorFlow uses
    (a GPU where there is one);
  - "keras": the plain per-call Keras model (brainscan.bundle.predict_probabilities), the
    reference the others are checked against;
  - "auto" (the default): "tf" when TensorFlow sees a GPU, else "onnx"; "tf" (with a logged
    warning) when the bundle has no model.onnx (a version registered before the ONNX model was
    shipped, or a bundle never registered), ONNX Runtime is missing or the model disagrees.
  Every runtime but "keras" is checked at load on a fixed probe batch: its softmax must equal
  Keras's within `TOLERANCE` (brainscan.bundle.ONNX_TOLERANCE, 1e-5), or it is not used.

Grad-CAM (brainscan.explain) keeps using the Keras model: gradients need it, and it is the
same weights.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from brainscan.bundle import ONNX_FILE, ONNX_TOLERANCE, BundleError
from brainscan.cpus import cpu_count
from brainscan.limits import MAX_IMAGE_PIXELS
from brainscan.labels import CLASSES
from brainscan.modelstore import ModelBundle
from brainscan.preprocessing import preprocess_files, preprocess_image

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnx", "tf", "keras")
TOLERANCE = ONNX_TOLERANCE  # largest |softmax difference| from Keras a runtime may have
PROBE_BATCH = 4


@dataclass
class Runtime:
    name: str  # "onnx", "tf" or "keras"
    call: Callable[[np.ndarray], np.ndarray]  # float32 [N, S, S, 3] -> float32 [N, 7]
    description: str  # for logs and metrics: what runs the model, and how close it is to Keras
    max_abs_diff: float = 0.0  # against Keras on the probe batch
    load_seconds: float = 0.0


# ----------------------------------------------------------------------------- runtimes
def keras_runtime(bundle: ModelBundle) -> Runtime:
    return Runtime("keras", lambda x: bundle.predict(x, batch_size=max(len(x), 1)), "keras (eager model call)")


def tf_runtime(bundle: ModelBundle) -> Runtime:
    # TensorFlow's import costs seconds: only where a model is loaded
    import tensorflow as tf

    model, size = bundle.model, bundle.image_size
    compiled = tf.function(lambda x: model(x, training=False),
                           input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])

    def call(images: np.ndarray) -> np.ndarray:
        return compiled(np.ascontiguousarray(images, dtype=np.float32)).numpy().astype(np.float32, copy=False)

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    return Runtime("tf", call, f"tensorflow {tf.__version__} tf.function ({device})")


def onnx_file(bundle: ModelBundle) -> Path | None:
    """The bundle's model.onnx (written at registration); None when it has none."""
    path = Path(bundle.local_dir) / ONNX_FILE if bundle.local_dir is not None else None
    return path if path is not None and path.is_file() else None


def onnx_runtime(bundle: ModelBundle, threads: int | None = None) -> Runtime:
    # ONNX Runtime is optional at import time: "auto" falls back to TensorFlow without it
    import onnxruntime as ort

    path = onnx_file(bundle)
    if path is None:
        raise BundleError(f"{bundle.uri}: no {ONNX_FILE} in the bundle (registration writes it; versions registered "
                          "before it was shipped have none): serve it with --runtime tf, or register it again")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_count()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Busy-waiting threads would take the cores that decode the next requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Batch sizes vary from call to call: a memory pattern per shape only grows the process
    # (measured: +90 MB per pass over 4 sizes with it, flat without, same speed).
    options.enable_mem_pattern = False
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def call(images: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]

    return Runtime("onnx", call, f"onnxruntime {ort.__version__} (CPU, {options.intra_op_num_threads} threads)")


def _probe(image_size: int) -> np.ndarray:
    return np.random.default_rng(20240610).uniform(-1, 1, (PROBE_BATCH, image_size, image_size, 3)).astype(np.float32)


def verified(runtime: Runtime, reference: np.ndarray, probe: np.ndarray) -> Runtime:
    """The runtime, with its distance from Keras recorded; ValueError when over TOLERANCE."""
    got = np.asarray(runtime.call(probe), dtype=np.float32)
    if got.shape != reference.shape:
        raise ValueError(f"{runtime.description}: output shape {got.shape}, Keras gives {reference.shape}")
    diff = float(np.max(np.abs(got - reference)))
    if not diff <= TOLERANCE:  # NaN fails too
        raise ValueError(f"{runtime.description}: differs from Keras by {diff:.2e} (> {TOLERANCE:g})")
    runtime.max_abs_diff = diff
    runtime.description += f", max |diff| from Keras {diff:.1e}"
    return runtime


def load_runtime(bundle: ModelBundle, name: str = "auto") -> Runtime:
    """The runtime `name` for the bundle's model, checked against Keras (see the module doc)."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; expected one of {', '.join(RUNTIMES)}")
    started = time.perf_counter()
    keras = keras_runtime(bundle)
    if name == "keras":
        keras.load_seconds = time.perf_counter() - started
        return keras
    probe = _probe(bundle.image_size)
    reference = keras.call(probe)
    choices = [name]
    if name == "auto":
        choices = ["tf"] if _gpu_present() else ["onnx", "tf"]
        if choices[0] == "onnx" and onnx_file(bundle) is None:  # never converted here: TensorFlow serves it
            log.warning("%s: no %s in the bundle (registered before the ONNX model was shipped, or never "
                        "registered): served by compiled TensorFlow; register it again for ONNX Runtime",
                        bundle.uri, ONNX_FILE)
            choices = ["tf"]
    errors = []
    for choice in choices:
        try:
            runtime = verified(onnx_runtime(bundle) if choice == "onnx" else tf_runtime(bundle), reference, probe)
        except Exception as err:  # noqa: BLE001 - "auto" moves on to the next runtime; the reason is logged
            if name != "auto":
                raise
            errors.append(f"{choice}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            log.warning("runtime %s not used for %s: %s", choice, bundle.uri, errors[-1])
            continue
        runtime.load_seconds = time.perf_counter() - started
        return runtime
    raise RuntimeError("no runtime could serve the model: " + "; ".join(errors))


# ----------------------------------------------------------------------------- preprocessing
class CompiledPreprocessing:
    """preprocess_image for one image size and one set of a bundle's options (`crop_to_head`: see
    brainscan.preprocessing.preprocessing_options), traced once: encoded file (tf.string scalar) -> [S, S, 3]."""

    def __init__(self, image_size: int, crop_to_head: bool = False):
        # TensorFlow's import costs seconds: only where images are preprocessed
        import tensorflow as tf

        self.image_size = int(image_size)
        self.crop_to_head = bool(crop_to_head)
        self._fn = tf.function(lambda data: preprocess_image(data, self.image_size, self.crop_to_head),
                               input_signature=[tf.TensorSpec([], tf.string)])
        self._fn(tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)))  # trace it now, not at the first request

    def __call__(self, files: Sequence[bytes], max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """Encoded image files -> float32 [N, S, S, 3]; InvalidImageError names the first bad one
        (the checks and messages of brainscan.preprocessing.preprocess_batch)."""
        return preprocess_files(files, self.image_size, lambda data: self._fn(data).numpy(), max_pixels)


# ----------------------------------------------------------------------------- together
def _gpu_present() -> bool:
    # TensorFlow's import costs seconds: loading a model imports it anyway
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


class ServedModel:
    """A bundle ready to serve: compiled preprocessing and a checked runtime for its model, both
    warmed up before it is returned (`on_runtime(runtime)` is told which runtime serves)."""

    def __init__(self, bundle: ModelBundle, runtime: str = "auto",
                 on_runtime: Callable[[Runtime], None] | None = None):
        self.bundle = bundle
        self.image_size = bundle.image_size
        self.runtime = load_runtime(bundle, runtime)
        # the bundle's own preprocessing options (the head crop it was trained with) travel with it
        self._preprocess = CompiledPreprocessing(bundle.image_size, **bundle.preprocessing)
        # Warm up both graphs before anyone calls: the first call of each builds it.
        self.predict(np.zeros((1, self.image_size, self.image_size, 3), np.float32))
        log.info("model %s served by %s (ready in %.1f s)", bundle.uri, self.runtime.description,
                 self.runtime.load_seconds)
        (on_runtime or (lambda runtime: None))(self.runtime)

    def preprocess(self, files: Sequence[bytes], max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        return self._preprocess(files, max_pixels)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax float32 [N, 7] of preprocessed images float32 [N, S, S, 3]."""
        images = np.asarray(images, dtype=np.float32)
        if len(images) == 0:
            return np.zeros((0, len(CLASSES)), dtype=np.float32)
        return self.runtime.call(images)

