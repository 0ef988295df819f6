"""validate and split against a real SeaweedFS on loopback: S3 manifests, S3 images, S3 reports."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from brainscan import storage
from components.split import SPLITS, split
from components.validate import validate
from tests.fixtures.data import build_manifest


def _assert_clean_split(out: str, manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    splits = {name: pd.read_csv(io.StringIO(storage.read_text(storage.join(out, f"{name}.csv")))) for name in SPLITS}
    seen: dict[str, str] = {}
    for name, df in splits.items():
        for digest in df["sha256"]:
            assert seen.setdefault(digest, name) == name, f"sha256 {digest} in {seen[digest]} and {name}"
    decodable = manifest["decodable"].astype(str).str.lower().eq("true").sum()
    assert sum(len(df) for df in splits.values()) == decodable
    return splits


def test_validate_and_split_read_and_write_s3(synthetic_archive, s3_prefix):
    """Images and manifest in S3 (uploaded here, without ingest): both steps work on s3:// URIs."""
    root = Path(synthetic_archive.out_dir)
    storage.upload_dir(root, storage.join(s3_prefix, "images"))
    manifest = build_manifest(root)
    manifest["path"] = [storage.join(s3_prefix, "images", Path(p).relative_to(root).as_posix())
                        for p in manifest["path"]]
    storage.write_text(storage.join(s3_prefix, "manifest.csv"), manifest.to_csv(index=False))

    report = storage.join(s3_prefix, "reports")
    result = validate(s3_prefix, report)
    assert result.success, result.failure_message()
    assert storage.read_json(storage.join(report, "validation.json"))["success"] is True
    assert "PASSED" in storage.read_text(storage.join(report, "validation.html"))

    out = storage.join(s3_prefix, "splits")
    split_result = split(s3_prefix, out, seed=3)
    _assert_clean_split(out, manifest)
    assert split_result.exact_duplicates == len(synthetic_archive.duplicates)
    assert storage.read_json(storage.join(out, "split_report.json"))["cross_split_duplicates"] == 0


def test_ingest_validate_split_chain(synthetic_archive, s3_prefix):
    """The real chain: ingest the synthetic archive into SeaweedFS, validate it, split it."""
    ingest_module = pytest.importorskip("components.ingest", reason="components/ingest.py not built yet")
    ingest_module.ingest(synthetic_archive.out_dir, s3_prefix)
    manifest = pd.read_csv(io.StringIO(storage.read_text(storage.join(s3_prefix, "manifest.csv"))))
    assert len(manifest) == synthetic_archive.files

    result = validate(s3_prefix, storage.join(s3_prefix, "reports"))
    assert result.success, result.failure_message()
    assert result.summary()["duplicates"] == len(synthetic_archive.duplicates)

    out = storage.join(s3_prefix, "splits")
    split(s3_prefix, out, seed=42)
    splits = _assert_clean_split(out, manifest)
    assert all(df["path"].str.startswith("s3://").all() for df in splits.values())
    report = json.loads(storage.read_text(storage.join(out, "split_report.json")))
    assert report["cross_split_duplicates"] == 0
