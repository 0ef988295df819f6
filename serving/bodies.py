"""REST request bodies parsed away from the event loop: a huge JSON body never holds the server.

orjson (like json and pydantic) holds the GIL for the whole of one parse, about a second for
64 MB of numbers, so a thread would not free the event loop; a child process does. `Parser`
parses bodies over `INLINE_BYTES` in one (spawned: no copy of the server's TensorFlow) and
smaller ones inline. `parse_json` turns each input's list of numbers into one numpy array, which
comes back from the child as one buffer instead of millions of Python floats.

Standard library, numpy and orjson only: the child imports this module and nothing else.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import orjson

INLINE_BYTES = 1 << 20  # bodies up to this size are parsed on the spot (orjson: about a millisecond)

# v2 (Open Inference Protocol) tensor datatypes and their numpy types; BYTES stays a list of strings
NUMPY_TYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
               "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
               "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


class BodyError(ValueError):
    """The body cannot be a request: the message is the client's (HTTP 400)."""


def parse_json(body: bytes, max_elements: int):
    """The JSON document in body; each v2 input's numeric `data` as a flat numpy array, each
    list of strings (BYTES, v1 `instances`) at most max_elements long. BodyError otherwise."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise BodyError(f"malformed JSON: {err}") from None
    if not isinstance(document, dict):
        return document
    instances = document.get("instances")
    if isinstance(instances, list) and len(instances) > max_elements:
        raise BodyError(f"{len(instances)} instances in one request; at most {max_elements}")
    for entry in document.get("inputs") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), list):
            continue
        name, datatype, data = entry.get("name"), entry.get("datatype"), entry["data"]
        if datatype == "BYTES":
            if len(data) > max_elements:
                raise BodyError(f"input {name!r}: {len(data)} elements in one request; at most {max_elements}")
            continue
        if datatype not in NUMPY_TYPES:
            raise BodyError(f"input {name!r}: unknown datatype {datatype!r} (expected one of BYTES, "
                            f"{', '.join(NUMPY_TYPES)})")
        try:
            entry["data"] = np.asarray(data, dtype=NUMPY_TYPES[datatype]).reshape(-1)
        except (ValueError, TypeError, OverflowError):
            raise BodyError(f"input {name!r}: data is not a (nested) list of {datatype} numbers") from None
    return document


class Parser:
    """Parses request bodies: small ones inline, large ones in one child process."""

    def __init__(self, max_elements: int):
        self.max_elements = max_elements
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the child now (it imports numpy: not on the first large request's time)."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            self._pool.submit(parse_json, b"{}", 1)

    async def parse(self, body: bytes):
        if len(body) <= INLINE_BYTES:
            return parse_json(body, self.max_elements)
        self.start()
        return await asyncio.get_running_loop().run_in_executor(self._pool, parse_json, body, self.max_elements)

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
