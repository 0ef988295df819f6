"""An offline synthetic dataset: phantom CT- and MRI-like brain slices in the Kaggle archive layout.

The real archive cannot be downloaded here (and tests must not need it), so this writes a
small stand-in with the same folders, file names and quirks:

    Dataset/Brain Tumor CT scan Images/{Healthy,Tumor}/ct_healthy (N).jpg | ct_tumor (N).jpg
    Dataset/Brain Tumor MRI images/Healthy/mri_healthy (N).jpg
    Dataset/Brain Tumor MRI images/Tumor/{glioma,meningioma,pituitary,tumor} (N).jpg

JPEG and PNG mixed (some ``.jpg`` files are really PNG), greyscale and RGB, sizes that vary,
and a few exact duplicates. Each image is drawn in head coordinates and then rotated,
shifted, scaled, contrast-jittered and noised, so a model has to learn the anatomy rather
than pixel positions. What tells the classes apart (so that a small CNN can learn it):

- CT: bright skull ring, darkish homogeneous brain, dark ventricles. CT tumor: a
  hyperdense (bright) mass with a darker oedema rim anywhere in the brain.
- MRI: dark skull between a bright scalp and a textured grey/white-matter brain.
  glioma: an irregular, heterogeneous bright mass inside one hemisphere;
  meningioma: a round, homogeneous, very bright mass against the skull;
  pituitary: a small bright blob at the centre-bottom (the sella);
  tumor (unspecified): a ring-enhancing lesion (bright rim, dark core) anywhere.

Everything is a pure function of (seed, class, index): the same call writes the same bytes.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from brainscan.labels import CLASSES

log = logging.getLogger(__name__)

CT_FOLDER = "Brain Tumor CT scan Images"
MRI_FOLDER = "Brain Tumor MRI images"

# class -> (modality folder, Healthy/Tumor folder, file-name stem), as in the Kaggle archive
LAYOUT: dict[str, tuple[str, str, str]] = {
    "ct_healthy": (CT_FOLDER, "Healthy", "ct_healthy"),
    "ct_tumor": (CT_FOLDER, "Tumor", "ct_tumor"),
    "mri_healthy": (MRI_FOLDER, "Healthy", "mri_healthy"),
    "mri_glioma": (MRI_FOLDER, "Tumor", "glioma"),
    "mri_meningioma": (MRI_FOLDER, "Tumor", "meningioma"),
    "mri_pituitary": (MRI_FOLDER, "Tumor", "pituitary"),
    "mri_tumor": (MRI_FOLDER, "Tumor", "tumor"),
}

MIN_SIDE, MAX_SIDE = 96, 256
DUPLICATE_FRACTION = 0.05  # the real archive holds about 5% exact duplicates


@dataclass
class SynthResult:
    out_dir: str  # the folder holding "Dataset/" (what ingest takes as its source)
    files: int
    per_class: dict[str, int]
    formats: dict[str, int]  # "JPEG as .jpg", "PNG as .png", "PNG as .jpg"
    modes: dict[str, int]  # "L", "RGB"
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (copy, original), relative paths

    def summary(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "files": self.files,
            "per_class": self.per_class,
            "formats": self.formats,
            "modes": self.modes,
            "duplicates": len(self.duplicates),
        }


# --------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency texture in [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.BICUBIC)
    return np.clip(np.asarray(img), -1, 1)


def _soft_disc(dist: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """1 inside `radius`, 0 outside, with a smooth edge of width `edge`."""
    return np.clip((radius - dist) / edge + 0.5, 0.0, 1.0)


def _head_coordinates(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel grid mapped into head coordinates (the head is about the unit disc), with a random pose."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    side = max(height, width)
    x = (xs - (width - 1) / 2) / (side / 2)
    y = (ys - (height - 1) / 2) / (side / 2)
    angle = math.radians(rng.uniform(-15, 15))
    scale = rng.uniform(0.88, 1.05)
    x = x - rng.uniform(-0.06, 0.06)
    y = y - rng.uniform(-0.06, 0.06)
    cos, sin = math.cos(angle), math.sin(angle)
    hx = (cos * x + sin * y) / scale
    hy = (-sin * x + cos * y) / scale
    return hx, hy


def _draw_ct(rng, hx, hy, tumor: bool) -> np.ndarray:
    a, b = rng.uniform(0.78, 0.86), rng.uniform(0.86, 0.94)
    r = np.sqrt((hx / a) ** 2 + (hy / b) ** 2)
    img = np.zeros_like(hx)
    brain = _soft_disc(r, 0.9, 0.02)
    img += brain * (rng.uniform(0.30, 0.40) + 0.03 * _smooth_noise(rng, hx.shape, 6))
    skull = _soft_disc(r, 1.0, 0.02) - brain
    img = img * (1 - skull) + skull * rng.uniform(0.9, 1.0)
    # two dark lateral ventricles either side of the midline
    for side in (-1, 1):
        d = np.sqrt(((hx - side * 0.12) / 0.07) ** 2 + ((hy + 0.05) / 0.22) ** 2)
        img -= 0.18 * _soft_disc(d, 1.0, 0.3) * brain
    if tumor:
        angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.55)
        cx, cy = dist * math.cos(angle), dist * math.sin(angle)
        radius = rng.uniform(0.12, 0.22)
        d = np.sqrt((hx - cx) ** 2 + (hy - cy) ** 2)
        oedema = _soft_disc(d, radius * 1.5, 0.05) - _soft_disc(d, radius, 0.03)
        img -= 0.12 * oedema * brain
        img += rng.uniform(0.35, 0.5) * _soft_disc(d, radius, 0.03) * brain
    return img


def _draw_mri(rng, hx, hy, kind: str) -> np.ndarray:
    a, b = rng.uniform(0.74, 0.84), rng.uniform(0.84, 0.94)
    r = np.sqrt((hx / a) ** 2 + (hy / b) ** 2)
    head = _soft_disc(r, 1.0, 0.03)
    brain = _soft_disc(r, 0.86, 0.03)
    skull = _soft_disc(r, 0.93, 0.02) - brain
    scalp = head - brain - skull
    # grey/white-matter texture: folded, fine-grained, unlike the flat CT brain
    texture = 0.6 * _smooth_noise(rng, hx.shape, 14) + 0.4 * _smooth_noise(rng, hx.shape, 28)
    img = brain * (rng.uniform(0.42, 0.52) + 0.12 * texture)
    img += scalp * rng.uniform(0.65, 0.8) + skull * 0.06
    # butterfly-shaped dark ventricles and a dark midline
    for side in (-1, 1):
        d = np.sqrt(((hx - side * 0.1) / 0.08) ** 2 + ((hy + 0.1) / 0.18) ** 2)
        img -= 0.3 * _soft_disc(d, 1.0, 0.25) * brain
    img -= 0.15 * np.exp(-(hx / 0.015) ** 2) * brain * (np.abs(hy) < 0.6)

    if kind == "glioma":
        # irregular, heterogeneous mass inside one hemisphere
        side = rng.choice([-1, 1])
        cx, cy = side * rng.uniform(0.28, 0.45), rng.uniform(-0.35, 0.3)
        field_ = np.zeros_like(hx)
        for _ in range(rng.integers(4, 7)):
            bx, by = cx + rng.normal(0, 0.08), cy + rng.normal(0, 0.08)
            s = rng.uniform(0.06, 0.11)
            field_ += np.exp(-((hx - bx) ** 2 + (hy - by) ** 2) / (2 * s * s))
        mass = np.clip((field_ - 0.5) / 0.2, 0, 1) * brain
        hetero = 0.75 + 0.25 * _smooth_noise(rng, hx.shape, 24)
        img = img * (1 - mass) + mass * rng.uniform(0.78, 0.92) * hetero
    elif kind == "meningioma":
        # round, homogeneous, very bright, attached to the inner skull
        angle = rng.uniform(-math.pi, 0.0)  # upper half (image y grows downwards)
        radius = rng.uniform(0.13, 0.2)
        dist = 0.86 - radius * 0.6
        cx, cy = a * dist * math.cos(angle), b * dist * math.sin(angle)
        d = np.sqrt((hx - cx) ** 2 + (hy - cy) ** 2)
        mass = _soft_disc(d, radius, 0.02) * head
        img = img * (1 - mass) + mass * rng.uniform(0.92, 1.0)
    elif kind == "pituitary":
        # small bright blob at the centre-bottom (the sella turcica)
        cx, cy = rng.uniform(-0.04, 0.04), rng.uniform(0.38, 0.48)
        radius = rng.uniform(0.08, 0.12)
        d = np.sqrt(((hx - cx) / 1.2) ** 2 + (hy - cy) ** 2)
        mass = _soft_disc(d, radius, 0.02)
        img = img * (1 - mass) + mass * rng.uniform(0.9, 1.0)
    elif kind == "tumor":
        # unspecified: a ring-enhancing lesion (bright rim, dark necrotic core), anywhere
        angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.5)
        cx, cy = dist * math.cos(angle), dist * math.sin(angle)
        radius = rng.uniform(0.13, 0.22)
        d = np.sqrt((hx - cx) ** 2 + (hy - cy) ** 2)
        outer, inner = _soft_disc(d, radius, 0.02), _soft_disc(d, radius * 0.6, 0.02)
        img = img * (1 - outer) + (outer - inner) * rng.uniform(0.85, 0.98) + inner * rng.uniform(0.08, 0.16)
    return img


def render(class7: str, rng: np.random.Generator) -> np.ndarray:
    """One phantom slice of a class as a uint8 greyscale array of a random size."""
    if class7 not in LAYOUT:
        raise ValueError(f"unknown class {class7!r}; expected one of {', '.join(CLASSES)}")
    width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    # most slices are square; some are a little taller or wider, as in the archive
    height = width if rng.random() < 0.7 else int(np.clip(width * rng.uniform(0.85, 1.2), MIN_SIDE, MAX_SIDE))
    hx, hy = _head_coordinates(rng, height, width)
    if class7.startswith("ct_"):
        img = _draw_ct(rng, hx, hy, tumor=class7 == "ct_tumor")
    else:
        img = _draw_mri(rng, hx, hy, class7.split("_", 1)[1])
    # scanner-like variation: contrast, brightness, gamma and noise
    img = np.clip(img, 0, 1) * rng.uniform(0.85, 1.1) + rng.uniform(-0.03, 0.03)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    img = img + rng.normal(0, rng.uniform(0.01, 0.035), size=img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _encode(pixels: np.ndarray, mode: str, fmt: str, rng: np.random.Generator) -> bytes:
    image = Image.fromarray(pixels, mode="L")
    if mode == "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the archive


def relative_path(class7: str, number: int, suffix: str = ".jpg") -> str:
    modality_folder, group_folder, stem = LAYOUT[class7]
    return f"Dataset/{modality_folder}/{group_folder}/{stem} ({number}){suffix}"


def generate(out_dir: str | Path, per_class: int = 40, seed: int = 0) -> SynthResult:
    """Write `per_class` images of each of the 7 classes under `out_dir/Dataset/...`.

    About 5% of each class (at least one where per_class >= 10) are byte-exact copies of
    another image of the same class under a new number, like the real archive's duplicates.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    out = Path(out_dir)
    per_class_counts: dict[str, int] = {}
    formats: dict[str, int] = {}
    modes: dict[str, int] = {}
    duplicates: list[tuple[str, str]] = []
    n_duplicates = round(per_class * DUPLICATE_FRACTION) if per_class < 10 else max(1, round(per_class * DUPLICATE_FRACTION))
    for class_index, class7 in enumerate(CLASSES):
        written: list[tuple[str, bytes, str]] = []  # (relative path, bytes, format label)
        n_unique = per_class - n_duplicates
        for number in range(1, n_unique + 1):
            # one generator per image: any image can be regenerated on its own
            rng = np.random.default_rng([seed, class_index, number])
            pixels = render(class7, rng)
            mode = "RGB" if rng.random() < 0.5 else "L"
            # mostly JPEG; every 7th a real .png, every 7th (offset) a PNG misnamed .jpg
            kind = number % 7
            fmt, suffix = ("PNG", ".png") if kind == 3 else ("PNG", ".jpg") if kind == 5 else ("JPEG", ".jpg")
            data = _encode(pixels, mode, fmt, rng)
            rel = relative_path(class7, number, suffix)
            written.append((rel, data, f"{fmt} as {suffix}"))
            modes[mode] = modes.get(mode, 0) + 1
        for k in range(n_duplicates):
            rng = np.random.default_rng([seed, class_index, 0, k])
            original_rel, data, label = written[int(rng.integers(0, n_unique))]
            copy_rel = relative_path(class7, n_unique + 1 + k, Path(original_rel).suffix)
            written.append((copy_rel, data, label))
            duplicates.append((copy_rel, original_rel))
            mode = Image.open(io.BytesIO(data)).mode
            modes[mode] = modes.get(mode, 0) + 1
        for rel, data, label in written:
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            formats[label] = formats.get(label, 0) + 1
        per_class_counts[class7] = len(written)
        log.info("synth: %s: %d images", class7, len(written))
    files = sum(per_class_counts.values())
    return SynthResult(str(out), files, per_class_counts, formats, modes, duplicates)


def preview(out_png: str | Path, seed: int = 0, per_class: int = 6, tile: int = 128) -> Path:
    """A contact sheet (one row per class) of freshly rendered slices, for a person to look at."""
    label_width = 120
    sheet = Image.new("L", (label_width + per_class * tile, len(CLASSES) * tile), 0)
    draw = ImageDraw.Draw(sheet)
    for row, class7 in enumerate(CLASSES):
        draw.text((4, row * tile + tile // 2 - 6), class7, fill=255)
        for col in range(per_class):
            rng = np.random.default_rng([seed, row, col + 1])
            image = Image.fromarray(render(class7, rng)).resize((tile, tile))
            sheet.paste(image, (label_width + col * tile, row * tile))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
