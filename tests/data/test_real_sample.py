"""The whole data chain on the real Kaggle sample: ingest -> validate -> split on a real SeaweedFS.

Reads the sample's folder from BRAINSCAN_REAL_DATA (CI sets it); skipped where it is absent.
"""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from brainscan import storage
from components.split import SPLITS, split
from components.validate import validate
from brainscan.labels import CLASSES

pytestmark = pytest.mark.realdata


def test_real_sample_chain(real_sample_dir, s3_prefix, tmp_path):
    ingest_module = pytest.importorskip("components.ingest", reason="components/ingest.py not built yet")
    ingest_module.ingest(str(real_sample_dir), s3_prefix)  # the unpacked archive, as a user points at it
    manifest = pd.read_csv(io.StringIO(storage.read_text(storage.join(s3_prefix, "manifest.csv"))))
    assert set(manifest["class7"]) == set(CLASSES)

    result = validate(s3_prefix, str(tmp_path / "report"))
    assert result.success, result.failure_message()
    assert result.corrupt == []

    out = storage.join(s3_prefix, "splits")
    split_result = split(s3_prefix, out, seed=42)
    splits = {name: pd.read_csv(io.StringIO(storage.read_text(storage.join(out, f"{name}.csv")))) for name in SPLITS}
    for name, df in splits.items():
        assert set(df["class7"]) == set(CLASSES), f"{name} lacks a class"
    # zero duplicates across splits, exact (sha256) and near (group)
    for column in ("sha256", "group"):
        owners: dict[str, str] = {}
        for name, df in splits.items():
            for value in df[column].astype(str):
                assert owners.setdefault(value, name) == name, f"{column} {value} in {owners[value]} and {name}"
    assert sum(len(df) for df in splits.values()) == len(manifest)
    report = json.loads(storage.read_text(storage.join(out, "split_report.json")))
    # the real sample holds a few exact and near duplicates; they must have been found and grouped
    assert report["exact_duplicates"] >= 1 and report["duplicate_groups"] >= report["exact_duplicates"]
    print(f"real sample: {split_result.counts}, {split_result.exact_duplicates} exact and "
          f"{split_result.near_duplicates} near duplicates in {split_result.duplicate_groups} groups, "
          f"{split_result.mixed_class_groups} groups mixing classes")


def test_real_sample_validate_and_split_local(real_sample_dir, tmp_path):
    """validate and split alone on the real files (a manifest built here, local paths): real quirks, no S3."""
    from tests.fixtures.data import build_manifest

    manifest = build_manifest(real_sample_dir / "Dataset", tmp_path / "data")
    result = validate(str(tmp_path / "data"), str(tmp_path / "report"))
    assert result.success, result.failure_message()
    split_result = split(str(tmp_path / "data"), str(tmp_path / "splits"), seed=42)
    assert split_result.cross_split_duplicates == 0
    splits = {name: pd.read_csv(tmp_path / "splits" / f"{name}.csv") for name in SPLITS}
    assert all(set(df["class7"]) == set(CLASSES) for df in splits.values())
    owners = {}
    for name, df in splits.items():
        for group in df["group"]:
            assert owners.setdefault(group, name) == name
    assert sum(len(df) for df in splits.values()) == len(manifest)
