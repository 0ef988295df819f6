"""The label schema: classes from the archive's folders and file names, nothing guessed."""

from __future__ import annotations

import numpy as np
import pytest

from brainscan.decision import tumor_probability
from brainscan.labels import CLASSES, UnknownLabelError, is_tumor, label_from_path

CT = "Dataset/Brain Tumor CT scan Images"
MRI = "Dataset/Brain Tumor MRI images"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"{CT}/Healthy/ct_healthy (1032).jpg", ("ct", "ct_healthy")),
        (f"{CT}/Tumor/ct_tumor (7).png", ("ct", "ct_tumor")),
        (f"{MRI}/Healthy/mri_healthy (3).jpeg", ("mri", "mri_healthy")),
        (f"{MRI}/Tumor/glioma (12).jpg", ("mri", "mri_glioma")),
        (f"{MRI}/Tumor/meningioma (1).jpg", ("mri", "mri_meningioma")),
        (f"{MRI}/Tumor/pituitary (100).JPG", ("mri", "mri_pituitary")),
        (f"{MRI}/Tumor/tumor (5).jpg", ("mri", "mri_tumor")),
        (f"s3://bucket/raw/images/{MRI}/Tumor/glioma (12).jpg", ("mri", "mri_glioma")),
        (f"C:\\data\\{CT}\\Healthy\\ct_healthy (1).jpg".replace("/", "\\"), ("ct", "ct_healthy")),
    ],
)
def test_labels_from_archive_paths(path, expected):
    assert label_from_path(path) == expected


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (f"Dataset/Brain Tumor PET images/Healthy/pet (1).jpg", "modality folder"),
        (f"{CT}/Unknown/ct_healthy (1).jpg", "folder"),
        (f"{CT}/Healthy/ct_tumor (1).jpg", "does not name a class"),  # tumor file in the Healthy folder
        (f"{MRI}/Tumor/astrocytoma (1).jpg", "does not name a class"),
        (f"{MRI}/Tumor/glioma (1).txt", "not an image"),
        ("glioma (1).jpg", "expected"),
    ],
)
def test_unknown_paths_are_reported_not_guessed(path, reason):
    with pytest.raises(UnknownLabelError, match=reason):
        label_from_path(path)


def test_tumor_probability_is_one_minus_the_healthy_classes():
    probs = np.zeros((3, len(CLASSES)))
    probs[0, CLASSES.index("ct_healthy")] = 1.0
    probs[1, CLASSES.index("mri_glioma")] = 1.0
    probs[2, [CLASSES.index("mri_healthy"), CLASSES.index("ct_tumor")]] = [0.25, 0.75]
    assert tumor_probability(probs) == pytest.approx([0.0, 1.0, 0.75])
    with pytest.raises(ValueError):
        tumor_probability(np.ones((2, 3)))


def test_is_tumor():
    assert [is_tumor(c) for c in CLASSES] == [False, True, True, False, True, True, True]
    with pytest.raises(UnknownLabelError):
        is_tumor("healthy")
