"""The label schema: seven classes taken from the Kaggle archive's folders and file names.

The clinical decision over them (P(tumor) and its threshold) is brainscan.decision's.
Shipped inside the registered MLflow model: standard library only.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath


CLASSES: tuple[str, ...] = (
    "ct_healthy",
    "ct_tumor",
    "mri_glioma",
    "mri_healthy",
    "mri_meningioma",
    "mri_pituitary",
    "mri_tumor",
)
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
HEALTHY_CLASSES = ("ct_healthy", "mri_healthy")
HEALTHY_INDICES = tuple(CLASS_INDEX[c] for c in HEALTHY_CLASSES)
MODALITIES = ("ct", "mri")

# Archive folder names -> modality.
_MODALITY_FOLDERS = {
    "brain tumor ct scan images": "ct",
    "brain tumor mri images": "mri",
}
# File-name stem (without the " (N)" suffix) -> class, for each (modality, Healthy/Tumor) folder.
_STEM_CLASSES = {
    ("ct", "healthy"): {"ct_healthy": "ct_healthy"},
    ("ct", "tumor"): {"ct_tumor": "ct_tumor"},
    ("mri", "healthy"): {"mri_healthy": "mri_healthy"},
    ("mri", "tumor"): {
        "glioma": "mri_glioma",
        "meningioma": "mri_meningioma",
        "pituitary": "mri_pituitary",
        "tumor": "mri_tumor",
    },
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_STEM_RE = re.compile(r"^(?P<stem>[a-z_]+?)\s*(\(\d+\))?$")


class UnknownLabelError(ValueError):
    """A path that does not follow the archive layout: reported, never guessed."""


def modality_of(class7: str) -> str:
    return class7.split("_", 1)[0]


def is_tumor(class7: str) -> bool:
    if class7 not in CLASS_INDEX:
        raise UnknownLabelError(f"unknown class {class7!r}; expected one of {', '.join(CLASSES)}")
    return class7 not in HEALTHY_CLASSES


def label_from_path(path: str) -> tuple[str, str]:
    """(modality, class7) of an image path in the archive layout.

    The last three parts matter: ``<modality folder>/<Healthy|Tumor>/<stem> (N).<ext>``.
    Anything else raises UnknownLabelError with the reason.
    """
    parts = PurePosixPath(str(path).replace("\\", "/")).parts
    if len(parts) < 3:
        raise UnknownLabelError(f"{path}: expected <modality folder>/<Healthy|Tumor>/<file>")
    modality_folder, group_folder, filename = parts[-3], parts[-2], parts[-1]
    modality = _MODALITY_FOLDERS.get(modality_folder.strip().lower())
    if modality is None:
        raise UnknownLabelError(
            f"{path}: unknown modality folder {modality_folder!r}; expected one of "
            "'Brain Tumor CT scan Images', 'Brain Tumor MRI images'"
        )
    group = group_folder.strip().lower()
    if group not in ("healthy", "tumor"):
        raise UnknownLabelError(f"{path}: unknown folder {group_folder!r}; expected 'Healthy' or 'Tumor'")
    name = PurePosixPath(filename)
    if name.suffix.lower() not in IMAGE_SUFFIXES:
        raise UnknownLabelError(f"{path}: not an image file name (expected {', '.join(IMAGE_SUFFIXES)})")
    match = _STEM_RE.match(name.stem.strip().lower())
    stems = _STEM_CLASSES[(modality, group)]
    if match is None or match.group("stem") not in stems:
        raise UnknownLabelError(
            f"{path}: file name {filename!r} does not name a class of {modality_folder}/{group_folder}; "
            f"expected one of {', '.join(sorted(stems))} followed by ' (N)'"
        )
    return modality, stems[match.group("stem")]
