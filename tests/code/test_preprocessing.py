"""The one preprocessing function: formats, colour modes, bad bytes, same pixels in tf.data and serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from brainscan.preprocessing import InvalidImageError, preprocess_batch, preprocess_image

SIZE = 71


def encode(array: np.ndarray, mode: str, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    # a smooth gradient: JPEG keeps it close, so formats can be compared pixel for pixel
    y, x = np.mgrid[0:90, 0:120]
    return np.stack([x * 2, y * 2, (x + y)], axis=-1).clip(0, 255).astype(np.uint8)


def test_jpeg_png_and_png_named_jpg_give_the_same_picture(rgb, tmp_path):
    png = encode(rgb, "RGB", "PNG")
    jpeg = encode(rgb, "RGB", "JPEG")
    # a PNG saved under a .jpg name, as in the real archive: only the bytes matter
    (tmp_path / "scan (1).jpg").write_bytes(png)
    batch = preprocess_batch([jpeg, (tmp_path / "scan (1).jpg").read_bytes()], SIZE)
    assert batch.shape == (2, SIZE, SIZE, 3) and batch.dtype == np.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0  # Xception's preprocess_input range
    assert np.abs(batch[0] - batch[1]).mean() < 0.03  # JPEG loss only


def test_greyscale_and_rgba_become_rgb(rgb):
    grey = rgb[..., 0]
    grey_batch = preprocess_batch([encode(grey, "L", "PNG")], SIZE)[0]
    assert np.allclose(grey_batch[..., 0], grey_batch[..., 1]) and np.allclose(grey_batch[..., 1], grey_batch[..., 2])
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], axis=-1)
    rgba_batch = preprocess_batch([encode(rgba, "RGBA", "PNG"), encode(rgb, "RGB", "PNG")], SIZE)
    assert np.allclose(rgba_batch[0], rgba_batch[1])  # alpha dropped, colours kept


@pytest.mark.parametrize("bad, reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
    ("truncated", "corrupt or truncated"),
])
def test_bad_bytes_name_the_index_and_reason(rgb, bad, reason):
    good = encode(rgb, "RGB", "JPEG")
    if bad == "truncated":
        bad = good[: len(good) // 3]
    with pytest.raises(InvalidImageError) as info:
        preprocess_batch([good, good, bad], SIZE)
    assert info.value.index == 2
    assert "image 2" in str(info.value) and reason in str(info.value)


def test_tf_data_and_batch_helper_give_identical_pixels(rgb):
    import tensorflow as tf

    files = [encode(rgb, "RGB", "JPEG"), encode(rgb[::-1], "RGB", "PNG"), encode(rgb[..., 1], "L", "PNG")]
    data = tf.data.Dataset.from_tensor_slices(tf.constant(files)).map(lambda raw: preprocess_image(raw, SIZE))
    from_tf_data = np.stack([x.numpy() for x in data])
    np.testing.assert_array_equal(from_tf_data, preprocess_batch(files, SIZE))
