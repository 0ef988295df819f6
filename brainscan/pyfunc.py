"""The registered MLflow model: a pyfunc over a brainscan bundle that every MLflow consumer can load.

- input: a DataFrame with a column `image` of encoded image files (JPEG/PNG bytes; base64 text
  is accepted too), signature type `binary`: MLServer and `mlflow models serve` decode the
  base64 text of JSON requests into bytes;
- params: `modality` ("ct" or "mri"; optional): the client's modality picks its threshold;
- output: a dict of arrays, the v2 tensors `brainscan serve` answers with: probabilities
  float32 [N, 7], tumor_probability float32 [N], tumor bool [N], label str [N]. MLServer
  (`modelFormat: mlflow` in KServe) encodes it as those four v2 outputs.

The decision is brainscan.decision's, with the thresholds written into the bundle at
registration: the same answer as `brainscan serve` for the same scan and request.

The model carries its own code (`code_package`: this module and the few it imports, nothing
else of brainscan), so it loads where brainscan is not installed, from the model's own
requirements. It runs the bundle's Keras model (model.keras; the model.onnx that ships next
to it is the brainscan predictor's), and refuses to load a bundle whose files are not the
ones registered (brainscan.bundle.check_digest against the bundle's brainscan_model.sha256).
"""

from __future__ import annotations

import base64
import binascii
import shutil
from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from brainscan import bundle
from brainscan.decision import DecisionPolicy
from brainscan.labels import CLASSES
from brainscan.preprocessing import preprocess_batch, preprocessing_options

IMAGE_COLUMN = "image"
# What a registered model carries of brainscan: this module and what it imports, all of them
# standard library, numpy, Pillow, pandas, TensorFlow/Keras and MLflow underneath.
SHIPPED_MODULES = ("__init__.py", "limits.py", "labels.py", "preprocessing.py", "decision.py", "bundle.py",
                   "pyfunc.py")
# Python packages the pyfunc needs at load and predict time, pinned to this environment's versions.
REQUIREMENTS = ("mlflow", "keras", "tensorflow-cpu", "tensorflow", "numpy", "pandas", "pillow", "h5py", "protobuf")
# The file MLflow runs to build the model (models-from-code, nothing pickled).
ENTRY_FILE = Path(__file__).resolve().parent / "pyfunc_entry.py"


def code_package(folder: str | Path) -> Path:
    """`folder/brainscan/` holding the shipped modules: the `code_paths` of the logged model."""
    package = Path(folder) / "brainscan"
    package.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    for name in SHIPPED_MODULES:
        shutil.copy2(here / name, package / name)
    return package


def pinned_requirements() -> list[str]:
    """Exact versions of what the pyfunc needs, read from this environment (no network)."""
    from importlib import metadata  # noqa: PLC0415 - only at registration, not in every loaded model

    pins = []
    for dist in REQUIREMENTS:
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(CLASSES)), "probabilities"),
                        TensorSpec(np.dtype(np.float32), (-1,), "tumor_probability"),
                        TensorSpec(np.dtype(np.bool_), (-1,), "tumor"),
                        TensorSpec(np.dtype(object), (-1,), "label")]),
        params=ParamSchema([ParamSpec("modality", "string", "")]),
    )


def decode_image(value, index: int) -> bytes:
    """An element of the `image` column: bytes as they are, base64 text decoded."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"image {index}: not valid base64 text of an image file") from None
    raise ValueError(f"image {index}: expected image file bytes, got {type(value).__name__}")


class BrainscanPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc over a brainscan bundle (artifact `bundle`)."""

    def load_context(self, context):
        folder = bundle.find_bundle_dir(context.artifacts["bundle"])
        bundle.check_digest(folder)  # BundleIntegrityError: a changed file is never served
        meta = bundle.read_metadata(folder)
        self.image_size = int(meta["image_size"])
        self.preprocessing = preprocessing_options(meta)  # what training applied (the head crop)
        self.policy = DecisionPolicy.from_metadata(meta)
        self.model = bundle.load_model(folder)

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "columns"):
            if IMAGE_COLUMN not in model_input.columns:
                raise ValueError(f"expected a column `{IMAGE_COLUMN}`, got {list(model_input.columns)}")
            values = model_input[IMAGE_COLUMN].tolist()
        else:
            values = list(np.asarray(model_input, dtype=object).reshape(-1))
        files = [decode_image(value, i) for i, value in enumerate(values)]
        x = preprocess_batch(files, self.image_size, **self.preprocessing)
        probabilities = bundle.predict_probabilities(self.model, x, self.image_size)
        decision = self.policy.decide(probabilities, (params or {}).get("modality") or None)
        return {"probabilities": decision.probabilities,
                "tumor_probability": decision.tumor_probability.astype(np.float32),
                "tumor": decision.tumor,
                "label": decision.label}
