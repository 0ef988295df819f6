"""The synthetic archive: the Kaggle layout and quirks, determinism, classes that differ."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brainscan.local import synth
from cli import app
from brainscan.labels import CLASSES, label_from_path


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_layout_labels_and_quirks(synthetic_archive):
    root = Path(synthetic_archive.out_dir)
    files = _files(root)
    assert len(files) == synthetic_archive.files == 7 * 30
    classes = Counter(label_from_path(p.relative_to(root).as_posix())[1] for p in files)
    assert classes == {c: 30 for c in CLASSES}
    assert {p.relative_to(root).parts[1] for p in files} == {synth.CT_FOLDER, synth.MRI_FOLDER}

    formats, modes, sizes, misnamed = Counter(), Counter(), set(), 0
    for path in files:
        with Image.open(path) as image:
            image.load()
            formats[image.format] += 1
            modes[image.mode] += 1
            sizes.add(image.size)
            misnamed += path.suffix == ".jpg" and image.format == "PNG"
            assert synth.MIN_SIDE <= min(image.size) and max(image.size) <= synth.MAX_SIDE
    assert formats["JPEG"] > 0 and formats["PNG"] > 0
    assert misnamed > 0, "some .jpg files must really be PNG, as in the archive"
    assert modes["L"] > 0 and modes["RGB"] > 0
    assert len(sizes) > 20


def test_exact_duplicates_are_planted(synthetic_archive):
    root = Path(synthetic_archive.out_dir)
    by_hash = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(root))
    extra_copies = sum(n - 1 for n in by_hash.values())
    assert extra_copies == len(synthetic_archive.duplicates) >= 7
    for copy, original in synthetic_archive.duplicates:
        assert (root / copy).read_bytes() == (root / original).read_bytes()
        assert label_from_path(copy) == label_from_path(original)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synth.generate(tmp_path / "a", per_class=3, seed=7)
    b = synth.generate(tmp_path / "b", per_class=3, seed=7)
    c = synth.generate(tmp_path / "c", per_class=3, seed=8)
    rel = [p.relative_to(tmp_path / "a") for p in _files(tmp_path / "a")]
    assert a.files == b.files == 21
    assert all((tmp_path / "a" / r).read_bytes() == (tmp_path / "b" / r).read_bytes() for r in rel)
    assert any(not (tmp_path / "c" / r).exists() or (tmp_path / "a" / r).read_bytes() != (tmp_path / "c" / r).read_bytes()
               for r in rel)


def _mean_image(root: Path, class7: str, n: int = 30, size: int = 64) -> np.ndarray:
    paths = [p for p in _files(root) if label_from_path(p.relative_to(root).as_posix())[1] == class7][:n]
    stack = [np.asarray(Image.open(p).convert("L").resize((size, size)), dtype=np.float32) / 255 for p in paths]
    return np.mean(stack, axis=0)


def test_classes_differ_where_the_design_says(synthetic_archive):
    """Cheap proxies for "learnable": where the tumors sit on average, and CT vs MRI texture."""
    root = Path(synthetic_archive.out_dir)
    means = {c: _mean_image(root, c) for c in CLASSES}
    # pituitary: brighter than healthy MRI at the centre-bottom
    bottom = (slice(40, 50), slice(26, 38))
    assert means["mri_pituitary"][bottom].mean() > means["mri_healthy"][bottom].mean() + 0.1
    # meningioma: brighter at the top edge (where it sits against the skull) than healthy
    top_band = (slice(4, 20), slice(8, 56))
    assert means["mri_meningioma"][top_band].mean() > means["mri_healthy"][top_band].mean() + 0.03
    # glioma: brighter in the hemispheres than healthy
    hemispheres = (slice(16, 48), np.r_[8:24, 40:56])
    assert means["mri_glioma"][hemispheres].mean() > means["mri_healthy"][hemispheres].mean() + 0.03
    # CT tumor: more bright pixels inside the brain than CT healthy
    def bright_brain_fraction(class7: str) -> float:
        paths = [p for p in _files(root) if label_from_path(p.relative_to(root).as_posix())[1] == class7]
        fractions = []
        for p in paths:
            a = np.asarray(Image.open(p).convert("L").resize((64, 64)), dtype=np.float32) / 255
            fractions.append((a[16:48, 16:48] > 0.6).mean())
        return float(np.mean(fractions))
    assert bright_brain_fraction("ct_tumor") > bright_brain_fraction("ct_healthy") + 0.02


def test_bad_per_class():
    with pytest.raises(ValueError, match="per_class"):
        synth.generate("/nonexistent-never-written", per_class=0)


def test_cli_synth_json(tmp_path):
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "s"), "--per-class", "2",
                                      "--seed", "3", "--preview", str(tmp_path / "p.png"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["files"] == 14 and set(summary["per_class"]) == set(CLASSES)
    assert Image.open(tmp_path / "p.png").size[1] == 7 * 128
    assert (tmp_path / "s" / "Dataset" / synth.CT_FOLDER / "Healthy" / "ct_healthy (1).jpg").exists()
