"""Hostile and refused image files, made on the spot: what the model server must answer with a 4xx.

Decompression bombs (a valid 8x8 file whose header claims a huge size), a GIF whose second
frame is far larger than its first (TensorFlow sizes the canvas by the largest frame), animated
and multi-frame files of every format Pillow writes, and formats the model never saw. Used by
the serving tests and by benchmarks/abuse.py, which sends them over every transport.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP")  # whose size header declaring_size can forge
ACCEPTED_FORMATS = ("JPEG", "PNG")  # what the server serves (training's formats); GIF and BMP are refused


def declaring_size(fmt: str, width: int, height: int) -> bytes:
    """A small, valid 8x8 image file of format fmt whose header claims width x height pixels.

    What a decompression bomb looks like before decoding: a few hundred bytes that would
    decode into width * height pixels. Only the header's size fields change (and the PNG
    header's CRC, so the file stays well-formed).
    """
    pixels = np.full((8, 8, 3) if fmt == "BMP" else (8, 8), 128, np.uint8)
    data = bytearray(encode(pixels, fmt))
    if fmt == "PNG":  # IHDR: width, height (big-endian) right after the chunk type, then its CRC
        assert data[12:16] == b"IHDR"
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    elif fmt == "JPEG":  # the start-of-frame segment holds height, width (big-endian)
        i = 2
        while data[i + 1] not in (0xC0, 0xC1, 0xC2):
            i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
        data[i + 5:i + 9] = struct.pack(">HH", height, width)
    elif fmt == "GIF":  # the logical screen descriptor: width, height (little-endian)
        data[6:10] = struct.pack("<HH", width, height)
    elif fmt == "BMP":  # BITMAPINFOHEADER: width, height (little-endian, signed)
        data[18:26] = struct.pack("<ii", width, height)
    else:
        raise ValueError(fmt)
    return bytes(data)


def _gif_blocks(side: int) -> tuple[bytes, bytes]:
    """A side x side grey GIF split into (header, screen descriptor and colour table; its frame)."""
    out = io.BytesIO()
    Image.new("L", (side, side), 128).save(out, format="GIF")
    data = out.getvalue()
    flags = data[10]
    start = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    assert data.endswith(b";")
    return data[:start], data[start:-1]


def gif_with_large_second_frame(first: int = 8, second: int = 3000) -> bytes:
    """A GIF whose screen and first frame are first x first and whose second frame is second x
    second: Pillow's header says first x first; TensorFlow's decode_image (even with
    expand_animations=False) returns a second x second canvas. A few kB for 3000 x 3000."""
    head, frame = _gif_blocks(first)
    return head + frame + _gif_blocks(second)[1] + b";"


def multi_frame(fmt: str) -> bytes:
    """A two-frame 8x8 file of fmt (GIF, PNG: an APNG, MPO: a multi-picture JPEG, WEBP, TIFF)."""
    frames = [Image.fromarray(np.full((8, 8, 3), value, np.uint8)) for value in (60, 200)]
    out = io.BytesIO()
    frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:])
    return out.getvalue()


def icon() -> bytes:
    """A Windows icon holding the same picture at 8, 16 and 24 px (one file, three images)."""
    out = io.BytesIO()
    picture = Image.fromarray(np.full((24, 24, 3), 90, np.uint8))
    picture.save(out, format="ICO", sizes=[(8, 8), (16, 16), (24, 24)])
    return out.getvalue()


def refused_images() -> dict[str, tuple[bytes, str]]:
    """Small files of a format or frame count the server refuses: name -> (bytes, what the 4xx
    message names)."""
    plain = np.full((8, 8, 3), 128, np.uint8)
    return {"gif 8x8 then 3000x3000": (gif_with_large_second_frame(), "GIF"),
            "animated gif": (multi_frame("GIF"), "GIF"),
            "animated png (APNG)": (multi_frame("PNG"), "animated PNG"),
            "multi-picture jpeg (MPO)": (multi_frame("MPO"), "MPO"),
            "animated webp": (multi_frame("WEBP"), "WEBP"),
            "multi-page tiff": (multi_frame("TIFF"), "TIFF"),
            "icon of several sizes (ICO)": (icon(), "ICO"),
            "plain gif": (encode(plain, "GIF"), "GIF"),
            "plain bmp": (encode(plain, "BMP"), "BMP"),
            "plain webp": (encode(plain, "WEBP"), "WEBP")}


