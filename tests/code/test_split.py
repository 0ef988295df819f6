"""Split: stratified, deterministic, and duplicates (exact and near) never cross splits."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from cli import app
from components.split import SPLITS, group_duplicates, split
from brainscan.labels import CLASSES
from tests.fixtures.data import build_manifest


def _plant_near_duplicates(archive: Path) -> list[tuple[Path, Path]]:
    """Re-encoded, resized and brightened copies of a few images, filed under new numbers."""
    planted = []
    tumor = archive / "Dataset" / "Brain Tumor MRI images" / "Tumor"
    ct = archive / "Dataset" / "Brain Tumor CT scan Images"
    cases = [
        (tumor / "glioma (1).jpg", tumor / "glioma (101).jpg", "resize"),
        (tumor / "meningioma (2).jpg", tumor / "meningioma (102).png", "reencode"),
        (ct / "Healthy" / "ct_healthy (4).jpg", ct / "Healthy" / "ct_healthy (104).jpg", "brighten"),
        (ct / "Tumor" / "ct_tumor (6).jpg", ct / "Tumor" / "ct_tumor (106).jpg", "resize"),
        (tumor / "pituitary (8).jpg", tumor / "pituitary (108).jpg", "reencode"),
    ]
    for original, copy, how in cases:
        image = Image.open(original)
        if how == "resize":
            image = image.resize((int(image.width * 0.75), int(image.height * 0.75)))
        elif how == "brighten":
            image = ImageEnhance.Brightness(image).enhance(1.08)
        buf = io.BytesIO()
        if copy.suffix == ".png":
            image.save(buf, format="PNG")
        else:
            image.convert("RGB").save(buf, format="JPEG", quality=70)
        copy.write_bytes(buf.getvalue())
        planted.append((original, copy))
    return planted


@pytest.fixture(scope="module")
def planted(synthetic_archive, tmp_path_factory):
    """The synthetic archive plus planted near duplicates and one corrupt file, with its manifest."""
    root = tmp_path_factory.mktemp("split_data")
    archive = root / "archive"
    shutil.copytree(synthetic_archive.out_dir, archive)
    pairs = _plant_near_duplicates(archive)
    corrupt = archive / "Dataset" / "Brain Tumor MRI images" / "Healthy" / "mri_healthy (200).jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    build_manifest(archive, root / "data")
    exact = [(archive / c, archive / o) for c, o in synthetic_archive.duplicates]
    return {"data": root / "data", "near": pairs, "exact": exact, "corrupt": corrupt}


def _read_splits(out: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(out / f"{name}.csv") for name in SPLITS}


def _split_of(splits: dict[str, pd.DataFrame]) -> dict[str, str]:
    return {path: name for name, df in splits.items() for path in df["path"]}


def test_duplicates_never_cross_splits(planted, tmp_path):
    result = split(str(planted["data"]), str(tmp_path / "out"), seed=42)
    splits = _read_splits(tmp_path / "out")
    where = _split_of(splits)
    for copy, original in planted["exact"] + planted["near"]:
        assert where[str(copy)] == where[str(original)], (copy, original)
    # no sha256 and no group in two splits
    for column in ("sha256", "group"):
        sets = [set(df[column]) for df in splits.values()]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), column
    assert result.cross_split_duplicates == 0
    assert result.exact_duplicates == len(planted["exact"])
    assert result.near_duplicates >= len(planted["near"])
    # near-duplicate matching must not glue unrelated phantoms together
    assert result.near_duplicates <= len(planted["near"]) + 3


def test_stratified_and_undecodable_left_out(planted, tmp_path):
    result = split(str(planted["data"]), str(tmp_path / "out"), val=0.2, test=0.2, seed=1)
    splits = _read_splits(tmp_path / "out")
    assert str(planted["corrupt"]) not in _split_of(splits)
    assert result.excluded == [str(planted["corrupt"])]
    total = sum(result.counts.values())
    manifest = pd.read_csv(planted["data"] / "manifest.csv")
    assert total == len(manifest) - 1
    for name, fraction in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        df = splits[name]
        assert set(df["class7"]) == set(CLASSES), name
        assert abs(len(df) / total - fraction) < 0.05, (name, len(df))
        per_class = df["class7"].value_counts()
        class_totals = manifest[manifest["path"] != str(planted["corrupt"])]["class7"].value_counts()
        for class7 in CLASSES:  # every class near its share in every split
            assert abs(per_class[class7] - fraction * class_totals[class7]) <= 3, (name, class7)
    assert list(splits["train"].columns) == list(manifest.columns) + ["group"]
    report = json.loads((tmp_path / "out" / "split_report.json").read_text())
    assert report["counts"] == result.counts and report["excluded"] == [str(planted["corrupt"])]
    assert len(report["duplicate_group_members"]) == result.duplicate_groups


def test_deterministic_for_a_seed(planted, tmp_path):
    split(str(planted["data"]), str(tmp_path / "a"), seed=7)
    split(str(planted["data"]), str(tmp_path / "b"), seed=7)
    split(str(planted["data"]), str(tmp_path / "c"), seed=8)
    for name in SPLITS:
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()
    assert (tmp_path / "a" / "test.csv").read_bytes() != (tmp_path / "c" / "test.csv").read_bytes()


def test_group_duplicates_union_find():
    a = np.array([0, 0, 0, 0], dtype=np.uint64)
    b = np.array([0b111, 0, 0, 0], dtype=np.uint64)  # 3 bits from a
    c = np.array([2**64 - 1] * 4, dtype=np.uint64)  # far from both
    # rows: 0=a, 1=b (near a), 2=c, 3=same bytes as 2, 4=undecodable but same bytes as 0
    groups, exact, near = group_duplicates(["x", "y", "z", "z", "x"], [a, b, c, c, None], max_distance=3)
    assert groups[0] == groups[1] == groups[4]
    assert groups[2] == groups[3] != groups[0]
    assert (exact, near) == (2, 1)
    groups, _, near = group_duplicates(["x", "y"], [a, b], max_distance=2)
    assert groups[0] != groups[1] and near == 0


def test_bad_input(planted, tmp_path):
    with pytest.raises(ValueError, match="val .* and test"):
        split(str(planted["data"]), str(tmp_path / "o"), val=0.6, test=0.5)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        split(str(tmp_path / "missing"), str(tmp_path / "o"))
    bad = pd.read_csv(planted["data"] / "manifest.csv")
    bad.loc[0, "class7"] = "mri_unknown"
    (tmp_path / "bad").mkdir()
    bad.to_csv(tmp_path / "bad" / "manifest.csv", index=False)
    with pytest.raises(ValueError, match="unknown class"):
        split(str(tmp_path / "bad"), str(tmp_path / "o"))
    cli = CliRunner().invoke(app, ["split", "--data", str(tmp_path / "bad"), "--out", str(tmp_path / "o")])
    assert cli.exit_code == 1 and "unknown class" in cli.stderr


def test_cli_split_json(planted, tmp_path):
    cli = CliRunner().invoke(app, ["split", "--data", str(planted["data"]), "--out", str(tmp_path / "o"),
                                   "--val", "0.1", "--test", "0.2", "--seed", "3", "--json"])
    assert cli.exit_code == 0, cli.output
    summary = json.loads(cli.stdout.strip().splitlines()[-1])
    assert summary["cross_split_duplicates"] == 0 and summary["excluded"] == 1
    assert sum(summary["counts"].values()) == len(pd.read_csv(planted["data"] / "manifest.csv")) - 1
