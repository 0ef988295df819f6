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


# ----------------------------------------------------------------------------- the head crop
def scan_with_border_and_text(height: int = 240, width: int = 320) -> np.ndarray:
    """A grey ellipse (the head) off-centre on black, white 'burnt-in text' in the top-left corner."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width), np.uint8)
    head = ((y - 140) / 80.0) ** 2 + ((x - 190) / 70.0) ** 2 <= 1.0  # rows 60-220, cols 120-260
    image[head] = 120
    image[((y - 140) / 80.0) ** 2 + ((x - 190) / 70.0) ** 2 <= 0.9 ** 2] = 90  # skull brighter than the brain
    for row in (8, 20, 32):  # three sparse lines of 'letters'
        for col in range(6, 70, 8):
            image[row:row + 6, col:col + 3] = 255
    return np.stack([image] * 3, axis=-1)


def test_head_box_skips_black_border_and_corner_text():
    from brainscan.preprocessing import head_box

    top, left, height, width = (int(v) for v in head_box(scan_with_border_and_text()))
    # the ellipse spans rows 60-220 and cols 120-260; the text sits in rows 8-38, cols 6-70
    assert top > 38 and left > 70, "the corner text must be cut off"
    assert top <= 61 and top + height >= 220 and left <= 121 and left + width >= 260, "the whole head stays"
    assert height < 240 * 0.9 and width < 320 * 0.6


def test_crop_fills_the_frame_with_the_head_and_keeps_its_aspect(rgb):
    scan = scan_with_border_and_text()
    plain = preprocess_batch([encode(scan, "RGB", "PNG")], SIZE)[0]
    cropped = preprocess_batch([encode(scan, "RGB", "PNG")], SIZE, crop_to_head=True)[0]
    assert cropped.shape == (SIZE, SIZE, 3) and cropped.dtype == np.float32
    assert cropped.min() >= -1.0 and cropped.max() <= 1.0
    # no text left: nothing brighter than the head (grey 120 -> -0.06), while the plain resize keeps
    # the (blurred) letters in its top-left corner; the head covers much more of the frame than before
    assert cropped.max() < 0.0 < plain[:12, :20].max()
    assert (cropped > -0.5).mean() > 1.5 * (plain > -0.5).mean()
    # the head is taller than wide: aspect-preserving resize pads left and right with black
    assert np.all(cropped[:, 0] == -1.0) and np.all(cropped[:, -1] == -1.0)
    assert np.any(cropped[0] > -1.0) or np.any(cropped[1] > -1.0)


def test_crop_of_an_all_black_image_falls_back_to_the_whole_frame():
    from brainscan.preprocessing import head_box

    black = np.zeros((50, 80, 3), np.uint8)
    assert [int(v) for v in head_box(black)] == [0, 0, 50, 80]
    out = preprocess_batch([encode(black, "RGB", "PNG")], SIZE, crop_to_head=True)[0]
    assert np.all(out == -1.0)


def test_crop_is_identical_in_tf_data_and_eagerly(rgb):
    import tensorflow as tf

    files = [encode(scan_with_border_and_text(), "RGB", "PNG"), encode(rgb, "RGB", "JPEG"),
             encode(np.zeros((40, 40), np.uint8), "L", "PNG")]
    data = tf.data.Dataset.from_tensor_slices(tf.constant(files)).map(
        lambda raw: preprocess_image(raw, SIZE, crop_to_head=True))
    np.testing.assert_array_equal(np.stack([x.numpy() for x in data]),
                                  preprocess_batch(files, SIZE, crop_to_head=True))


def test_bundle_metadata_decides_the_crop_and_old_bundles_keep_todays_preprocessing():
    from brainscan.preprocessing import METADATA_CROP_KEY, preprocessing_options

    assert preprocessing_options({"image_size": 96}) == {"crop_to_head": False}  # bundles from before the crop
    assert preprocessing_options(None) == {"crop_to_head": False}
    assert preprocessing_options({METADATA_CROP_KEY: True}) == {"crop_to_head": True}
    files = [encode(scan_with_border_and_text(), "RGB", "PNG")]
    np.testing.assert_array_equal(preprocess_batch(files, SIZE, **preprocessing_options({})),
                                  preprocess_batch(files, SIZE))


def test_multi_frame_and_other_formats_are_refused_before_any_decode():
    """Only a single-frame JPEG or PNG reaches TensorFlow: its decode_image sizes a GIF by its
    largest frame (the crafted one decodes to 3000 x 3000 past a 1000-pixel limit)."""
    import tensorflow as tf

    from brainscan.preprocessing import preprocess_files
    from tests.fixtures.serving import gif_with_large_second_frame, refused_images

    crafted = gif_with_large_second_frame(8, 3000)
    assert tf.io.decode_image(crafted, channels=3, expand_animations=False).shape == (3000, 3000, 3)

    def no_decode(data):
        raise AssertionError("decoded a file the check should have refused")

    for name, (data, named) in refused_images().items():
        with pytest.raises(InvalidImageError) as info:
            preprocess_files([data], SIZE, no_decode, max_pixels=1000)
        assert info.value.index == 0 and named in str(info.value) and "JPEG or PNG" in str(info.value), name


def test_the_pyfunc_refuses_the_crafted_gif_before_its_model():
    """The registered MLflow model (MLServer) runs the same check."""
    from brainscan.pyfunc import BrainscanPyfunc
    from tests.fixtures.serving import gif_with_large_second_frame

    pyfunc = BrainscanPyfunc()
    pyfunc.image_size, pyfunc.preprocessing, pyfunc.model = SIZE, {}, None  # never reached
    with pytest.raises(ValueError, match="unsupported image format GIF"):
        pyfunc.predict(None, [gif_with_large_second_frame(8, 3000)])
