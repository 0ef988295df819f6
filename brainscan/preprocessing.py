"""The one image preprocessing function, shared by training (tf.data) and serving.

encoded file bytes -> decode (JPEG or PNG, whatever the file name says) -> RGB (grey and
RGBA converted) -> resize to S x S -> Xception ``preprocess_input`` (pixels to [-1, 1]).

TensorFlow is imported inside the functions: the CLI imports modules that import this one.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np


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


def check_image_bytes(data: bytes, index: int | None = None) -> None:
    """Raise InvalidImageError with a readable reason when data is not a JPEG/PNG/... image."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImageError(index, f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImageError(index, "empty input (0 bytes)")
    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            fmt = image.format
            image.load()  # verify() misses truncated pixel data; load() reads it all
    except UnidentifiedImageError:
        raise InvalidImageError(index, f"not an image: {len(data)} bytes in no known image format "
                                       f"(starts with {bytes(data[:8])!r})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidImageError(index, f"corrupt or truncated image file: {err}") from None
    if fmt not in ("JPEG", "PNG", "GIF", "BMP"):
        raise InvalidImageError(index, f"unsupported image format {fmt}; send JPEG or PNG")


def preprocess_batch(images: Sequence[bytes], image_size: int) -> np.ndarray:
    """Encoded image files -> float32 [N, S, S, 3], through the same preprocess_image.

    Raises InvalidImageError naming the first image that does not decode.
    """
    import tensorflow as tf

    out = np.zeros((len(images), image_size, image_size, 3), dtype=np.float32)
    for index, data in enumerate(images):
        check_image_bytes(data, index)
        try:
            out[index] = preprocess_image(tf.constant(bytes(data)), image_size).numpy()
        except tf.errors.OpError as err:
            raise InvalidImageError(index, f"TensorFlow cannot decode it: {err.message.splitlines()[0]}") from None
    return out
