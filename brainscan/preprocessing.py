"""The one image preprocessing function, shared by training (tf.data) and serving.

encoded file bytes -> decode (JPEG or PNG, whatever the file name says) -> RGB (grey and
RGBA converted) -> [crop to the head, optional] -> resize to S x S -> Xception
``preprocess_input`` (pixels to [-1, 1]).

The crop is a switch recorded in the bundle metadata (``crop_to_head``): the trainer records
what it applied, every consumer reads it back with ``preprocessing_options(metadata)``, and a
bundle without the key is preprocessed as before (no crop).

Every image is checked before it is decoded: its header must name a single-frame JPEG or PNG
(IMAGE_FORMATS, what training reads) of at most MAX_IMAGE_PIXELS pixels (decompression bombs are
refused from the header alone), then it must decode whole (truncated files are refused).

Shipped inside the registered MLflow model (see brainscan/pyfunc.py).
"""

from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np

from brainscan.limits import IMAGE_FORMATS, MAX_IMAGE_PIXELS


class InvalidImageError(ValueError):
    """Bytes that are not a decodable image; the message names the index and the reason."""

    def __init__(self, index: int | None, reason: str):
        self.index = index
        self.reason = reason
        where = f"image {index}" if index is not None else "image"
        super().__init__(f"{where}: {reason}")


# The head crop: a pixel is "bright" above this grey level (0-255); a row / column belongs to the
# head when its bright pixels number at least this fraction of the fullest row / column (burnt-in
# text, rulers and the scanner table are thin and sparse, the head is wide); the box grows by this
# fraction of its side on each edge.
CROP_GREY_LEVEL = 30.0
CROP_PROFILE_FRACTION = 0.25
CROP_MARGIN = 0.04
METADATA_CROP_KEY = "crop_to_head"


def preprocessing_options(metadata: dict | None) -> dict:
    """The preprocess_image keyword arguments a bundle was trained with (old bundles: none)."""
    return {"crop_to_head": bool((metadata or {}).get(METADATA_CROP_KEY, False))}


def head_box(image):
    """uint8/float [H, W, 3] -> (top, left, height, width) int32 of the head's bounding box.

    Rows and columns whose count of bright pixels reaches CROP_PROFILE_FRACTION of the fullest
    one, widened by CROP_MARGIN; the whole image when nothing is bright. Graph-compatible.
    """
    import tensorflow as tf  # see preprocess_image

    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    bright = tf.cast(tf.reduce_mean(tf.cast(image, tf.float32), axis=-1) > CROP_GREY_LEVEL, tf.float32)
    rows, cols = tf.reduce_sum(bright, axis=1), tf.reduce_sum(bright, axis=0)

    def extent(profile, size):
        keep = tf.where(profile >= CROP_PROFILE_FRACTION * tf.reduce_max(profile))[:, 0]
        first, last = tf.cast(tf.reduce_min(keep), tf.int32), tf.cast(tf.reduce_max(keep), tf.int32)
        margin = tf.cast(tf.math.ceil(CROP_MARGIN * tf.cast(last - first + 1, tf.float32)), tf.int32)
        start, stop = tf.maximum(first - margin, 0), tf.minimum(last + margin + 1, size)
        return start, stop - start

    def box():
        top, box_height = extent(rows, height)
        left, box_width = extent(cols, width)
        return top, left, box_height, box_width

    return tf.cond(tf.reduce_max(rows) > 0, box, lambda: (0, 0, height, width))


def preprocess_image(image_bytes, image_size: int, crop_to_head: bool = False):
    """tf.string scalar (an encoded image file) -> float32 [S, S, 3] in [-1, 1].

    crop_to_head: cut the image to the head's bounding box (head_box) and resize it keeping its
    aspect ratio (black padding), instead of squashing the whole frame to S x S.
    Usable inside tf.data ``map`` and eagerly; the server calls it through preprocess_batch.
    """
    # TensorFlow's import costs seconds: only where an image is really preprocessed
    import keras
    import tensorflow as tf

    # channels=3: greyscale is replicated, RGBA loses its alpha; expand_animations=False keeps
    # every image rank 3 (check_image_bytes refuses the animated formats before this decodes).
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    if crop_to_head:
        top, left, height, width = head_box(image)
        image = tf.image.crop_to_bounding_box(image, top, left, height, width)
        image = tf.image.resize_with_pad(tf.cast(image, tf.float32), image_size, image_size, method="bilinear",
                                         antialias=True)
    else:
        image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size], method="bilinear",
                                antialias=True)
    image = keras.applications.xception.preprocess_input(image)
    return tf.cast(image, tf.float32)


def check_image_bytes(data: bytes, index: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise InvalidImageError with a readable reason when data is not a single-frame JPEG or PNG,
    has more than max_pixels pixels (both judged from the header, before decoding) or does not
    decode whole."""
    from PIL import Image, UnidentifiedImageError  # Pillow only where images are checked

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImageError(index, f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImageError(index, "empty input (0 bytes)")
    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            fmt = image.format
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImageError(index, f"{width}x{height} = {width * height} pixels; at most {max_pixels}")
            # Only the first frame's header is read above, while TensorFlow's decode_image sizes a
            # GIF's canvas by its largest frame (an 8x8 first frame, a 65535-square second one):
            # any format but training's, and any file of more than one frame (APNG), is refused.
            if fmt not in IMAGE_FORMATS:
                raise InvalidImageError(index, f"unsupported image format {fmt}; send a single-frame "
                                               f"{' or '.join(IMAGE_FORMATS)}")
            frames = getattr(image, "n_frames", 1)  # PNG: acTL's count, read from the header
            if frames != 1:
                raise InvalidImageError(index, f"animated {fmt} of {frames} frames; send a single-frame "
                                               f"{' or '.join(IMAGE_FORMATS)}")
            image.load()  # verify() misses truncated pixel data; load() reads it all
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as err:  # Pillow's own limit, raised from the header
        raise InvalidImageError(index, f"too many pixels (at most {max_pixels}): {err}") from None
    except UnidentifiedImageError:
        raise InvalidImageError(index, f"not an image: {len(data)} bytes in no known image format "
                                       f"(starts with {bytes(data[:8])!r})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidImageError(index, f"corrupt or truncated image file: {err}") from None


def preprocess_files(images: Sequence[bytes], image_size: int, preprocess_one: Callable[[bytes], np.ndarray],
                     max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The checked loop around one image's preprocessing: each file passes check_image_bytes, then
    preprocess_one(file bytes) -> [S, S, 3] (preprocess_image, eager in preprocess_batch, traced once
    in serving.runtime). float32 [N, S, S, 3]; InvalidImageError names the first bad file."""
    import tensorflow as tf  # see preprocess_image

    out = np.zeros((len(images), image_size, image_size, 3), dtype=np.float32)
    for index, data in enumerate(images):
        check_image_bytes(data, index, max_pixels)
        try:
            out[index] = preprocess_one(bytes(data))
        except tf.errors.OpError as err:
            raise InvalidImageError(index, f"TensorFlow cannot decode it: {err.message.splitlines()[0]}") from None
    return out


def preprocess_batch(images: Sequence[bytes], image_size: int, max_pixels: int = MAX_IMAGE_PIXELS, *,
                     crop_to_head: bool = False) -> np.ndarray:
    """Encoded image files -> float32 [N, S, S, 3], through the same preprocess_image.

    Pass a bundle's options: ``preprocess_batch(files, bundle.image_size, **bundle.preprocessing)``
    (or ``bundle.preprocess(files)``).

    Raises InvalidImageError naming the first image that is refused or does not decode.
    """
    import tensorflow as tf  # see preprocess_image

    return preprocess_files(images, image_size,
                            lambda data: preprocess_image(tf.constant(data), image_size, crop_to_head).numpy(),
                            max_pixels)
