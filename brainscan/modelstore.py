"""Where model bundles live: a local folder, an S3 prefix, or the MLflow registry (`models:/`).

`load_bundle(uri)` fetches a bundle (brainscan.bundle's format) to a local folder when needed,
checks its files against the sha256 recorded at registration (for `models:/` the version's tag
in the registry, else the bundle's own record) and loads it: the Keras model, its image size
and its decision policy. `save_bundle` writes one to a folder or an S3 prefix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainscan import bundle as bundle_format
from brainscan import registry, storage
from brainscan.bundle import METADATA_FILE, BundleError, BundleIntegrityError, read_metadata  # noqa: F401 - re-exported
from brainscan.limits import MAX_IMAGE_PIXELS
from brainscan.decision import DecisionPolicy
from brainscan.preprocessing import preprocess_batch, preprocessing_options


@dataclass
class ModelBundle:
    model: Any  # a keras.Model
    image_size: int
    classes: tuple[str, ...]
    threshold: float | None  # pooled P(tumor) threshold; None until evaluation calibrated one
    thresholds: dict[str, float] | None  # per modality ("ct", "mri"), or None
    metadata: dict = field(default_factory=dict)  # the whole brainscan_model.json
    uri: str = ""  # where it was loaded from
    local_dir: Path | None = None  # the local folder holding model.keras + brainscan_model.json

    def policy(self, override: float | None = None) -> DecisionPolicy:
        """The decision policy of this model (ValueError when it was never calibrated and no override)."""
        return DecisionPolicy.from_metadata(self.metadata, override)

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Softmax [N, 7] of preprocessed images [N, S, S, 3]."""
        return bundle_format.predict_probabilities(self.model, images, self.image_size, batch_size)

    @property
    def preprocessing(self) -> dict:
        """The preprocess_batch / preprocess_image options this model was trained with (old bundles: none)."""
        return preprocessing_options(self.metadata)

    def preprocess(self, images, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """Encoded image files -> this model's input, float32 [N, S, S, 3]: what training applied."""
        return preprocess_batch(images, self.image_size, max_pixels, **self.preprocessing)


def cache_dir() -> Path:
    """Where S3 / MLflow bundles are downloaded (BRAINSCAN_CACHE or ~/.cache/brainscan)."""
    return Path(os.environ.get("BRAINSCAN_CACHE") or Path.home() / ".cache" / "brainscan") / "models"


def is_registry_uri(uri: str) -> bool:
    return str(uri).startswith("models:/")


def _cache_folder(uri: str) -> Path:
    return cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]


def fetch_bundle(uri: str, tracking_uri: str | None = None) -> Path:
    """A local folder holding the bundle at uri (downloading from S3 or MLflow if needed)."""
    return _fetch(uri, tracking_uri)[0]


def fetch_checked_bundle(uri: str, tracking_uri: str | None = None) -> Path:
    """fetch_bundle, then brainscan.bundle.check_digest against the registry's record of the version
    (`models:/`) or the bundle's own: BundleIntegrityError when its files changed since registration."""
    folder, expected = _fetch(uri, tracking_uri)
    bundle_format.check_digest(folder, expected, where=str(uri))
    return folder


def _fetch(uri: str, tracking_uri: str | None = None) -> tuple[Path, str | None]:
    """(the local bundle folder, the digest the registry recorded for it; None outside the registry)."""
    uri = str(uri)
    if is_registry_uri(uri):
        try:
            local, tags = registry.download_version(uri, _cache_folder(uri), tracking_uri)
        except registry.RegistryError as err:
            raise BundleError(str(err)) from err
        return bundle_format.find_bundle_dir(local), tags.get(registry.DIGEST_TAG) or None
    if storage.is_s3(uri):
        if not storage.exists(storage.join(uri, METADATA_FILE)):
            raise BundleError(f"{uri}: no {METADATA_FILE} there: not a brainscan model bundle")
        folder = _cache_folder(uri)
        if folder.exists():
            shutil.rmtree(folder)  # the prefix may hold a newer bundle since last time
        storage.download_dir(uri, folder)
        return folder, None
    path = Path(uri)
    if not path.exists():
        raise BundleError(f"{uri}: no such folder")
    return bundle_format.find_bundle_dir(path), None


def load_bundle(uri: str, tracking_uri: str | None = None) -> ModelBundle:
    """Load a bundle from a folder, ``s3://...``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``;
    BundleIntegrityError (nothing loaded) when its files are not those recorded at registration."""
    bundle_dir = fetch_checked_bundle(uri, tracking_uri)
    meta = read_metadata(bundle_dir)
    model = bundle_format.load_model(bundle_dir)
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


def save_bundle(model, out: str, image_size: int, extra_metadata: dict | None = None,
                threshold: float | None = None, thresholds: dict | None = None) -> str:
    """Save a Keras model as a bundle at out (folder or S3 prefix); returns out."""
    out = str(out)
    if not storage.is_s3(out):
        bundle_format.write_bundle_dir(model, out, image_size, extra_metadata, threshold, thresholds)
        return out
    with tempfile.TemporaryDirectory() as tmp:
        bundle_format.write_bundle_dir(model, tmp, image_size, extra_metadata, threshold, thresholds)
        storage.upload_dir(tmp, out)
    return out

