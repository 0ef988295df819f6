"""A small client for the `brain-tumor` model server over the v2 REST API (JSON, base64 images).

    from serving.client import predict
    predict("http://127.0.0.1:8080", ["scan1.jpg", "scan2.png"])
    -> [{"image": "scan1.jpg", "label": "mri_glioma", "tumor_probability": 0.97, "tumor": True,
         "probabilities": {...}}, ...]

Only the standard library and brainscan's (standard library) names: no kserve/tritonclient needed.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence, Union

from brainscan.config import MODEL_NAME
from brainscan.labels import CLASSES


ImageLike = Union[str, Path, bytes]


class ServerError(RuntimeError):
    """The server answered an error (the message carries its status and explanation)."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


def _read(image: ImageLike) -> tuple[str, bytes]:
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>", bytes(image)
    return str(image), Path(image).read_bytes()


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            text = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            pass
        raise ServerError(err.code, text) from None


def predict(url: str, images: Sequence[ImageLike], model: str = MODEL_NAME, timeout: float = 60.0) -> list[dict]:
    """One v2 request for all images; a dict per image in the same order."""
    names, files = zip(*(_read(image) for image in images)) if images else ((), ())
    if not files:
        return []
    body = {"inputs": [{"name": "image", "shape": [len(files)], "datatype": "BYTES",
                        "data": [base64.b64encode(f).decode("ascii") for f in files]}]}
    answer = _post(f"{url.rstrip('/')}/v2/models/{model}/infer", body, timeout)
    outputs = {o["name"]: o for o in answer["outputs"]}
    probabilities = outputs["probabilities"]["data"]
    width = len(CLASSES)
    results = []
    for i, name in enumerate(names):
        row = probabilities[i * width:(i + 1) * width]
        results.append({"image": name, "label": outputs["label"]["data"][i],
                        "tumor_probability": float(outputs["tumor_probability"]["data"][i]),
                        "tumor": bool(outputs["tumor"]["data"][i]),
                        "probabilities": dict(zip(CLASSES, map(float, row)))})
    return results


def explain(url: str, image: ImageLike, model: str = MODEL_NAME, timeout: float = 120.0) -> dict:
    """Grad-CAM for one image through the v1 `:explain` route; adds `overlay_png` (bytes)."""
    _, data = _read(image)
    body = {"instances": [{"b64": base64.b64encode(data).decode("ascii")}]}
    answer = _post(f"{url.rstrip('/')}/v1/models/{model}:explain", body, timeout)["explanations"][0]
    answer["overlay_png"] = base64.b64decode(answer["overlay_png_b64"])
    return answer

