"""The registered model as every MLflow consumer gets it, and one decision whichever path answers.

The model is saved as a recipe bundle (flip averaging in model.keras, the head crop in its
metadata), so every path must load the two-pass model and preprocess with the bundle's own
options. The same scans go through: evaluation's scoring, the bundle loaded by brainscan, the MLflow
pyfunc here, the pyfunc in a fresh virtualenv built from the model's own requirements.txt
(no brainscan installed), `brainscan serve` (v2 REST) and MLServer with mlserver-mlflow and
adaptive batching (KServe's runtime for `modelFormat: mlflow`, its own virtualenv). Each answer,
with no modality, with modality "ct" and with "mri", must equal the others.

The thresholds are chosen so the modality decides: "ct" flags every scan, "mri" none, and
without one the model's own CT/MRI call picks, so a path that ignored the client's modality
or the rule would disagree.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import textwrap
import urllib.request

import numpy as np
import pandas as pd
import pytest

from brainscan import registry

from brainscan.local import mlserver, predictor
from components.evaluate import predict_files
from components.register import register
from brainscan.decision import tumor_probability
from brainscan.modelstore import load_bundle
from brainscan.preprocessing import preprocess_batch

pytestmark = [pytest.mark.slow]
MODALITIES = (None, "ct", "mri")


@pytest.fixture(scope="module")
def trained_with_recipe(tmp_path_factory, tiny_trained_bundle_dir, serving_images) -> str:
    """The tiny trained model saved as a recipe bundle: flip averaging baked into model.keras (stock Keras
    layers only) and the head crop in its metadata, so every path below must apply the bundle's own
    preprocessing and load the two-pass model without brainscan's code."""
    from brainscan.network import with_flip_averaging
    from brainscan.modelstore import save_bundle

    plain = load_bundle(str(tiny_trained_bundle_dir))
    out = tmp_path_factory.mktemp("recipe") / "bundle"
    save_bundle(with_flip_averaging(plain.model, plain.image_size), str(out), plain.image_size,
                {**plain.metadata, "crop_to_head": True, "tta_flip": True})
    bundle = load_bundle(str(out))
    assert np.abs(bundle.preprocess(serving_images) - preprocess_batch(serving_images, bundle.image_size)).max() > 0.1
    return str(out)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, trained_with_recipe, serving_images):
    """(models:/ URI, the downloaded MLflow model folder, tracking URI) of a registered tiny model."""
    import mlflow

    folder = tmp_path_factory.mktemp("portable")
    bundle = load_bundle(trained_with_recipe)
    scores = tumor_probability(bundle.predict(bundle.preprocess(serving_images)))
    doc = {"gate": {"passed": True, "reason": "passed: test stand-in"}, "target_recall": 0.95,
           "threshold": float(np.median(scores)), "thresholds": {"ct": 0.0, "mri": 1.0},
           "test": {"recall": 1.0, "roc_auc": 1.0}, "dataset_fingerprint": "test"}
    tracking = registry.default_tracking_uri(folder)
    result = register(trained_with_recipe, doc, tracking_uri=tracking)
    assert result.registered, result.reason
    mlflow.set_tracking_uri(tracking)
    model_dir = mlflow.artifacts.download_artifacts(artifact_uri=result.model_uri, dst_path=str(folder / "model"))
    return result.model_uri, model_dir, tracking


def _expected(registered, images):
    model_uri, _, tracking = registered
    bundle = load_bundle(model_uri, tracking_uri=tracking)
    assert bundle.preprocessing == {"crop_to_head": True}
    probabilities = bundle.predict(bundle.preprocess(images))
    return {m: bundle.policy().decide(probabilities, m) for m in MODALITIES}


def _same(answer: dict, decision, where: str) -> None:
    np.testing.assert_allclose(np.asarray(answer["probabilities"], np.float32).reshape(-1, 7),
                               decision.probabilities, atol=1e-5, err_msg=where)
    np.testing.assert_allclose(np.asarray(answer["tumor_probability"], np.float64).reshape(-1),
                               decision.tumor_probability, atol=1e-5, err_msg=where)
    assert [bool(t) for t in np.asarray(answer["tumor"]).reshape(-1)] == list(decision.tumor), where
    labels = [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(answer["label"]).reshape(-1)]
    assert labels == list(decision.label), where


def _v2(url: str, images: list[bytes], modality: str | None) -> dict:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(b).decode() for b in images]}]}
    if modality:
        body["parameters"] = {"modality": modality}
    request = urllib.request.Request(f"{url}/v2/models/brain-tumor/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return {o["name"]: o["data"] for o in json.loads(response.read())["outputs"]}


def test_the_modality_really_decides(registered, serving_images):
    expected = _expected(registered, serving_images)
    assert all(expected["ct"].tumor) and not any(expected["mri"].tumor)
    assert set(expected[None].modality) <= {"ct", "mri"}


def test_evaluation_and_the_pyfunc_here_decide_alike(registered, serving_images):
    import mlflow

    model_uri, model_dir, tracking = registered
    expected = _expected(registered, serving_images)
    bundle = load_bundle(model_uri, tracking_uri=tracking)
    scored = predict_files(bundle, serving_images)  # evaluation's own scoring of files
    for modality in MODALITIES:
        _same({"probabilities": scored, **_answer(bundle.policy().decide(scored, modality))}, expected[modality],
              f"evaluate, modality {modality}")
    pyfunc = mlflow.pyfunc.load_model(model_dir)
    frame = pd.DataFrame({"image": serving_images})
    for modality in MODALITIES:
        _same(pyfunc.predict(frame, params={"modality": modality} if modality else None), expected[modality],
              f"pyfunc, modality {modality}")


def _answer(decision) -> dict:
    return {"tumor_probability": decision.tumor_probability, "tumor": decision.tumor, "label": decision.label}


CLEAN_SCRIPT = textwrap.dedent("""
    import base64, importlib.metadata, json, sys
    import mlflow, pandas as pd
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    model = mlflow.pyfunc.load_model(sys.argv[1])
    import brainscan
    images = [base64.b64decode(line) for line in open(sys.argv[2]).read().split()]
    answers = {}
    for modality in ("", "ct", "mri"):
        out = model.predict(pd.DataFrame({"image": images}), params={"modality": modality} if modality else None)
        answers[modality] = {k: [x if isinstance(x, (bool, str)) else float(x) for x in v.reshape(-1).tolist()]
                             for k, v in out.items()}
    print(json.dumps({"brainscan_installed": "brainscan" in installed, "brainscan_from": brainscan.__file__,
                      "answers": answers}))
""")


def test_the_model_loads_and_decides_in_a_clean_virtualenv(registered, serving_images, tmp_path):
    """Only the model's own requirements.txt: no brainscan installed, its code comes with the model."""
    _, model_dir, _ = registered
    environment = mlserver.model_environment(model_dir)
    images = tmp_path / "images.txt"
    images.write_text("\n".join(base64.b64encode(b).decode() for b in serving_images))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH", "VIRTUAL_ENV"))}
    done = subprocess.run([str(environment / "bin" / "python"), "-c", CLEAN_SCRIPT, model_dir, str(images)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["brainscan_installed"] is False
    assert report["brainscan_from"].startswith(os.path.realpath(model_dir)), report["brainscan_from"]
    expected = _expected(registered, serving_images)
    for modality in MODALITIES:
        _same(report["answers"][modality or ""], expected[modality], f"clean virtualenv, modality {modality}")


def test_brainscan_serve_and_mlserver_answer_alike(registered, serving_images, tmp_path):
    """KServe's stock MLflow runtime and brainscan's own server, on the same registered model."""
    _, model_dir, _ = registered
    expected = _expected(registered, serving_images)
    environment = mlserver.model_environment(model_dir, mlserver.mlserver_requirements())
    server = mlserver.start(model_dir, tmp_path / "mlserver", environment, max_batch_size=8, max_batch_time_ms=20)
    try:
        for modality in MODALITIES:
            _same(_v2(server.url, serving_images, modality), expected[modality], f"MLServer, modality {modality}")
    finally:
        mlserver.stop(server)
    info = predictor.start(model_dir, tmp_path / "brainscan", timeout=300)
    try:
        for modality in MODALITIES:
            _same(_v2(info.url, serving_images, modality), expected[modality], f"brainscan serve, modality {modality}")
    finally:
        predictor.stop(tmp_path / "brainscan")
