"""Model bundles: save one, load one from a folder, an S3 prefix or the MLflow registry.

A bundle is a folder with ``model.keras`` (input float32 [N, S, S, 3] already preprocessed,
output softmax [N, 7] in ``brainscan.labels.CLASSES`` order) and ``brainscan_model.json``
(classes, image_size, threshold, thresholds, anything else the trainer wants to record).

TensorFlow / Keras / MLflow are imported inside the functions: the CLI imports this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainscan import storage
from brainscan.labels import CLASSES

MODEL_FILE = "model.keras"
METADATA_FILE = "brainscan_model.json"


class BundleError(ValueError):
    """A URI that does not hold a usable model bundle (the message says what is missing)."""


@dataclass
class ModelBundle:
    model: Any  # a keras.Model
    image_size: int
    classes: tuple[str, ...]
    threshold: float | None  # P(tumor) at or above it -> tumor; None until evaluation calibrated one
    thresholds: dict[str, float] | None  # per modality ("ct", "mri"), or None
    metadata: dict = field(default_factory=dict)  # the whole brainscan_model.json
    uri: str = ""  # where it was loaded from
    local_dir: Path | None = None  # the local folder holding model.keras + brainscan_model.json

    def decision_threshold(self, default: float = 0.5) -> float:
        return float(self.threshold) if self.threshold is not None else default

    @property
    def preprocessing(self) -> dict:
        """The preprocess_batch / preprocess_image options this model was trained with (old bundles: none)."""
        from brainscan.preprocessing import preprocessing_options

        return preprocessing_options(self.metadata)

    def preprocess(self, images) -> np.ndarray:
        """Encoded image files -> this model's input, float32 [N, S, S, 3]: what training applied."""
        from brainscan.preprocessing import preprocess_batch

        return preprocess_batch(images, self.image_size, **self.preprocessing)


def cache_dir() -> Path:
    """Where S3 / MLflow bundles are downloaded (BRAINSCAN_CACHE or ~/.cache/brainscan)."""
    return Path(os.environ.get("BRAINSCAN_CACHE") or Path.home() / ".cache" / "brainscan") / "models"


def is_registry_uri(uri: str) -> bool:
    return str(uri).startswith("models:/")


def _find_bundle_dir(root: Path) -> Path:
    """The folder under root holding brainscan_model.json (MLflow nests it inside its artifacts)."""
    root = Path(root)
    if (root / METADATA_FILE).is_file():
        return root
    found = sorted(root.rglob(METADATA_FILE), key=lambda p: len(p.parts))
    if not found:
        raise BundleError(f"no {METADATA_FILE} under {root}: not a brainscan model bundle")
    return found[0].parent


def _fresh_cache_folder(uri: str) -> Path:
    # One folder per URI, emptied first: an alias may point to a new version since last time.
    folder = cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def fetch_bundle(uri: str, tracking_uri: str | None = None) -> Path:
    """A local folder holding the bundle at uri (downloading from S3 or MLflow if needed)."""
    uri = str(uri)
    if is_registry_uri(uri):
        import mlflow

        from brainscan.components.register import resolve_tracking_uri

        # The same store register() writes to: argument, $MLFLOW_TRACKING_URI, else the sqlite default.
        tracking_uri = resolve_tracking_uri(tracking_uri)
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        folder = _fresh_cache_folder(uri)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder))
        except Exception as err:  # MlflowException for unknown names / aliases / versions
            raise BundleError(f"cannot resolve {uri} in MLflow ({mlflow.get_tracking_uri()}): "
                              f"{str(err).splitlines()[0]}") from err
        return _find_bundle_dir(Path(local))
    if storage.is_s3(uri):
        if not storage.exists(storage.join(uri, METADATA_FILE)):
            raise BundleError(f"{uri}: no {METADATA_FILE} there: not a brainscan model bundle")
        folder = _fresh_cache_folder(uri)
        storage.download_dir(uri, folder)
        return folder
    path = Path(uri)
    if not path.exists():
        raise BundleError(f"{uri}: no such folder")
    return _find_bundle_dir(path)


def read_metadata(bundle_dir: str | Path) -> dict:
    path = Path(bundle_dir) / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable bundle metadata ({err})") from err
    if list(meta.get("classes", [])) != list(CLASSES):
        raise BundleError(f"{path}: classes {meta.get('classes')} differ from {list(CLASSES)}")
    if not isinstance(meta.get("image_size"), int) or meta["image_size"] < 1:
        raise BundleError(f"{path}: image_size missing or not a positive integer")
    return meta


def load_bundle(uri: str, tracking_uri: str | None = None) -> ModelBundle:
    """Load a bundle from a folder, ``s3://...``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    import keras

    bundle_dir = fetch_bundle(uri, tracking_uri)
    meta = read_metadata(bundle_dir)
    model_path = bundle_dir / MODEL_FILE
    if not model_path.is_file():
        raise BundleError(f"{uri}: no {MODEL_FILE} next to {METADATA_FILE}")
    model = keras.models.load_model(model_path, compile=False)
    threshold = meta.get("threshold")
    thresholds = meta.get("thresholds") or None
    return ModelBundle(
        model=model,
        image_size=int(meta["image_size"]),
        classes=tuple(meta["classes"]),
        threshold=None if threshold is None else float(threshold),
        thresholds=None if thresholds is None else {k: float(v) for k, v in thresholds.items()},
        metadata=meta,
        uri=str(uri),
        local_dir=bundle_dir,
    )


def write_bundle_dir(model, folder: str | Path, image_size: int, extra_metadata: dict | None = None,
                     threshold: float | None = None, thresholds: dict | None = None) -> Path:
    """Write model.keras + brainscan_model.json into a local folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / MODEL_FILE)
    meta = dict(extra_metadata or {})
    meta.update(classes=list(CLASSES), image_size=int(image_size),
                threshold=None if threshold is None else float(threshold),
                thresholds=None if thresholds is None else {k: float(v) for k, v in thresholds.items()})
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return folder


def save_bundle(model, out: str, image_size: int, extra_metadata: dict | None = None,
                threshold: float | None = None, thresholds: dict | None = None) -> str:
    """Save a Keras model as a bundle at out (folder or S3 prefix); returns out."""
    out = str(out)
    if not storage.is_s3(out):
        write_bundle_dir(model, out, image_size, extra_metadata, threshold, thresholds)
        return out
    with tempfile.TemporaryDirectory() as tmp:
        write_bundle_dir(model, tmp, image_size, extra_metadata, threshold, thresholds)
        storage.upload_dir(tmp, out)
    return out


def predict_probabilities(bundle: ModelBundle, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Softmax [N, 7] for preprocessed images float32 [N, S, S, 3]."""
    images = np.asarray(images, dtype=np.float32)
    expected = (bundle.image_size, bundle.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"expected preprocessed images of shape [N, {', '.join(map(str, expected))}], "
                         f"got {list(images.shape)}")
    if len(images) == 0:
        return np.zeros((0, len(CLASSES)), dtype=np.float32)
    # Direct calls, not model.predict: far less overhead for the small batches a server sees.
    parts = [np.asarray(bundle.model(images[i:i + batch_size], training=False), dtype=np.float32)
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts, axis=0)
