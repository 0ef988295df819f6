"""Grad-CAM and LIME: heat maps of the right shape, overlays that are PNGs, the server's one-call helper,
and Grad-CAM through the project's real Xception graph (the base nested as one layer)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from brainscan import explain
from brainscan.modelstore import ModelBundle, load_bundle
from tests.fixtures.registry import TINY_SIZE


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


def _image_bytes(size=(120, 90), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8), "L").save(buffer, "JPEG")
    return buffer.getvalue()


def test_gradcam_heatmaps_and_overlay(tiny_bundle_dir):
    bundle = load_bundle(str(tiny_bundle_dir))
    x = np.random.default_rng(0).uniform(-1, 1, (3, TINY_SIZE, TINY_SIZE, 3)).astype("float32")
    heat, probs = explain.gradcam(bundle.model, x)
    assert heat.ndim == 3 and len(heat) == 3 and probs.shape == (3, 7)
    assert heat.min() >= 0 and heat.max() <= 1
    # explaining a given class is honoured: another class gives another map
    other, _ = explain.gradcam(bundle.model, x[:1], [int(np.argmin(probs[0]))])
    assert other.shape == heat[:1].shape
    assert _png_size(explain.overlay_png(x[0], heat[0])) == (256, 256)  # small images are enlarged


def test_gradcam_overlay_for_the_server(tiny_bundle_dir):
    bundle = load_bundle(str(tiny_bundle_dir))
    png = explain.gradcam_overlay(bundle, _image_bytes((600, 450)))
    assert max(_png_size(png)) == 512  # large scans are shrunk, aspect kept
    assert _png_size(png)[0] > _png_size(png)[1]


def test_lime_png(tiny_bundle_dir):
    bundle = load_bundle(str(tiny_bundle_dir))
    x = np.random.default_rng(1).uniform(-1, 1, (TINY_SIZE, TINY_SIZE, 3)).astype("float32")
    assert _png_size(explain.lime_png(bundle, x, num_samples=40)) == (TINY_SIZE, TINY_SIZE)


def test_gradcam_through_the_project_xception():
    architecture = pytest.importorskip("brainscan.network")
    model, _ = architecture.build_model(71, base_weights="none")
    bundle = ModelBundle(model, 71, (), None, None)
    heat, probs = explain.gradcam(model, np.zeros((1, 71, 71, 3), "float32"))
    assert heat.shape[0] == 1 and heat.shape[1:] == (3, 3) and probs.shape == (1, 7)  # block14 grid at 71 px
    assert _png_size(explain.gradcam_overlay(bundle, _image_bytes())) == (256, 192)


def test_gradcam_of_a_flip_averaging_model_explains_its_inner_network():
    architecture = pytest.importorskip("brainscan.network")
    model, _ = architecture.build_model(71, base_weights="none")
    tta = architecture.with_flip_averaging(model, 71)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 71, 71, 3)).astype("float32")
    heat, _ = explain.gradcam(model, x)
    heat_tta, _ = explain.gradcam(tta, x)
    assert heat_tta.shape == (2, 3, 3)  # block14's grid, not the input-sized flip layers
    np.testing.assert_allclose(heat_tta, heat, atol=1e-5)


def test_overlay_of_a_cropping_bundle_is_drawn_on_its_cropped_input():
    architecture = pytest.importorskip("brainscan.network")
    model, _ = architecture.build_model(71, base_weights="none")
    plain = ModelBundle(model, 71, (), None, None)
    cropping = ModelBundle(model, 71, (), None, None, metadata={"crop_to_head": True})
    x = np.zeros((71, 71, 3), "float32")
    assert explain.shown_image(plain, b"raw", x) == b"raw"
    assert explain.shown_image(cropping, b"raw", x) is x
    assert _png_size(explain.gradcam_overlay(cropping, _image_bytes())) == (256, 256)  # the square model input
