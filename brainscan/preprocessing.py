"""The one image preprocessing function, shared by training (tf.data) and serving.

encoded file bytes -> decode (JPEG or PNG, whatever the file name says) -> RGB (grey and
RGBA converted) -> resize to S x S -> Xception ``preprocess_input`` (pixels to [-1, 1]).

Every image is checked before it is decoded: its header must name a JPEG/PNG/GIF/BMP of at
most MAX_IMAGE_PIXELS pixels (decompression bombs are refused from the header alone), then it
must decode whole (truncated files are refused).

Shipped inside the registered MLflow model (see brainscan/pyfunc.py).
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from brainscan.config import MAX_IMAGE_PIXELS


class InvalidImageError(ValueError):
    """Bytes that are not a decodable image; the message names the index and the reason."""

    def __init__(self, index: int | None, reason: str):
        self.index = index
        self.reason = reason
        where = f"image {index}" if index is not None else "image"
        super().__init__(f"{where}: {reason}")


def preprocess_image(image_bytes, image_size: int):
    """tf.string scalar (an encoded image file) -> float32 [S, S, 3] in [-1, 1].

    Usable inside tf.data ``map`` and eagerly; the server calls it through preprocess_batch.
    """
    # TensorFlow's import costs seconds: only where an image is really preprocessed
    import keras
    import tensorflow as tf

    # channels=3: greyscale is replicated, RGBA loses its alpha; expand_animations=False keeps
    # a GIF to its first frame so every image is rank 3.
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    image = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size], method="bilinear",
                            antialias=True)
    image = keras.applications.xception.preprocess_input(image)
    return tf.cast(image, tf.float32)


def check_image_bytes(data: bytes, index: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise InvalidImageError with a readable reason when data is not a JPEG/PNG/... image, has more
    than max_pixels pixels (judged from the header, before decoding) or does not decode whole."""
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
    if fmt not in ("JPEG", "PNG", "GIF", "BMP"):
        raise InvalidImageError(index, f"unsupported image format {fmt}; send JPEG or PNG")


def preprocess_batch(images: Sequence[bytes], image_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image files -> float32 [N, S, S, 3], through the same preprocess_image.

    Raises InvalidImageError naming the first image that is refused or does not decode.
    """
    import tensorflow as tf  # see preprocess_image

    out = np.zeros((len(images), image_size, image_size, 3), dtype=np.float32)
    for index, data in enumerate(images):
        check_image_bytes(data, index, max_pixels)
        try:
            out[index] = preprocess_image(tf.constant(bytes(data)), image_size).numpy()
        except tf.errors.OpError as err:
            raise InvalidImageError(index, f"TensorFlow cannot decode it: {err.message.splitlines()[0]}") from None
    return out
