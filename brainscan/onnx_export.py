"""The bundle's model as ONNX, converted and checked once, at registration: `export_onnx(bundle_dir)`.

Registration (components/register.py) writes `model.onnx` next to `model.keras` before the
bundle's sha256 is taken, so the ONNX file ships, covered by the digest, inside every registered
version; the CPU predictor (serving/runtime.py) only loads it with ONNX Runtime, and the serving
image carries neither tf2onnx nor onnx.

- The conversion (tf2onnx, opset 17, input `images` float32 [None, S, S, 3]) runs in a child
  process at low priority: tf2onnx copies the graph, weights included, around its optimizer
  passes (about 4 GB at its peak for the 71 px Xception, 80 MB of weights); that memory leaves
  with the child.
- The converted model is checked against Keras on fixed probe batches (sizes 4 and 1, the batch
  dimension is dynamic): every softmax within brainscan.bundle.ONNX_TOLERANCE, or OnnxExportError
  and no model.onnx: registration refuses the version.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from brainscan.bundle import MODEL_FILE, ONNX_FILE, ONNX_TOLERANCE, load_model, predict_probabilities

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "images"
PROBE_SIZES = (4, 1)  # two batch sizes through the dynamic batch dimension
PROBE_SEED = 20240610


class OnnxExportError(ValueError):
    """The model could not be converted, or its ONNX form disagrees with Keras: not registered."""


def convert_to_onnx(bundle_dir: str | Path, image_size: int, path: str | Path) -> Path:
    """The bundle's Keras model as an ONNX file, written atomically to path (the child's work)."""
    # tf2onnx and TensorFlow only where a model is converted (registration), never in serving
    import tensorflow as tf
    import tf2onnx

    model, size, path = load_model(bundle_dir), int(image_size), Path(path)
    function = tf.function(lambda x: model(x, training=False))
    spec = (tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=OPSET)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(proto.SerializeToString())
    partial.replace(path)
    return path


def convert_in_child(bundle_dir: str | Path, image_size: int, path: Path, timeout: float = 1800.0) -> Path:
    """convert_to_onnx in a child process at low priority; OnnxExportError with its last words when it fails.

    A child, not the registering process: converting in a process left it 6 GB larger for good
    (tf2onnx copies the graph, weights included, around every optimizer pass)."""
    env = {**os.environ, "TF2ONNX_CATCH_ERRORS": "FALSE",  # no graph copy per optimizer: 6.7 -> 3.9 GB peak
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    command = [sys.executable, "-m", "brainscan.onnx_export", str(bundle_dir), str(int(image_size)), str(path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: os.nice(10), stdin=subprocess.DEVNULL)
    if done.returncode != 0 or not Path(path).is_file():
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise OnnxExportError(f"ONNX conversion exited with code {done.returncode}: {last[0][:300]}")
    return Path(path)


def probes(image_size: int) -> list[np.ndarray]:
    """The fixed inputs the ONNX model is checked on: uniform in [-1, 1], preprocess_input's range."""
    rng = np.random.default_rng(PROBE_SEED)
    return [rng.uniform(-1, 1, (n, image_size, image_size, 3)).astype(np.float32) for n in PROBE_SIZES]


def max_difference(onnx_path: str | Path, model, image_size: int) -> float:
    """Largest |softmax difference| between the ONNX file (ONNX Runtime, CPU) and the Keras model on
    the probes (NaN counts as infinitely far); OnnxExportError for an output of the wrong shape."""
    import onnxruntime as ort  # only where an ONNX model is checked

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    for x in probes(image_size):
        got = np.asarray(session.run(None, {name: x})[0], dtype=np.float32)
        want = predict_probabilities(model, x, image_size)
        if got.shape != want.shape:
            raise OnnxExportError(f"the ONNX model answers shape {list(got.shape)}, Keras {list(want.shape)}")
        diff = float(np.max(np.abs(got - want)))
        if not np.isfinite(diff):
            return float("inf")
        worst = max(worst, diff)
    return worst


def export_onnx(bundle_dir: str | Path, image_size: int) -> dict:
    """Convert the bundle's model.keras to bundle_dir/model.onnx and check it against Keras; what to
    record in the bundle's metadata. OnnxExportError (and no model.onnx left) when it disagrees."""
    import onnxruntime as ort  # only where an ONNX model is checked
    import tf2onnx  # its version is recorded; registration only

    folder = Path(bundle_dir)
    path = folder / ONNX_FILE
    started = time.perf_counter()
    try:
        convert_in_child(folder, image_size, path)
        diff = max_difference(path, load_model(folder), image_size)
        if not diff <= ONNX_TOLERANCE:
            raise OnnxExportError(f"the ONNX conversion of {folder / MODEL_FILE} differs from Keras by {diff:.2e} "
                                  f"(> {ONNX_TOLERANCE:g}) on the probe batches: refusing to register it")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started
    log.info("converted %s to ONNX and checked it in %.1f s: max |diff| from Keras %.1e", folder, seconds, diff)
    return {"file": ONNX_FILE, "opset": OPSET, "converter": f"tf2onnx {tf2onnx.__version__}",
            "checked_with": f"onnxruntime {ort.__version__}", "max_abs_diff_from_keras": diff,
            "probe_batches": list(PROBE_SIZES)}


if __name__ == "__main__":  # the conversion child: python -m brainscan.onnx_export BUNDLE_DIR IMAGE_SIZE OUT
    logging.basicConfig(level=logging.WARNING)
    convert_to_onnx(sys.argv[1], int(sys.argv[2]), sys.argv[3])
