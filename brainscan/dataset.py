"""The dataset's tables: ingest's manifest, split's train/val/test lists, and the dataset fingerprint.

    {data}/manifest.csv      written by ingest: one row per image (MANIFEST_COLUMNS)
    {data}/ingest.json       ingest's summary, with the fingerprint
    {splits}/{train,val,test}.csv, split_report.json    written by split

The fingerprint is the sha256 of the sorted `sha256,class7` lines of the images: it changes
exactly when an image or a label changes. Ingest records it, the model carries it as a tag,
and retraining compares the two.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import pandas as pd

from brainscan import storage
from brainscan.labels import CLASSES
from brainscan.layout import folder_of

MANIFEST_COLUMNS = ("path", "sha256", "bytes", "modality", "class7", "tumor", "width", "height", "mode",
                    "format", "decodable")
SPLITS = ("train", "val", "test")


def fingerprint_of(rows: Iterable[Mapping]) -> str:
    """sha256 of the sorted `sha256,class7` lines: changes exactly when data or labels change."""
    lines = sorted(f"{row['sha256']},{row['class7']}" for row in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_manifest(data: str, required: tuple[str, ...] = ("path", "sha256", "class7")) -> pd.DataFrame:
    """{data}/manifest.csv as ingest wrote it, with the required columns checked."""
    uri = storage.join(data, "manifest.csv")
    if not storage.exists(uri):
        raise FileNotFoundError(f"no manifest at {uri}; run `brainscan ingest` first")
    manifest = pd.read_csv(storage.open_text(uri), dtype={"sha256": str, "path": str})
    missing = [c for c in required if c not in manifest.columns]
    if missing:
        raise ValueError(f"{uri} lacks column(s) {', '.join(missing)}")
    return manifest


def read_split(splits: str, name: str, required: tuple[str, ...] = ("path", "class7")) -> pd.DataFrame:
    """{splits}/{name}.csv as written by `split`, checked: the required columns, known classes, not empty."""
    uri = storage.join(splits, f"{name}.csv")
    if not storage.exists(uri):
        raise FileNotFoundError(f"no split manifest at {uri}; is {splits} the output of `brainscan split`?")
    frame = pd.read_csv(storage.open_text(uri), dtype={"path": str, "class7": str, "sha256": str})
    missing = sorted(set(required) - set(frame.columns))
    if missing:
        raise ValueError(f"{uri}: missing columns {missing}")
    unknown = sorted(set(frame["class7"]) - set(CLASSES))
    if unknown:
        raise ValueError(f"{uri}: unknown classes {unknown}; expected {', '.join(CLASSES)}")
    if frame.empty:
        raise ValueError(f"{uri}: no images")
    return frame.reset_index(drop=True)


def splits_data_uri(splits: str) -> str | None:
    """The data (a data version, brainscan.layout) a split came from: the folder of the manifest its
    report names; None without a report. A model's lineage records it."""
    report = storage.join(splits, "split_report.json")
    manifest = storage.read_json(report).get("manifest") if storage.exists(report) else None
    return folder_of(manifest) if manifest else None


def splits_fingerprint(splits: str) -> str | None:
    """The fingerprint of the data a split came from: ingest's, when the split report leads to its
    manifest; else computed from the split lists' rows; None when neither can be read."""
    data = splits_data_uri(splits)
    if data:
        ingest = storage.join(data, "ingest.json")
        value = storage.read_json(ingest).get("fingerprint") if storage.exists(ingest) else None
        if value:
            return value
    try:
        rows = pd.concat([read_split(splits, name) for name in SPLITS])
    except (FileNotFoundError, ValueError):
        return None
    if "sha256" not in rows.columns:
        return None
    return fingerprint_of(rows[["sha256", "class7"]].to_dict("records"))
