"""Where a pipeline run keeps its data in the object store: every URI of that layout is built here.

    s3://{bucket}/{prefix}/dataset/<fingerprint>/...                         one data version: images/, ingest.json, manifest.csv
    s3://{bucket}/{prefix}/dataset/<fingerprint>/validation/<settings>/...   its validation report, per validation settings
    s3://{bucket}/{prefix}/dataset/<fingerprint>/splits/seed<s>-val<v>-test<t>/...  a split of it (a pure function of data and seed)
    s3://{bucket}/{prefix}/runs/<run id>/model/...                           the model bundle one run trained
    s3://{bucket}/{prefix}/runs/<run id>/evaluation/...                      its evaluation report, plots and explanations

A data version is named by its content (the dataset fingerprint) and written once: ingest never
replaces bytes under it and writes its manifest last, so a version without manifest.csv is an
unfinished ingest that nothing reads. Everything derived from a version (validation, splits) lives
under it, keyed by what else it depends on, so a cached step's output URI always holds what that
step wrote. What lies inside each folder is its step's business (brainscan.dataset, brainscan.bundle,
brainscan.evaluation_report). Standard library only: the KFP component bodies import it in the step's
container.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Mapping

FINGERPRINT_CHARS = 16  # of a settings digest in a folder name: unique enough, still readable

# One part of a bucket prefix: no empty, `.` or `..` part, no leading `/`, no characters that S3 or a
# local folder would read otherwise.
_PREFIX_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_BUCKET = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")  # S3's bucket characters
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def check_location(bucket: str, prefix: str) -> None:
    """ValueError unless `bucket` is an S3 bucket name and `prefix` a relative path of plain parts
    (`a/b`: no `..`, no empty part, no leading `/`). The one check of both, for config, CLI and pipeline."""
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"bucket {bucket!r} is not an S3 bucket name (up to 63 lowercase letters, digits, '.', '-')")
    parts = str(prefix).split("/")
    bad = [part for part in parts if not _PREFIX_PART.fullmatch(part)]
    if not prefix or bad:
        raise ValueError(f"prefix {prefix!r} must be parts of letters, digits, '.', '_', '-' joined by '/' "
                         "(no '..', no empty part, no leading or trailing '/')")


def folder_of(uri: str) -> str:
    """The folder (URI prefix) holding an object or a folder."""
    return str(uri).rsplit("/", 1)[0]


def _run_root(bucket: str, prefix: str) -> str:
    check_location(bucket, prefix)
    return f"s3://{bucket}/{prefix}"


def datasets_uri(bucket: str, prefix: str) -> str:
    """The folder of every data version ingested under bucket/prefix."""
    return f"{_run_root(bucket, prefix)}/dataset"


def version_uri(datasets: str, fingerprint: str) -> str:
    """One data version inside a datasets folder: named by its fingerprint (the sha256 of its content)."""
    if not _FINGERPRINT.fullmatch(str(fingerprint)):
        raise ValueError(f"a data version is named by a dataset fingerprint (64 hex digits), got {fingerprint!r}")
    return f"{str(datasets).rstrip('/')}/{fingerprint}"


def dataset_uri(bucket: str, prefix: str, fingerprint: str) -> str:
    """Ingest's copy of the source with this fingerprint: images, ingest.json, manifest.csv (last)."""
    return version_uri(datasets_uri(bucket, prefix), fingerprint)


def settings_digest(settings: Mapping) -> str:
    """A short, stable name for a set of settings (sorted JSON, sha256)."""
    text = json.dumps(dict(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


def validation_uri(data_uri: str, settings: Mapping) -> str:
    """The validation report of a data version under these validation settings, inside the version."""
    return f"{data_uri.rstrip('/')}/validation/{settings_digest(settings)}"


def splits_uri(data_uri: str, seed: int, val: float, test: float) -> str:
    """The split of a data version with one seed and fractions, inside the version: the same inputs, the
    same folder."""
    return f"{data_uri.rstrip('/')}/splits/seed{int(seed)}-val{float(val):g}-test{float(test):g}"


def model_uri(bucket: str, prefix: str, run_id: str) -> str:
    """The model bundle a pipeline run trains."""
    return f"{_run_root(bucket, prefix)}/runs/{run_id}/model"


def evaluation_uri(model_uri: str) -> str:
    """The evaluation of a run's model: beside the bundle, in the same run folder."""
    return f"{folder_of(model_uri)}/evaluation"
