"""The model bundle format: a folder with `model.keras` and `brainscan_model.json`.

- model.keras: the Keras model, input float32 [N, S, S, 3] already preprocessed
  (brainscan.preprocessing), output softmax [N, 7] in brainscan.labels.CLASSES order. Saved
  without optimizer state: serving needs the weights only (the state is twice their size).
- brainscan_model.json: classes, image_size, the decision thresholds (null until evaluation
  calibrated them; see brainscan.decision) and whatever the trainer records.
- model.onnx (registered bundles): the same model for ONNX Runtime, converted and checked
  against model.keras (within ONNX_TOLERANCE) once, at registration (brainscan.onnx_export).
- brainscan_model.sha256 (registered bundles): `digest()` of every other file, written at
  registration (and kept as the version's tag); `check_digest` refuses a bundle whose files
  changed since. A bundle without one (not registered, or registered before) loads unchecked.

Where bundles live (S3, the MLflow registry) is brainscan.modelstore's business; this module
only reads and writes a local folder, so it ships inside the registered MLflow model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from brainscan.labels import CLASSES

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "brainscan_model.json"
ONNX_FILE = "model.onnx"
DIGEST_FILE = "brainscan_model.sha256"
ONNX_TOLERANCE = 1e-5  # largest |softmax difference| from model.keras that another runtime may have


class BundleError(ValueError):
    """A folder or URI that does not hold a usable model bundle (the message says what is missing)."""


class BundleIntegrityError(BundleError):
    """A bundle whose files are not the ones recorded at registration: never loaded."""


def digest(bundle_dir: str | Path) -> str:
    """sha256 (hex) of a bundle folder: every file but DIGEST_FILE, in sorted relative-path order,
    each as its path, its size and its bytes (streamed: the weights are never in memory at once)."""
    root = Path(bundle_dir)
    files = sorted((path.relative_to(root).as_posix(), path) for path in root.rglob("*") if path.is_file())
    total = hashlib.sha256()
    for relative, path in files:
        if relative == DIGEST_FILE:
            continue
        total.update(f"{relative}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                total.update(block)
    return total.hexdigest()


def write_digest(bundle_dir: str | Path) -> str:
    """Record the folder's digest in DIGEST_FILE (at registration, once every other file is written)."""
    value = digest(bundle_dir)
    (Path(bundle_dir) / DIGEST_FILE).write_text(value + "\n")
    return value


def recorded_digest(bundle_dir: str | Path) -> str | None:
    path = Path(bundle_dir) / DIGEST_FILE
    return path.read_text().strip() if path.is_file() else None


def check_digest(bundle_dir: str | Path, expected: str | None = None, where: str = "") -> str | None:
    """The folder's digest when it equals `expected` (the registry's record) or, without one, the
    folder's own DIGEST_FILE; None (and a warning) when neither exists. BundleIntegrityError, with
    both digests, when the files differ from the record."""
    where = where or str(bundle_dir)
    expected = expected or recorded_digest(bundle_dir)
    if not expected:
        log.warning("%s: no recorded sha256 (bundles get one at registration): its files are not checked", where)
        return None
    found = digest(bundle_dir)
    if found != expected:
        raise BundleIntegrityError(
            f"{where}: refusing to load: the bundle's files changed since registration "
            f"(sha256 expected {expected}, found {found})")
    return found


def find_bundle_dir(root: str | Path) -> Path:
    """The folder under root holding brainscan_model.json (MLflow nests it inside its artifacts)."""
    root = Path(root)
    if (root / METADATA_FILE).is_file():
        return root
    found = sorted(root.rglob(METADATA_FILE), key=lambda p: len(p.parts))
    if not found:
        raise BundleError(f"no {METADATA_FILE} under {root}: not a brainscan model bundle")
    return found[0].parent


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


def write_metadata(bundle_dir: str | Path, meta: dict) -> Path:
    path = Path(bundle_dir) / METADATA_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return path


def load_model(bundle_dir: str | Path):
    """The bundle's Keras model (not compiled: inference only)."""
    import keras  # TensorFlow's import costs seconds; modules that only read metadata skip it

    path = Path(bundle_dir) / MODEL_FILE
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MODEL_FILE} next to {METADATA_FILE}")
    return keras.models.load_model(path, compile=False)


def save_model(model, bundle_dir: str | Path) -> Path:
    """model.keras without optimizer state: an uncompiled copy, built from the model's config, holding
    the same weights. (keras.models.clone_model is no way out: Keras 3 compiles the clone like the
    original, and the new optimizer's variables are saved with it: 251 MB instead of 84 MB for a
    71 px Xception trained with Adam.)"""
    if getattr(model, "optimizer", None) is not None:
        copy = type(model).from_config(model.get_config())
        copy.set_weights(model.get_weights())
        model = copy
    path = Path(bundle_dir) / MODEL_FILE
    model.save(path)
    return path


def write_bundle_dir(model, folder: str | Path, image_size: int, extra_metadata: dict | None = None,
                     threshold: float | None = None, thresholds: dict | None = None) -> Path:
    """Write model.keras + brainscan_model.json into a local folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder)
    meta = dict(extra_metadata or {})
    meta.update(classes=list(CLASSES), image_size=int(image_size),
                threshold=None if threshold is None else float(threshold),
                thresholds=None if thresholds is None else {k: float(v) for k, v in thresholds.items()})
    write_metadata(folder, meta)
    return folder


def predict_probabilities(model, images: np.ndarray, image_size: int, batch_size: int = 32) -> np.ndarray:
    """Softmax float32 [N, 7] for preprocessed images float32 [N, S, S, 3]."""
    images = np.asarray(images, dtype=np.float32)
    expected = (image_size, image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"expected preprocessed images of shape [N, {', '.join(map(str, expected))}], "
                         f"got {list(images.shape)}")
    if len(images) == 0:
        return np.zeros((0, len(CLASSES)), dtype=np.float32)
    # Direct calls, not model.predict: far less overhead for the small batches a server sees.
    parts = [np.asarray(model(images[i:i + batch_size], training=False), dtype=np.float32)
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts, axis=0)
